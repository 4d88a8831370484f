//! `fanout` (one writer, many members of one room spread over instances) and
//! `latency` (one writer on instance A, one reader on instance B, on an idle
//! cluster). Both time each event from the moment the writer sends its `add`
//! to the moment a member has read the resulting `add` frame.
//!
//! Adds are sent one at a time: the next one leaves only when every member has
//! the previous one (or it timed out), so each event is timed in isolation and
//! an event's version tells which send it belongs to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::net::{Frame, Sources, Target, Ws, json_text, open_member};
use crate::procinfo::CpuProbe;
use crate::stats::{Latencies, emit, round3};

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Instance base URLs; members are assigned round robin. Repeat the flag.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Where the writer connects (default: the first --url).
    #[arg(long)]
    pub writer_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Numbers the writer adds, one at a time.
    #[arg(long, default_value_t = 20)]
    pub adds: usize,
    /// Pause between one event being complete and the next add, in ms.
    #[arg(long, default_value_t = 100)]
    pub gap_ms: u64,
    /// How long to wait for every member to receive one event, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub event_timeout: f64,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    #[arg(long, default_value_t = 120.0)]
    pub connect_timeout: f64,
    /// Server processes whose CPU time over the adds is reported (repeat the flag).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    #[arg(long, default_value_t = 40)]
    pub source_base: u8,
    #[arg(long, default_value_t = 16)]
    pub source_count: u8,
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Debug, Args)]
pub struct LatencyArgs {
    #[arg(long)]
    pub writer_url: String,
    #[arg(long)]
    pub reader_url: String,
    /// Sequential adds.
    #[arg(long, default_value_t = 500)]
    pub count: usize,
    #[arg(long, default_value_t = 10)]
    pub gap_ms: u64,
    /// Per-add wait for delivery, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long)]
    pub label: Option<String>,
}

/// Shared between the writer and the members: receipts per event.
struct Progress {
    received: Vec<AtomicUsize>,
    expected: AtomicUsize,
    complete: Notify,
}

/// What one member saw.
#[derive(Default)]
struct MemberLog {
    instance: usize,
    /// (version, when read) for every `add` of the room.
    receipts: Vec<(u64, Instant)>,
    /// Versions that were not the previous one + 1 (gaps, repeats, reordering).
    order_violations: u64,
    /// Error frames, or the connection ending before the end.
    failures: u64,
}

/// Reads `add` frames of `key` until cancelled; the first version expected is `from + 1`.
async fn member_loop(
    mut ws: Ws,
    key: String,
    from: u64,
    base: u64,
    progress: Arc<Progress>,
    stop: CancellationToken,
    log: &mut MemberLog,
) {
    let mut last = from;
    // One waiter registration for the whole loop: creating `cancelled()` anew
    // per frame would lock the token's waiter list twice per delivery.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let frame = tokio::select! {
            biased;
            frame = ws.next() => frame,
            _ = &mut stopped => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                log.failures += 1;
                break;
            }
            Some(Ok(_)) => continue,
        };
        let now = Instant::now();
        let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
            log.failures += 1;
            continue;
        };
        match (frame.kind.as_ref(), frame.version) {
            ("add", Some(version)) if frame.key.as_deref() == Some(key.as_str()) => {
                if version != last + 1 {
                    log.order_violations += 1;
                }
                last = version;
                log.receipts.push((version, now));
                if let Some(slot) = version
                    .checked_sub(base + 1)
                    .and_then(|i| progress.received.get(i as usize))
                {
                    let count = slot.fetch_add(1, Ordering::AcqRel) + 1;
                    if count >= progress.expected.load(Ordering::Acquire) {
                        progress.complete.notify_one();
                    }
                }
            }
            ("error", _) => log.failures += 1,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
}

