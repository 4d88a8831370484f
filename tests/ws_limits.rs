//! Per-connection limits: server pings and the idle timeout, the bounded
//! outbound queue (a slow consumer is cut off, never buffered without bound),
//! the rooms-per-connection cap — and the room keeps serving everyone else.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::app::{ADMIN_TOKEN, TestServer, WsClient, WsEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// One server → client frame as read off the wire.
#[derive(Debug)]
struct RawFrame {
    at: Duration,
    opcode: u8,
    payload: Vec<u8>,
}

/// A WebSocket client written by hand on a plain TCP socket: it can read what
/// the server sends without ever answering a ping.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
    opened: Instant,
}

impl RawWs {
    async fn connect(s: &TestServer) -> RawWs {
        let mut tcp = TcpStream::connect(s.addr).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            s.addr
        );
        tcp.write_all(request.as_bytes())
            .await
            .expect("write upgrade");
        let mut buf = Vec::new();
        let end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
                .await
                .expect("upgrade reply timed out")
                .expect("read upgrade reply");
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break pos + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        buf.drain(..end);
        RawWs {
            tcp,
            buf,
            opened: Instant::now(),
        }
    }

    /// Sends a masked text frame (clients must mask).
    async fn send_text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.tcp.write_all(&frame).await.expect("write frame");
    }

    /// Reads the next frame; `None` at end of stream (or a reset).
    async fn next_frame(&mut self, deadline: Instant) -> Option<RawFrame> {
        loop {
            if let Some(frame) = self.parse() {
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(left, self.tcp.read(&mut chunk)).await {
                Err(_) => panic!("no frame and no end of stream before the deadline"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn parse(&mut self) -> Option<RawFrame> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        assert_eq!(b[1] & 0x80, 0, "server frames must not be masked");
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
            126 | 127 => return None,
            n => (n as usize, 2),
        };
        if b.len() < header + len {
            return None;
        }
        let opcode = b[0] & 0x0f;
        let payload = b[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some(RawFrame {
            at: self.opened.elapsed(),
            opcode,
            payload,
        })
    }
}

const PING: u8 = 0x9;
const CLOSE: u8 = 0x8;
const TEXT: u8 = 0x1;

async fn active_connections(s: &TestServer) -> u64 {
    let (status, body) = s.get_with_token("/api/admin/stats", ADMIN_TOKEN).await;
    assert_eq!(status, 200, "{body}");
    body["activeConnections"]
        .as_u64()
        .expect("activeConnections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_answers_pings_is_closed_after_the_idle_timeout() {
    let s = TestServer::start(&[("WS_IDLE_TIMEOUT", "2"), ("WS_PING_INTERVAL", "1")]).await;
    // A member that reads (and so answers pings) throughout.
    let mut other = s.ws().await;
    other
        .send(json!({"type": "join", "key": "quiet", "version": 0}))
        .await;
    assert_eq!(other.recv().await["version"], 0);
    let other = spawn_reader(other, 1);

    let mut raw = RawWs::connect(&s).await;
    raw.send_text(r#"{"type":"join","key":"quiet","version":0}"#)
        .await;
    let joined = raw.opened.elapsed();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut frames = Vec::new();
    let close = loop {
        let frame = raw
            .next_frame(deadline)
            .await
            .expect("stream ended without a close frame");
        if frame.opcode == CLOSE {
            break frame;
        }
        frames.push(frame);
    };
    // After the close frame the server drops the connection.
    assert!(
        raw.next_frame(Instant::now() + Duration::from_secs(3))
            .await
            .is_none(),
        "data after the close frame"
    );

    let pings: Vec<&RawFrame> = frames.iter().filter(|f| f.opcode == PING).collect();
    assert!(
        frames.iter().any(|f| f.opcode == TEXT),
        "no sync after join: {frames:?}"
    );
    assert!(
        !pings.is_empty(),
        "the server sent no ping before giving up: {frames:?}"
    );
    assert!(
        close.at >= joined + Duration::from_secs(2),
        "closed after {:?}, before the 2 s idle timeout",
        close.at
    );
    assert!(
        close.at < joined + Duration::from_millis(4500),
        "closed only after {:?}",
        close.at
    );
    assert!(close.payload.len() >= 2, "close frame without a code");
    let code = u16::from_be_bytes([close.payload[0], close.payload[1]]);
    assert!(matches!(code, 1000 | 1001), "idle close code {code}");

    // The room still serves the member that stayed.
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": "quiet", "number": 4}))
        .await;
    assert_eq!(status, 200);
    let (_, versions) = other.await.expect("reader");
    assert_eq!(versions, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_pings_stays_connected() {
    let s = TestServer::start(&[("WS_IDLE_TIMEOUT", "2"), ("WS_PING_INTERVAL", "1")]).await;
    let ws = s.ws().await;
    let mut stream = ws.into_inner();
    stream
        .send(Message::text(
            json!({"type": "join", "key": "alive", "version": 0}).to_string(),
        ))
        .await
        .expect("send");
    // Reading answers pings (tungstenite queues the pong and flushes it on the next read).
    let until = tokio::time::Instant::now() + Duration::from_millis(4500);
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(until, stream.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(Message::Text(_)))) => {}
            Ok(other) => panic!("a responsive client was disconnected: {other:?}"),
        }
    }
    assert!(
        pings >= 3,
        "expected a ping about every second, got {pings}"
    );
    stream
        .send(Message::text(r#"{"type":"ping"}"#))
        .await
        .expect("send");
    let mut ws_pong = None;
    while ws_pong.is_none() {
        match tokio::time::timeout(Duration::from_secs(3), stream.next())
            .await
            .expect("pong")
        {
            Some(Ok(Message::Text(t))) => {
                ws_pong = Some(serde_json::from_str::<Value>(&t).expect("json"))
            }
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ws_pong, Some(json!({"type": "pong"})));
}

/// Reads v2 frames in the background until one with `version >= until` arrives.
fn spawn_reader(ws: WsClient, until: u64) -> tokio::task::JoinHandle<(WsClient, Vec<u64>)> {
    tokio::spawn(async move {
        let mut ws = ws;
        let mut versions = Vec::new();
        loop {
            let frame = ws.recv().await;
            let v = frame["version"]
                .as_u64()
                .unwrap_or_else(|| panic!("frame without version: {frame}"));
            versions.push(v);
            if v >= until {
                return (ws, versions);
            }
        }
    })
}

/// Numbers already in the flooded room. A v1 member gets the whole history with
/// every event (~290 KB here), so a few dozen cheap adds push megabytes at it.
const PREFILL: usize = 100_000;
/// Adds in the flood: enough to fill the kernel's socket buffers on loopback
/// (the server's send buffer grows up to `tcp_wmem` max, 4 MB by default; the
/// client's receive buffer is pinned small) and then the 16-frame queue, with
/// room to spare.
fn flood_adds() -> u64 {
    let send_buffer_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(2)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(4 << 20);
    let frame_bytes = 2 * PREFILL as u64;
    (send_buffer_max / frame_bytes + 16 + 12).max(45)
}

fn slow_consumer_env(
    idle_timeout: &'static str,
    ping_interval: &'static str,
) -> Vec<(&'static str, &'static str)> {
    vec![
        ("WS_QUEUE_CAPACITY", "16"),
        ("MAX_HISTORY", "200000"),
        ("WS_IDLE_TIMEOUT", idle_timeout),
        ("WS_PING_INTERVAL", ping_interval),
    ]
}

/// A room holding `PREFILL` numbers (version 1), and a v2 member that will flood it.
async fn big_room(s: &TestServer, key: &str) -> WsClient {
    let history: Vec<Value> = (0..PREFILL).map(|i| json!(i % 37)).collect();
    let (status, body) = s
        .put(
            &format!("/api/roulette/{key}"),
            &json!({"history": history}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut flooder = s.ws().await;
    flooder
        .send(json!({"type": "join", "key": key, "version": 1}))
        .await;
    assert_eq!(flooder.recv().await["type"], "recovered");
    flooder
}

/// A v1 member on a socket with a small receive buffer; it reads its greeting only.
async fn slow_v1_member(s: &TestServer, key: &str) -> WsClient {
    let mut slow = WsClient::connect_with_recv_buffer(s.addr, 4096).await;
    slow.send(json!({"type": "join", "key": key})).await;
    let sync = slow.recv().await;
    assert_eq!(sync["history"].as_array().map(Vec::len), Some(PREFILL));
    slow
}

/// `flood_adds()` adds, each confirmed by its echo; returns the last version.
async fn flood(flooder: &mut WsClient, key: &str) -> u64 {
    let mut version = 1;
    for i in 0..flood_adds() {
        flooder.send(json!({"type": "add", "number": i % 37})).await;
        let echo = flooder.recv().await;
        assert_eq!(echo["version"], version + 1, "{key}: {echo}");
        version += 1;
    }
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_with_1013_and_the_room_keeps_working() {
    let s = TestServer::start(&slow_consumer_env("30", "20")).await;
    let key = "firehose";
    let mut flooder = big_room(&s, key).await;
    let mut observer = s.ws().await;
    observer
        .send(json!({"type": "join", "key": key, "version": 1}))
        .await;
    assert_eq!(observer.recv().await["type"], "recovered");
    let mut slow = slow_v1_member(&s, key).await;

    // Megabytes for `slow`, which reads nothing meanwhile.
    let adds = flood_adds();
    let reader = spawn_reader(observer, 1 + adds);
    let started = Instant::now();
    let last = flood(&mut flooder, key).await;
    let (mut observer, seen) = reader.await.expect("observer task");
    eprintln!("flooded {adds} adds in {:?}", started.elapsed());
    assert_eq!(
        seen,
        (2..=last).collect::<Vec<_>>(),
        "the reading member missed or reordered events"
    );

    // Now `slow` reads: whatever it got is gap-free (one more number per frame),
    // and then it is either closed with 1013 or brought up to date in one step.
    let final_len = PREFILL + adds as usize;
    let mut len = PREFILL;
    let mut received = 0;
    let outcome = loop {
        match slow.next_within(Duration::from_secs(10)).await {
            WsEvent::Closed(code) => break code,
            WsEvent::Json(frame) => {
                assert_eq!(frame["type"], "sync", "{}", frame["type"]);
                let n = frame["history"].as_array().map(Vec::len).expect("history");
                let resync = n == final_len && n > len + 1;
                assert!(n == len + 1 || resync, "gap: {len} -> {n} numbers");
                len = n;
                received += 1;
                if resync {
                    break None;
                }
            }
        }
    };
    eprintln!("slow consumer: {received} frames then {outcome:?}");
    match outcome {
        Some(code) => {
            assert_eq!(code, 1013, "slow consumer closed with {code}");
            assert!(
                len < final_len,
                "closed with 1013 after receiving everything"
            );
        }
        None => assert!(
            received <= adds as usize,
            "resynced without having fallen behind"
        ),
    }

    // The room still works: the old members and a newcomer get the next event.
    let mut newcomer = s.ws().await;
    newcomer
        .send(json!({"type": "join", "key": key, "version": last}))
        .await;
    assert_eq!(newcomer.recv().await["type"], "recovered");
    flooder.send(json!({"type": "add", "number": "00"})).await;
    let next = json!({"type": "add", "key": key, "number": "00", "version": last + 1});
    assert_eq!(flooder.recv().await, next);
    assert_eq!(observer.recv().await, next);
    assert_eq!(newcomer.recv().await, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_again_is_dropped_after_the_idle_timeout() {
    let s = TestServer::start(&slow_consumer_env("3", "1")).await;
    let key = "stuck";
    let mut flooder = big_room(&s, key).await;
    let slow = slow_v1_member(&s, key).await;
    assert_eq!(active_connections(&s).await, 2);

    // The server's writes to `slow` block once the socket buffers are full; that
    // must not hold the connection (and its queue) forever.
    let started = Instant::now();
    let last = flood(&mut flooder, key).await;
    // The flooder keeps reading (so it answers pings) while we wait.
    let flooder = spawn_reader(flooder, last + 1);
    let deadline = Instant::now() + Duration::from_secs(8);
    while active_connections(&s).await != 1 {
        assert!(
            Instant::now() < deadline,
            "a client that stopped reading is still connected 8 s after the flood"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("dropped {:?} after the flood began", started.elapsed());
    // The one left is the flooder, and the room still delivers to it.
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": key, "number": 1}))
        .await;
    assert_eq!(status, 200);
    let (_, versions) = flooder.await.expect("flooder task");
    assert_eq!(versions.last(), Some(&(last + 1)));
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_may_join_at_most_twenty_rooms_by_default() {
    let s = TestServer::start(&[]).await;
    let mut ws = s.ws().await;
    for i in 0..20 {
        ws.send(json!({"type": "join", "key": format!("room-{i}"), "version": 0}))
            .await;
        let sync = ws.recv().await;
        assert_eq!(sync["type"], "sync", "join {i}: {sync}");
    }
    // The 21st is refused; the connection stays open and keeps its 20 rooms.
    ws.send(json!({"type": "join", "key": "room-20", "version": 0}))
        .await;
    let refused = ws.recv().await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "too_many_rooms", "{refused}");
    // Same for the seed dialect's implicit joins.
    ws.send(json!({"type": "getHistory", "key": "room-21"}))
        .await;
    assert_eq!(ws.recv().await["type"], "error");
    ws.send(json!({"type": "saveNumber", "key": "room-22", "number": 3}))
        .await;
    assert_eq!(ws.recv().await["type"], "error");
    let (_, version) = s.room("room-22").await;
    assert_eq!(version, 0, "a refused saveNumber was applied");

    // Re-joining a room it already has is not a 21st room.
    ws.send(json!({"type": "join", "key": "room-0", "version": 0}))
        .await;
    assert_eq!(ws.recv().await["type"], "sync");
    // Not subscribed to the refused room...
    let (status, _) = s
        .post(
            "/api/roulette/save",
            &json!({"key": "room-20", "number": 9}),
        )
        .await;
    assert_eq!(status, 200);
    // ...but still to the others.
    let (status, _) = s
        .post(
            "/api/roulette/save",
            &json!({"key": "room-19", "number": 8}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "room-19", "number": 8, "version": 1})
    );

    // Leaving one frees a slot.
    ws.send(json!({"type": "leave", "key": "room-3"})).await;
    ws.send(json!({"type": "join", "key": "room-20", "version": 0}))
        .await;
    let sync = ws.recv().await;
    assert_eq!(sync["type"], "sync", "{sync}");
    assert_eq!(sync["key"], "room-20");
    assert_eq!(sync["history"], json!([9]));
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_max_rooms_is_configurable() {
    let s = TestServer::start(&[("WS_MAX_ROOMS", "2")]).await;
    let mut ws = s.ws().await;
    for key in ["a", "b"] {
        ws.send(json!({"type": "join", "key": key})).await;
        assert_eq!(ws.recv().await["type"], "sync");
    }
    ws.send(json!({"type": "join", "key": "c"})).await;
    assert_eq!(ws.recv().await["code"], "too_many_rooms");
    // Another connection has its own allowance.
    let mut other = s.ws().await;
    other.send(json!({"type": "join", "key": "c"})).await;
    assert_eq!(other.recv().await["type"], "sync");
}
