//! `mixed`: a soak over many rooms: clients connect to instances in turn, join,
//! add numbers (waiting for their own event), read rooms over HTTP, ping, move
//! to another room, hang up and come back. Every unexpected outcome is an
//! error: a refused connection, an error frame, a missing or out-of-order
//! event, a non-200 reply, a timeout. Meanwhile the instances' resident memory
//! is sampled, to show whether it stays flat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hyper::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::net::{
    ConnectionClosed, Frame, HttpConn, JOIN_TIMEOUT, Sources, Target, Ws, encode_key, join,
    json_text, ws_connect,
};
use crate::procinfo::rss_kib;
use crate::stats::{Latencies, emit, round3};

#[derive(Debug, Args)]
pub struct MixedArgs {
    /// Instance base URLs (repeat the flag); clients rotate over them.
    #[arg(long = "url", required = true)]
    pub urls: Vec<String>,
    /// Seconds of load (operations in flight then finish within their timeouts).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    #[arg(long, default_value_t = 20)]
    pub rooms: usize,
    /// Stop after this many operations in total even if time is left.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_ops: u64,
    /// Longest pause of a client between two operations, in ms.
    #[arg(long, default_value_t = 20)]
    pub think_ms: u64,
    /// Server processes whose VmRSS is sampled (repeat the flag).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    #[arg(long, default_value_t = 1000)]
    pub sample_ms: u64,
    /// Seconds of quiet after the load before the last memory sample.
    #[arg(long, default_value_t = 3.0)]
    pub cooldown: f64,
    #[arg(long, default_value = "bench-mixed")]
    pub key_prefix: String,
    #[arg(long, default_value_t = 60)]
    pub source_base: u8,
    #[arg(long, default_value_t = 16)]
    pub source_count: u8,
    #[arg(long)]
    pub label: Option<String>,
}

/// Bound on one operation's wait.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// A small xorshift generator: operation choice needs no statistical quality.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[derive(Default)]
struct Tally {
    ops: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    first_errors: Vec<String>,
    add_latency: Latencies,
    get_latency: Latencies,
    redundant_syncs: u64,
}

impl Tally {
    fn op(&mut self, kind: &'static str) {
        *self.ops.entry(kind).or_default() += 1;
    }

    fn error(&mut self, kind: &str, detail: impl std::fmt::Display) {
        *self.errors.entry(kind.to_owned()).or_default() += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(format!("{kind}: {detail}"));
        }
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.ops {
            *self.ops.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for e in other.first_errors {
            if self.first_errors.len() < 10 {
                self.first_errors.push(e);
            }
        }
        self.redundant_syncs += other.redundant_syncs;
        self.add_latency.merge(&other.add_latency);
        self.get_latency.merge(&other.get_latency);
    }
}

/// One joined connection and the last version it saw of its room.
struct Joined {
    ws: Ws,
    key: String,
    last: u64,
    /// Full syncs that repeated the version already held.
    resyncs: u64,
}

impl Joined {
    /// Reads frames until one satisfies `done`, checking that the room's events
    /// arrive in version order without gaps. Returns the error kind otherwise.
    async fn until(
        &mut self,
        mut done: impl FnMut(&Frame) -> bool,
    ) -> Result<(), (&'static str, String)> {
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => {
                    return Err((
                        "timeout",
                        format!("no reply within {OP_TIMEOUT:?} in {}", self.key),
                    ));
                }
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(err))) => return Err(("connection", err.to_string())),
                Ok(None) => return Err(("connection", "closed by the server".into())),
            };
            let text = match message {
                Message::Text(text) => text,
                Message::Close(frame) => {
                    return Err(("connection", format!("closed by the server: {frame:?}")));
                }
                _ => continue,
            };
            let frame: Frame =
                serde_json::from_str(&text).map_err(|e| ("bad_frame", format!("{e}: {text}")))?;
            if frame.kind == "error" {
                return Err(("error_frame", text.to_string()));
            }
            if frame.key.as_deref() == Some(self.key.as_str())
                && let Some(version) = frame.version
            {
                match frame.kind.as_ref() {
                    "add" | "remove" => {
                        if version != self.last + 1 {
                            return Err((
                                "order",
                                format!("{}: version {version} after {}", self.key, self.last),
                            ));
                        }
                        self.last = version;
                    }
                    // A replaced history (or a resync) carries the new version.
                    // A full sync at the version the client already has is a
                    // redundant resync: allowed by the protocol, counted apart.
                    "sync" => {
                        if version < self.last {
                            return Err((
                                "order",
                                format!(
                                    "{}: sync at version {version} after {}",
                                    self.key, self.last
                                ),
                            ));
                        }
                        if version == self.last {
                            self.resyncs += 1;
                        }
                        self.last = version;
                    }
                    _ => {}
                }
            }
            if done(&frame) {
                return Ok(());
            }
        }
    }
}

