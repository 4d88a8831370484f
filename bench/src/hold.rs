//! `ws-hold`: open many WebSockets to one instance, each joined to a room, hold
//! them, and measure the server's resident memory before and while they are
//! held.
//!
//! A process can hold only as many sockets as its descriptor limit allows, so
//! above that the work is split over child processes of this same binary (the
//! hidden `--shard` mode). A shard connects its share, prints one JSON line
//! (`{"established", "failed"}`), holds until its standard input says
//! `release` (or closes, or `--hold` runs out), then prints how many of its
//! connections the server dropped meanwhile and exits.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::net::{Sources, Target, open_member};
use crate::procinfo::{open_files_limit, rss_kib};
use crate::stats::{emit, round3};

#[derive(Debug, Args, Clone)]
pub struct HoldArgs {
    /// Instance base URL (direct, not through Nginx).
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Members are spread evenly over this many rooms.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    #[arg(long, default_value = "bench-hold")]
    pub key_prefix: String,
    /// Handshakes (connect + upgrade + join) in flight at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Give up establishing after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
    /// Seconds to wait after the last connection before sampling memory.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// Upper bound on the whole hold, in seconds (shards release themselves then).
    #[arg(long, default_value_t = 300.0)]
    pub hold: f64,
    /// The server process, for VmRSS before / while held / after release.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Connections per process; default: the descriptor limit less a margin.
    #[arg(long)]
    pub per_process: Option<usize>,
    /// First source address 127.0.0.N and how many to use.
    #[arg(long, default_value_t = 2)]
    pub source_base: u8,
    #[arg(long, default_value_t = 16)]
    pub source_count: u8,
    #[arg(long)]
    pub label: Option<String>,
    /// Internal: run as one shard, holding room indexes from this offset.
    #[arg(long, hide = true)]
    pub shard: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ShardReport {
    established: u64,
    failed: u64,
    #[serde(default)]
    first_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ShardEnd {
    dropped: u64,
}

/// Connections held by this process.
struct Held {
    established: u64,
    failed: u64,
    first_error: Option<String>,
    dropped: Arc<AtomicU64>,
    release: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Held {
    async fn release(self) -> u64 {
        self.release.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Establishes `count` joined connections, numbered from `offset` (which picks rooms).
async fn establish(args: &HoldArgs, offset: usize, count: usize) -> anyhow::Result<Held> {
    let target = Target::parse(&args.url)?;
    let sources = Arc::new(Sources::new(args.source_base, args.source_count)?);
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let release = CancellationToken::new();
    let dropped = Arc::new(AtomicU64::new(0));
    let (done_tx, mut done_rx) = mpsc::channel::<Result<(), String>>(1024);
    let mut tasks = Vec::with_capacity(count);
    for i in offset..offset + count {
        let (target, sources, gate, release, dropped, done) = (
            target.clone(),
            sources.clone(),
            gate.clone(),
            release.clone(),
            dropped.clone(),
            done_tx.clone(),
        );
        let key = format!("{}-{}", args.key_prefix, i % args.rooms.max(1));
        tasks.push(tokio::spawn(async move {
            let mut ws = {
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                if release.is_cancelled() {
                    return;
                }
                match open_member(&target, &sources, &key, 3).await {
                    Ok((ws, _)) => {
                        let _ = done.send(Ok(())).await;
                        ws
                    }
                    Err(err) => {
                        let _ = done.send(Err(err)).await;
                        return;
                    }
                }
            };
            drop(done);
            // Hold: keep reading (which also answers the server's pings).
            loop {
                tokio::select! {
                    _ = release.cancelled() => break,
                    frame = ws.next() => match frame {
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    },
                }
            }
            // Dropping the stream closes the socket.
        }));
    }
    drop(done_tx);
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(args.connect_timeout.max(1.0));
    let (mut established, mut failed, mut first_error) = (0u64, 0u64, None);
    while established + failed < count as u64 {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(Ok(()))) => established += 1,
            Ok(Some(Err(err))) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            Ok(None) => break,
            Err(_) => {
                first_error.get_or_insert_with(|| "connect phase timed out".into());
                failed += count as u64 - established - failed;
                break;
            }
        }
    }
    Ok(Held {
        established,
        failed,
        first_error,
        dropped,
        release,
        tasks,
    })
}

/// Hidden shard mode: establish, report, hold until released, report drops.
async fn run_shard(args: HoldArgs, offset: usize) -> anyhow::Result<()> {
    let held = establish(&args, offset, args.connections).await?;
    println!(
        "{}",
        json!({"established": held.established, "failed": held.failed, "first_error": held.first_error})
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let _ = tokio::time::timeout(
        Duration::from_secs_f64(args.hold.max(1.0)),
        lines.next_line(),
    )
    .await;
    let dropped = held.release().await;
    println!("{}", json!({ "dropped": dropped }));
    Ok(())
}

fn rss(pid: Option<u32>) -> Option<u64> {
    pid.and_then(rss_kib)
}

pub async fn ws_hold(args: HoldArgs) -> anyhow::Result<()> {
    if let Some(offset) = args.shard {
        return run_shard(args, offset).await;
    }
    Target::parse(&args.url)?;
    let per_process = args
        .per_process
        .or_else(|| open_files_limit().map(|limit| limit.saturating_sub(500) as usize))
        .unwrap_or(1000)
        .max(1);
    let shards = args.connections.div_ceil(per_process).max(1);
    let rss_before = rss(args.server_pid);
    let started = Instant::now();

    let (established, failed, first_error, dropped, connect_s, rss_held);
    if shards == 1 {
        let held = establish(&args, 0, args.connections).await?;
        connect_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(args.settle.max(0.0))).await;
        rss_held = rss(args.server_pid);
        (established, failed, first_error) =
            (held.established, held.failed, held.first_error.clone());
        dropped = held.release().await;
    } else {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut children = Vec::new();
        let mut offset = 0;
        for s in 0..shards {
            let share = (args.connections - offset).min(per_process);
            let mut child = tokio::process::Command::new(&exe)
                .arg("ws-hold")
                .args(["--url", &args.url, "--connections", &share.to_string()])
                .args([
                    "--rooms",
                    &args.rooms.to_string(),
                    "--key-prefix",
                    &args.key_prefix,
                ])
                .args([
                    "--connect-concurrency",
                    &(args.connect_concurrency / shards).max(1).to_string(),
                ])
                .args([
                    "--connect-timeout",
                    &args.connect_timeout.to_string(),
                    "--hold",
                    &args.hold.to_string(),
                ])
                .args([
                    "--source-base",
                    &args.source_base.to_string(),
                    "--source-count",
                    &args.source_count.to_string(),
                ])
                .args(["--shard", &offset.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting shard {s}"))?;
            let stdout = child.stdout.take().context("shard stdout")?;
            children.push((child, BufReader::new(stdout).lines()));
            offset += share;
        }
        let (mut est, mut fail, mut first) = (0, 0, None);
        let limit = Duration::from_secs_f64(args.connect_timeout + 30.0);
        for (_, lines) in children.iter_mut() {
            let line = tokio::time::timeout(limit, lines.next_line())
                .await
                .context("shard did not report")??;
            let report: ShardReport = serde_json::from_str(&line.context("shard exited early")?)?;
            est += report.established;
            fail += report.failed;
            if first.is_none() {
                first = report.first_error;
            }
        }
        connect_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs_f64(args.settle.max(0.0))).await;
        rss_held = rss(args.server_pid);
        let mut drops = 0;
        for (child, lines) in children.iter_mut() {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(b"release\n").await;
            }
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
                && let Ok(end) = serde_json::from_str::<ShardEnd>(&line)
            {
                drops += end.dropped;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
        (established, failed, first_error, dropped) = (est, fail, first, drops);
    }
    if established == 0 && args.connections > 0 {
        bail!(
            "no WebSocket connection could be established: {}",
            first_error.unwrap_or_default()
        );
    }
    // Give the server a moment to tear the sessions down before the last sample.
    tokio::time::sleep(Duration::from_secs_f64(args.settle.clamp(0.0, 3.0))).await;
    let rss_after = rss(args.server_pid);
    let per_conn_bytes = match (rss_before, rss_held) {
        (Some(before), Some(held)) if established > 0 => Some(round3(
            (held as f64 - before as f64) * 1024.0 / established as f64,
        )),
        _ => None,
    };
    emit(
        json!({
            "scenario": "ws-hold",
            "url": args.url,
            "requested": args.connections,
            "established": established,
            "failed": failed,
            "first_error": first_error,
            "dropped_while_held": dropped,
            "processes": shards,
            "rooms": args.rooms,
            "connect_s": round3(connect_s),
            "connects_per_s": round3(established as f64 / connect_s.max(1e-9)),
            "rss_before_kib": rss_before,
            "rss_held_kib": rss_held,
            "rss_after_release_kib": rss_after,
            "per_conn_bytes": per_conn_bytes,
        }),
        args.label.as_deref(),
    );
    Ok(())
}