pub async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let targets = Target::parse_all(&args.urls)?;
    let writer_target = match &args.writer_url {
        Some(url) => Target::parse(url)?,
        None => targets[0].clone(),
    };
    let key = args
        .key
        .clone()
        .unwrap_or_else(|| format!("bench-fanout-{}", crate::unique_suffix()));
    let sources = Arc::new(Sources::new(args.source_base, args.source_count)?);

    // The writer joins first: its sync gives the version every event counts from.
    let (writer, base) = open_member(&writer_target, &sources, &key, 3)
        .await
        .map_err(anyhow::Error::msg)?;
    let progress = Arc::new(Progress {
        received: (0..args.adds).map(|_| AtomicUsize::new(0)).collect(),
        expected: AtomicUsize::new(usize::MAX),
        complete: Notify::new(),
    });
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (joined_tx, mut joined_rx) = mpsc::channel::<Result<(), String>>(1024);
    let started = Instant::now();
    let mut members = Vec::with_capacity(args.members);
    for i in 0..args.members {
        let instance = i % targets.len();
        let (target, sources, gate, key, progress, stop, joined) = (
            targets[instance].clone(),
            sources.clone(),
            gate.clone(),
            key.clone(),
            progress.clone(),
            stop.clone(),
            joined_tx.clone(),
        );
        members.push(tokio::spawn(async move {
            let mut log = MemberLog {
                instance,
                ..MemberLog::default()
            };
            let opened = {
                let Ok(_permit) = gate.acquire().await else {
                    return log;
                };
                open_member(&target, &sources, &key, 3).await
            };
            match opened {
                Ok((ws, from)) => {
                    let _ = joined.send(Ok(())).await;
                    drop(joined);
                    member_loop(ws, key, from, base, progress, stop, &mut log).await;
                }
                Err(err) => {
                    let _ = joined.send(Err(err)).await;
                }
            }
            log
        }));
    }
    drop(joined_tx);
    let (mut joined, mut failed, mut first_error) = (0usize, 0usize, None);
    let connect_deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(args.connect_timeout.max(1.0));
    while joined + failed < args.members {
        match tokio::time::timeout_at(connect_deadline, joined_rx.recv()).await {
            Ok(Some(Ok(()))) => joined += 1,
            Ok(Some(Err(err))) => {
                failed += 1;
                first_error.get_or_insert(err);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if joined == 0 {
        stop.cancel();
        bail!("no member could join: {}", first_error.unwrap_or_default());
    }
    progress.expected.store(joined, Ordering::Release);
    eprintln!(
        "fanout: {joined}/{} members joined in {connect_s:.1} s; adding {} numbers",
        args.members, args.adds
    );

    let (mut sink, mut stream) = writer.split();
    // The writer's own echoes are drained so its socket keeps flowing.
    let writer_stop = stop.clone();
    let drain = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = writer_stop.cancelled() => break,
                frame = stream.next() => if !matches!(frame, Some(Ok(_))) { break },
            }
        }
    });
    let cpu: Vec<CpuProbe> = args
        .server_pids
        .iter()
        .map(|pid| CpuProbe::start(Some(*pid)))
        .collect();
    let mut sent_at = Vec::with_capacity(args.adds);
    let mut incomplete = 0usize;
    let event_timeout = Duration::from_secs_f64(args.event_timeout.max(0.1));
    for i in 0..args.adds {
        let add = json!({"type": "add", "key": key, "number": i % 37, "id": format!("fanout-{i}")});
        sent_at.push(Instant::now());
        sink.send(json_text(&add))
            .await
            .context("writer: sending add")?;
        let deadline = tokio::time::Instant::now() + event_timeout;
        while progress.received[i].load(Ordering::Acquire) < joined {
            if tokio::time::timeout_at(deadline, progress.complete.notified())
                .await
                .is_err()
            {
                incomplete += 1;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    stop.cancel();
    let _ = drain.await;
    let deliveries_expected = (joined * args.adds) as u64;
    let cpu: Vec<serde_json::Value> = cpu
        .iter()
        .map(|probe| probe.finish(deliveries_expected))
        .collect();

    let mut all = Latencies::new();
    let mut per_instance: Vec<Latencies> = targets.iter().map(|_| Latencies::new()).collect();
    let mut completion = vec![Duration::ZERO; args.adds];
    let (mut delivered, mut violations, mut failures) = (0u64, 0u64, 0u64);
    for member in members {
        let Ok(log) = member.await else {
            failures += 1;
            continue;
        };
        violations += log.order_violations;
        failures += log.failures;
        for (version, at) in log.receipts {
            let Some(i) = version
                .checked_sub(base + 1)
                .map(|i| i as usize)
                .filter(|i| *i < args.adds)
            else {
                continue;
            };
            let latency = at.saturating_duration_since(sent_at[i]);
            all.record(latency);
            per_instance[log.instance].record(latency);
            completion[i] = completion[i].max(latency);
            delivered += 1;
        }
    }
    let mut complete = Latencies::new();
    completion.iter().for_each(|d| complete.record(*d));
    let expected = (joined * args.adds) as u64;
    let instances: Vec<_> = targets
        .iter()
        .zip(&per_instance)
        .map(|(t, l)| json!({"instance": t.authority, "deliveries": l.count(), "p50_ms": l.p50_ms(), "p99_ms": l.p99_ms(), "max_ms": l.max_ms()}))
        .collect();
    emit(
        json!({
            "scenario": "fanout",
            "key": key,
            "instances": targets.len(),
            "writer": writer_target.authority,
            "members": args.members,
            "joined": joined,
            "join_failures": failed,
            "first_error": first_error,
            "connect_s": round3(connect_s),
            "adds": args.adds,
            "expected": expected,
            "delivered": delivered,
            "lost": expected.saturating_sub(delivered),
            "incomplete_events": incomplete,
            "order_violations": violations,
            "member_failures": failures,
            "all_delivered": joined == args.members && delivered == expected && violations == 0 && failures == 0,
            "p50_ms": all.p50_ms(),
            "p99_ms": all.p99_ms(),
            "max_ms": all.max_ms(),
            "latency": all.summary(),
            "complete_p50_ms": complete.p50_ms(),
            "complete_max_ms": complete.max_ms(),
            "per_instance": instances,
            "cpu": cpu,
        }),
        args.label.as_deref(),
    );
    Ok(())
}

/// Forwards `(version, when read)` of every `add` of `key` until the stream ends.
fn spawn_version_reader(
    mut stream: futures_util::stream::SplitStream<Ws>,
    key: String,
) -> mpsc::UnboundedReceiver<(u64, Instant)> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let now = Instant::now();
            if let Ok(frame) = serde_json::from_str::<Frame>(&text)
                && frame.kind == "add"
                && frame.key.as_deref() == Some(key.as_str())
                && let Some(version) = frame.version
                && tx.send((version, now)).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Waits for `version` on `rx`; older versions are skipped.
async fn wait_version(
    rx: &mut mpsc::UnboundedReceiver<(u64, Instant)>,
    version: u64,
    deadline: tokio::time::Instant,
) -> Option<Instant> {
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((v, at))) if v == version => return Some(at),
            Ok(Some((v, _))) if v < version => continue,
            _ => return None,
        }
    }
}