struct Client {
    id: usize,
    targets: Arc<Vec<Target>>,
    sources: Arc<Sources>,
    rooms: usize,
    prefix: String,
    rng: Rng,
    tally: Tally,
    cycle: usize,
    seq: u64,
}

impl Client {
    fn room(&mut self) -> String {
        format!("{}-{}", self.prefix, self.rng.below(self.rooms as u64))
    }

    async fn connect(&mut self) -> Option<Joined> {
        self.cycle += 1;
        let key = self.room();
        let target = &self.targets[(self.id + self.cycle) % self.targets.len()];
        let mut ws = match ws_connect(target, self.sources.pick()).await {
            Ok(ws) => ws,
            Err(err) => {
                self.tally.error("connect", format!("{err:#}"));
                return None;
            }
        };
        match join(&mut ws, &key, JOIN_TIMEOUT).await {
            Ok(version) => {
                self.tally.op("connect+join");
                Some(Joined {
                    ws,
                    key,
                    last: version,
                    resyncs: 0,
                })
            }
            Err(err) => {
                self.tally.error("join", format!("{err:#}"));
                None
            }
        }
    }

    /// One operation on an open connection; `false` means the connection is done.
    async fn step(&mut self, joined: &mut Joined, http: &mut Option<HttpConn>) -> bool {
        match self.rng.below(100) {
            45..50 => {
                // Replacing the history keeps rooms short, so that memory measures
                // the server, not the growing data.
                self.seq += 1;
                let id = format!("m{}-{}", self.id, self.seq);
                let history: Vec<u64> = (0..20).map(|_| self.rng.below(37)).collect();
                let update =
                    json!({"type": "update", "key": joined.key, "history": history, "id": id});
                if let Err(err) = joined.ws.send(json_text(&update)).await {
                    self.tally.error("connection", err);
                    return false;
                }
                let outcome = joined
                    .until(|f| f.kind == "sync" && f.id.as_deref() == Some(id.as_str()))
                    .await;
                self.finish("update", outcome, None)
            }
            0..45 => {
                self.seq += 1;
                let id = format!("m{}-{}", self.id, self.seq);
                let add = json!({"type": "add", "key": joined.key, "number": self.rng.below(37), "id": id});
                let sent = Instant::now();
                if let Err(err) = joined.ws.send(json_text(&add)).await {
                    self.tally.error("connection", err);
                    return false;
                }
                let outcome = joined
                    .until(|f| f.kind == "add" && f.id.as_deref() == Some(id.as_str()))
                    .await;
                self.finish("add", outcome, Some(sent))
            }
            50..70 => {
                let key = self.room();
                if http.is_none() {
                    let target = &self.targets[self.id % self.targets.len()];
                    match HttpConn::open(target, None).await {
                        Ok(conn) => *http = Some(conn),
                        Err(err) => {
                            self.tally.error("http_connect", format!("{err:#}"));
                            return true;
                        }
                    }
                }
                let Some(conn) = http.as_mut() else {
                    return true;
                };
                let path = format!("/api/roulette/{}", encode_key(&key));
                let sent = Instant::now();
                let mut reply = conn.get(&path).await;
                if reply.as_ref().is_err_and(|e| e.is::<ConnectionClosed>()) {
                    // Closed between requests (idle keep-alive timeout): normal, reconnect.
                    match HttpConn::open(&self.targets[self.id % self.targets.len()], None).await {
                        Ok(mut fresh) => {
                            reply = fresh.get(&path).await;
                            *conn = fresh;
                        }
                        Err(err) => reply = Err(err),
                    }
                }
                match reply {
                    Ok((StatusCode::OK, _)) => {
                        self.tally.get_latency.record(sent.elapsed());
                        self.tally.op("http_get");
                    }
                    Ok((status, body)) => self.tally.error(
                        &format!("http_{}", status.as_u16()),
                        String::from_utf8_lossy(&body),
                    ),
                    Err(err) => {
                        self.tally.error("http_transport", format!("{err:#}"));
                        *http = None;
                    }
                }
                true
            }
            70..80 => {
                // Another room: rejoining the same one could meet a stale `sync`
                // of it (a replaced history queued before the leave) and take it
                // for the greeting.
                let mut key = self.room();
                while key == joined.key && self.rooms > 1 {
                    key = self.room();
                }
                if key == joined.key {
                    return true;
                }
                let leave = json!({"type": "leave", "key": joined.key});
                if let Err(err) = joined.ws.send(json_text(&leave)).await {
                    self.tally.error("connection", err);
                    return false;
                }
                match join(&mut joined.ws, &key, JOIN_TIMEOUT).await {
                    Ok(version) => {
                        self.tally.op("leave+join");
                        joined.key = key;
                        joined.last = version;
                        true
                    }
                    Err(err) => {
                        self.tally.error("join", format!("{err:#}"));
                        false
                    }
                }
            }
            80..90 => {
                if let Err(err) = joined.ws.send(json_text(&json!({"type": "ping"}))).await {
                    self.tally.error("connection", err);
                    return false;
                }
                let outcome = joined.until(|f| f.kind == "pong").await;
                self.finish("ping", outcome, None)
            }
            _ => {
                self.tally.op("hang_up");
                let _ = tokio::time::timeout(Duration::from_secs(2), joined.ws.close(None)).await;
                false
            }
        }
    }

