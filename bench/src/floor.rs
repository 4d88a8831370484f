//! `fanout-floor`: what one frame to N loopback sockets costs on this machine
//! with no server logic at all. It puts the `fanout` figures in context: on a
//! small box whose cores also run every client, the kernel's TCP path per
//! socket (on loopback the sender also runs the receiver's TCP processing and
//! wake-up) sets a lower bound no server design can beat.
//!
//! This process holds the receiving ends, one task per socket as the `fanout`
//! members are. A child process (`floor-sender`) connects N sockets to it and,
//! on each line from its stdin, writes one WebSocket text frame of the size of
//! an `add` event to every socket from `--threads` plain threads. Each receipt
//! is timed from the moment the line was handed to the child.

use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::sync::Notify;

use crate::procinfo::CpuProbe;
use crate::stats::{Latencies, emit};

/// An unmasked server-to-client text frame carrying an `add` event of the usual size.
fn frame() -> Vec<u8> {
    let payload =
        br#"{"type":"add","key":"bench-fanout-1795561095568-25988","number":17,"version":123456}"#;
    let mut frame = vec![0x81, payload.len() as u8];
    frame.extend_from_slice(payload);
    frame
}

#[derive(Args)]
pub struct FloorArgs {
    /// Receiving sockets.
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    /// Frames, one at a time.
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// Pause between frames, in milliseconds.
    #[arg(long, default_value_t = 100)]
    gap_ms: u64,
    /// Sending threads (the machine's cores by default).
    #[arg(long)]
    threads: Option<usize>,
    /// Seconds to wait for one frame to reach every socket.
    #[arg(long, default_value_t = 10.0)]
    message_timeout: f64,
    #[arg(long)]
    label: Option<String>,
}

#[derive(Args)]
pub struct SenderArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long)]
    members: usize,
    #[arg(long)]
    threads: usize,
}

/// The child: connects, then sends one frame to every socket per stdin line.
pub fn sender(args: SenderArgs) -> anyhow::Result<()> {
    let mut sockets = Vec::with_capacity(args.members);
    for i in 0..args.members {
        let socket = TcpStream::connect(args.connect)
            .with_context(|| format!("floor sender: connection {i}"))?;
        socket.set_nodelay(true)?;
        sockets.push(socket);
    }
    let threads = args.threads.clamp(1, args.members.max(1));
    let per_thread = args.members.div_ceil(threads);
    let mut starts = Vec::new();
    let mut workers = Vec::new();
    let frame: Arc<[u8]> = frame().into();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    while !sockets.is_empty() {
        let mut share: Vec<TcpStream> = sockets.drain(..per_thread.min(sockets.len())).collect();
        let (start_tx, start_rx) = std::sync::mpsc::channel::<()>();
        let (frame, done) = (frame.clone(), done_tx.clone());
        starts.push(start_tx);
        workers.push(std::thread::spawn(move || {
            while start_rx.recv().is_ok() {
                let sent = share.iter_mut().try_for_each(|s| s.write_all(&frame));
                let _ = done.send(sent.context("floor sender: write"));
            }
        }));
    }
    let mut out = std::io::stdout();
    writeln!(out, "connected")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        line?;
        for start in &starts {
            start.send(())?;
        }
        for _ in &starts {
            done_rx.recv()??;
        }
    }
    drop(starts);
    for worker in workers {
        let _ = worker.join();
    }
    Ok(())
}

pub async fn floor(args: FloorArgs) -> anyhow::Result<()> {
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // A deep accept queue: the sender connects faster than one accept loop
    // takes connections, and a full queue drops SYNs for a second each.
    let listener = tokio::net::TcpSocket::new_v4()?;
    listener.bind("127.0.0.1:0".parse()?)?;
    let listener = listener.listen(4096)?;
    let address = listener.local_addr()?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(["floor-sender", "--connect", &address.to_string()])
        .args(["--members", &args.members.to_string()])
        .args(["--threads", &threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the floor sender")?;
    let sender_pid = child.id();
    let mut go = child.stdin.take().context("sender stdin")?;
    let mut ready = tokio::io::BufReader::new(child.stdout.take().context("sender stdout")?);

    let received: Arc<Vec<AtomicUsize>> =
        Arc::new((0..args.messages).map(|_| AtomicUsize::new(0)).collect());
    let complete = Arc::new(Notify::new());
    let frame_len = frame().len();
    let mut members = Vec::with_capacity(args.members);
    let accept = async {
        for _ in 0..args.members {
            let (mut socket, _) = listener.accept().await?;
            let (received, complete, expected) = (received.clone(), complete.clone(), args.members);
            members.push(tokio::spawn(async move {
                let mut buf = vec![0u8; frame_len];
                let mut receipts = Vec::new();
                for slot in received.iter() {
                    if socket.read_exact(&mut buf).await.is_err() {
                        break;
                    }
                    receipts.push(Instant::now());
                    if slot.fetch_add(1, Ordering::AcqRel) + 1 == expected {
                        complete.notify_one();
                    }
                }
                receipts
            }));
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), accept)
        .await
        .context("floor: the sender did not connect within 120 s")??;
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut ready, &mut line).await?;
    if line.trim() != "connected" {
        bail!("floor sender failed before sending (see its error above)");
    }
    eprintln!(
        "fanout-floor: {} sockets; {} frames from {threads} sending threads",
        args.members, args.messages
    );

    let cpu = CpuProbe::start(sender_pid);
    let mut sent_at = Vec::with_capacity(args.messages);
    let mut incomplete = 0;
    let limit = Duration::from_secs_f64(args.message_timeout.max(0.1));
    for slot in received.iter() {
        sent_at.push(Instant::now());
        tokio::io::AsyncWriteExt::write_all(&mut go, b"go\n").await?;
        let deadline = tokio::time::Instant::now() + limit;
        while slot.load(Ordering::Acquire) < args.members {
            if tokio::time::timeout_at(deadline, complete.notified())
                .await
                .is_err()
            {
                incomplete += 1;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(args.gap_ms)).await;
    }
    let deliveries = (args.members * args.messages) as u64;
    let cpu = cpu.finish(deliveries);
    drop(go);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;

    let mut latencies = Latencies::new();
    for member in members {
        // Ended by the sender closing its sockets, or by reading every frame.
        for (i, at) in member.await?.into_iter().enumerate() {
            latencies.record(at.saturating_duration_since(sent_at[i]));
        }
    }
    emit(
        json!({
            "scenario": "fanout-floor",
            "members": args.members,
            "messages": args.messages,
            "threads": threads,
            "frame_bytes": frame_len,
            "delivered": latencies.count(),
            "expected": deliveries,
            "incomplete_messages": incomplete,
            "latency": latencies.summary(),
            "p50_ms": latencies.p50_ms(),
            "p99_ms": latencies.p99_ms(),
            "max_ms": latencies.max_ms(),
            "cpu": cpu,
        }),
        args.label.as_deref(),
    );
    Ok(())
}