pub async fn latency(args: LatencyArgs) -> anyhow::Result<()> {
    let writer_target = Target::parse(&args.writer_url)?;
    let reader_target = Target::parse(&args.reader_url)?;
    let key = args
        .key
        .clone()
        .unwrap_or_else(|| format!("bench-latency-{}", crate::unique_suffix()));
    let sources = Sources::new(0, 0)?;
    let (reader, _) = open_member(&reader_target, &sources, &key, 3)
        .await
        .map_err(anyhow::Error::msg)?;
    let (writer, base) = open_member(&writer_target, &sources, &key, 3)
        .await
        .map_err(anyhow::Error::msg)?;
    let (_reader_sink, reader_stream) = reader.split();
    let (mut sink, writer_stream) = writer.split();
    let mut remote_rx = spawn_version_reader(reader_stream, key.clone());
    let mut local_rx = spawn_version_reader(writer_stream, key.clone());

    let (mut remote, mut local) = (Latencies::new(), Latencies::new());
    let mut lost = 0u64;
    let limit = Duration::from_secs_f64(args.timeout.max(0.1));
    let mut echo_misses = 0u64;
    for i in 0..args.count {
        let version = base + 1 + i as u64;
        let add =
            json!({"type": "add", "key": key, "number": i % 37, "id": format!("latency-{i}")});
        let sent = Instant::now();
        sink.send(json_text(&add))
            .await
            .context("writer: sending add")?;
        let deadline = tokio::time::Instant::now() + limit;
        match wait_version(&mut remote_rx, version, deadline).await {
            Some(at) => remote.record(at.saturating_duration_since(sent)),
            None => lost += 1,
        }
        match wait_version(&mut local_rx, version, deadline).await {
            Some(at) => local.record(at.saturating_duration_since(sent)),
            None => echo_misses += 1,
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let _ = sink.close().await;
    let mut errors = BTreeMap::new();
    errors.insert("remote_lost", lost);
    errors.insert("local_echo_lost", echo_misses);
    emit(
        json!({
            "scenario": "latency",
            "key": key,
            "writer": writer_target.authority,
            "reader": reader_target.authority,
            "count": args.count,
            "delivered": remote.count(),
            "lost": lost,
            "all_delivered": lost == 0,
            "p50_ms": remote.p50_ms(),
            "p99_ms": remote.p99_ms(),
            "max_ms": remote.max_ms(),
            "latency": remote.summary(),
            "local_echo": local.summary(),
            "errors": errors,
        }),
        args.label.as_deref(),
    );
    Ok(())
}