    fn finish(
        &mut self,
        op: &'static str,
        outcome: Result<(), (&'static str, String)>,
        sent: Option<Instant>,
    ) -> bool {
        match outcome {
            Ok(()) => {
                if let Some(sent) = sent {
                    self.tally.add_latency.record(sent.elapsed());
                }
                self.tally.op(op);
                true
            }
            Err((kind, detail)) => {
                self.tally.error(kind, detail);
                false
            }
        }
    }
}

fn memory_summary(pid: u32, samples: &[u64], after_cooldown: Option<u64>) -> Value {
    let first = samples.first().copied();
    let mid = samples.get(samples.len() / 2).copied();
    let last = samples.last().copied();
    json!({
        "pid": pid,
        "samples_kib": samples,
        "samples": samples.len(),
        "first_kib": first,
        "mid_kib": mid,
        "last_kib": last,
        "max_kib": samples.iter().max(),
        "after_cooldown_kib": after_cooldown,
        "growth_second_half_kib": match (mid, last) { (Some(m), Some(l)) => Some(l as i64 - m as i64), _ => None },
    })
}

pub async fn mixed(args: MixedArgs) -> anyhow::Result<()> {
    let targets = Arc::new(Target::parse_all(&args.urls)?);
    let sources = Arc::new(Sources::new(args.source_base, args.source_count)?);
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.duration.max(0.0));

    let pids = args.server_pids.clone();
    let sample_every = Duration::from_millis(args.sample_ms.max(50));
    let sampler = tokio::spawn(async move {
        let mut series: Vec<Vec<u64>> = vec![Vec::new(); pids.len()];
        while Instant::now() < deadline {
            for (pid, s) in pids.iter().zip(series.iter_mut()) {
                if let Some(kib) = rss_kib(*pid) {
                    s.push(kib);
                }
            }
            tokio::time::sleep(sample_every).await;
        }
        series
    });

    let mut handles = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let mut client = Client {
            id,
            targets: targets.clone(),
            sources: sources.clone(),
            rooms: args.rooms.max(1),
            prefix: args.key_prefix.clone(),
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
            tally: Tally::default(),
            cycle: 0,
            seq: 0,
        };
        let (ops, max_ops, think) = (ops.clone(), args.max_ops, args.think_ms);
        handles.push(tokio::spawn(async move {
            let mut http = None;
            let mut joined: Option<Joined> = None;
            while Instant::now() < deadline && ops.fetch_add(1, Ordering::Relaxed) < max_ops {
                let mut current = match joined.take() {
                    Some(j) => j,
                    None => match client.connect().await {
                        Some(j) => j,
                        None => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let keep = client.step(&mut current, &mut http).await;
                client.tally.redundant_syncs += std::mem::take(&mut current.resyncs);
                if keep {
                    joined = Some(current);
                }
                if think > 0 {
                    tokio::time::sleep(Duration::from_millis(client.rng.below(think + 1))).await;
                }
            }
            if let Some(mut j) = joined {
                let _ = tokio::time::timeout(Duration::from_secs(2), j.ws.close(None)).await;
            }
            client.tally
        }));
    }
    let mut tally = Tally::default();
    for handle in handles {
        match handle.await {
            Ok(t) => tally.merge(t),
            Err(err) => tally.error("client_panicked", err),
        }
    }
    let elapsed = started.elapsed();
    let series = sampler.await.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs_f64(args.cooldown.max(0.0))).await;
    let memory: Vec<Value> = args
        .server_pids
        .iter()
        .zip(series.iter())
        .map(|(pid, samples)| memory_summary(*pid, samples, rss_kib(*pid)))
        .collect();
    let errors: u64 = tally.errors.values().sum();
    let total_ops: u64 = tally.ops.values().sum();
    emit(
        json!({
            "scenario": "mixed",
            "instances": targets.len(),
            "clients": args.clients,
            "rooms": args.rooms,
            "duration_s": round3(elapsed.as_secs_f64()),
            "ops": total_ops,
            "ops_per_s": round3(total_ops as f64 / elapsed.as_secs_f64()),
            "op_counts": tally.ops,
            "errors": errors,
            "error_kinds": tally.errors,
            "first_errors": tally.first_errors,
            "redundant_syncs": tally.redundant_syncs,
            "add_echo": tally.add_latency.summary(),
            "http_get": tally.get_latency.summary(),
            "memory": memory,
        }),
        args.label.as_deref(),
    );
    Ok(())
}
