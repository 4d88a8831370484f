//! Hostile clients at the transport: stalled heads (slowloris), idle
//! keep-alive connections, trickled bodies, one address opening too many
//! connections, and requests hyper cannot parse. Each attack runs for real on
//! loopback at a small configured cap; each test asserts the refusal, that the
//! store is unchanged, and that the instance still answers other clients.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::app::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The harness's own client talks from 127.0.0.1; attackers and bystanders get
/// addresses of their own so the per-address counts are exact.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .expect("bind source address");
    socket.connect(to).await.expect("connect")
}

/// What the server did with a connection within `wait`.
#[derive(Debug, PartialEq)]
enum Fate {
    /// Still open, nothing received.
    Open,
    /// Closed (possibly after a reply); the reply text, if any.
    Closed(String),
}

async fn fate(stream: &mut TcpStream, wait: Duration) -> Fate {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) if received.is_empty() => return Fate::Open,
            Err(_) => panic!(
                "a reply without a close: {}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Fate::Closed(String::from_utf8_lossy(&received).into_owned());
            }
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends `request` on a fresh connection and reads the reply until the server
/// closes: (status, JSON body).
async fn raw_exchange(to: SocketAddr, request: &[u8]) -> (u16, Value) {
    let mut stream = TcpStream::connect(to).await.expect("connect");
    stream.write_all(request).await.expect("send");
    match fate(&mut stream, Duration::from_secs(10)).await {
        Fate::Closed(reply) => parse_reply(&reply),
        Fate::Open => panic!("no reply within 10 s"),
    }
}

fn parse_reply(reply: &str) -> (u16, Value) {
    let status = reply
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"));
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let body = serde_json::from_str(body)
        .unwrap_or_else(|_| panic!("reply {status} has a non-JSON body: {reply:?}"));
    (status, body)
}

fn assert_error_body(body: &Value, context: &str) {
    assert_eq!(body["success"], json!(false), "{context}: {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{context}: {body}"
    );
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the server's descriptors")
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A client that talks from `from`, never reusing the harness's connections.
fn client_from(from: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::V4(from))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

/// `/health` and a room read from `from` answer, each within a generous
/// bound; returns the slower of the two latencies.
async fn still_serves(s: &TestServer, from: Ipv4Addr, key: &str) -> Duration {
    let http = client_from(from);
    let mut slowest = Duration::ZERO;
    for path in ["/health".to_owned(), format!("/api/roulette/{key}")] {
        let started = Instant::now();
        let reply = http.get(s.url(&path)).send().await;
        let took = started.elapsed();
        let reply = reply.unwrap_or_else(|e| panic!("{path} from {from} failed: {e}"));
        assert_eq!(reply.status(), 200, "{path} from {from}");
        assert!(took < Duration::from_secs(2), "{path} took {took:?}");
        slowest = slowest.max(took);
    }
    slowest
}

async fn assert_room_untouched(s: &TestServer, key: &str) {
    let (history, version) = s.room(key).await;
    assert_eq!((history, version), (json!([]), 0), "room {key} was changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_heads_are_capped_per_address_and_closed_after_the_header_timeout() {
    const CAP: usize = 100;
    const ATTACK: usize = 300;
    let s = TestServer::start(&[
        ("HTTP_HEADER_TIMEOUT", "3"),
        ("HTTP_MAX_CONNECTIONS_PER_IP", &CAP.to_string()),
        ("HTTP_MAX_CONNECTIONS", "1000"),
        ("WS_MAX_CONNECTIONS", "100"),
    ])
    .await;
    let baseline = open_fds(s.pid());

    // Each sends half a save and stalls.
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..ATTACK {
        let mut stream = connect_from(ATTACKER, s.addr).await;
        // A refused socket may already be closed; that is fine.
        let _ = stream
            .write_all(b"POST /api/roulette/save HTTP/1.1\r\nHost: x\r\nContent-Ty")
            .await;
        stalled.push(stream);
    }
    let outcomes = futures_util::future::join_all(
        stalled
            .iter_mut()
            .map(|st| fate(st, Duration::from_millis(1500))),
    )
    .await;
    let open = outcomes.iter().filter(|f| **f == Fate::Open).count();
    assert_eq!(open, CAP, "connections held from one address");
    for refused in outcomes.iter().filter(|f| **f != Fate::Open) {
        if let Fate::Closed(reply) = refused
            && !reply.is_empty()
        {
            assert!(reply.starts_with("HTTP/1.1 503"), "{reply:?}");
        }
    }
    let during = open_fds(s.pid());
    assert!(
        during <= baseline + CAP + 10,
        "{during} descriptors open during the attack (baseline {baseline})"
    );

    // Meanwhile another client is served at once.
    let latency = still_serves(&s, BYSTANDER, "flood").await;
    eprintln!(
        "descriptors: {baseline} idle, {during} under {ATTACK} stalled heads; RSS {} KiB; \
         /health and a read from another address: slowest {latency:?}",
        rss_kib(s.pid())
    );

    // The held ones are closed once their heads are overdue.
    let closed = futures_util::future::join_all(
        stalled
            .iter_mut()
            .map(|st| fate(st, Duration::from_secs(10))),
    )
    .await;
    assert!(
        closed.iter().all(|f| *f == Fate::Closed(String::new())),
        "a stalled head was kept past the header timeout or answered"
    );
    eprintln!(
        "all stalled heads closed {:?} after the attack began",
        started.elapsed()
    );
    let after = open_fds(s.pid());
    assert!(after <= baseline + 5, "{after} descriptors left open");
    assert_room_untouched(&s, "flood").await;
    still_serves(&s, ATTACKER, "flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_instance_cap_refuses_with_json_and_frees_up() {
    let s = TestServer::start(&[
        ("HTTP_HEADER_TIMEOUT", "3"),
        ("HTTP_MAX_CONNECTIONS", "40"),
        ("HTTP_MAX_CONNECTIONS_PER_IP", "30"),
        ("WS_MAX_CONNECTIONS", "10"),
    ])
    .await;
    // The harness's pooled connection counts too; fill what is left from two
    // addresses, silently (no bytes sent, so a refusal closes cleanly).
    let mut held = Vec::new();
    for from in [ATTACKER, BYSTANDER] {
        for _ in 0..30 {
            held.push(connect_from(from, s.addr).await);
        }
    }
    let outcomes =
        futures_util::future::join_all(held.iter_mut().map(|st| fate(st, Duration::from_secs(1))))
            .await;
    let open = outcomes.iter().filter(|f| **f == Fate::Open).count();
    assert!((38..=40).contains(&open), "{open} connections held, cap 40");
    let refusals: Vec<&String> = outcomes
        .iter()
        .filter_map(|f| match f {
            Fate::Closed(reply) => Some(reply),
            Fate::Open => None,
        })
        .collect();
    assert!(refusals.len() >= 20);
    for reply in refusals {
        let (status, body) = parse_reply(reply);
        assert_eq!(status, 503, "{reply}");
        assert_error_body(&body, "instance cap");
    }
    // Once the header timeout clears them, everyone is served again.
    for stream in held.iter_mut() {
        assert_ne!(fate(stream, Duration::from_secs(10)).await, Fate::Open);
    }
    still_serves(&s, Ipv4Addr::new(127, 0, 0, 4), "any").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_cap_is_refused_while_another_is_served() {
    const CAP: usize = 20;
    let s = TestServer::start(&[("HTTP_MAX_CONNECTIONS_PER_IP", &CAP.to_string())]).await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut stream = connect_from(ATTACKER, s.addr).await;
        // Kept alive after a real request: a well-formed but greedy client.
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut reply = [0u8; 1024];
        let n = stream.read(&mut reply).await.expect("reply");
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let mut over = connect_from(ATTACKER, s.addr).await;
    match fate(&mut over, Duration::from_secs(5)).await {
        Fate::Closed(reply) => {
            let (status, body) = parse_reply(&reply);
            assert_eq!(status, 503);
            assert_error_body(&body, "per-address cap");
        }
        Fate::Open => panic!("connection {} from one address was kept", CAP + 1),
    }
    still_serves(&s, BYSTANDER, "any").await;
    // The held ones were not disturbed.
    for stream in held.iter_mut() {
        assert_eq!(fate(stream, Duration::from_millis(50)).await, Fate::Open);
    }
    drop(held);
    // Their slots come back when they close.
    let freed = async {
        loop {
            let mut again = connect_from(ATTACKER, s.addr).await;
            if fate(&mut again, Duration::from_millis(300)).await == Fate::Open {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), freed)
        .await
        .expect("slots of closed connections were not given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    // A head timeout longer than the idle one: only the idle timer can close it.
    let s = TestServer::start(&[("HTTP_IDLE_TIMEOUT", "2"), ("HTTP_HEADER_TIMEOUT", "30")]).await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    for _ in 0..2 {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut reply = [0u8; 1024];
        let n = stream.read(&mut reply).await.expect("reply");
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"), "kept alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let idle_from = Instant::now();
    assert_eq!(
        fate(&mut stream, Duration::from_secs(10)).await,
        Fate::Closed(String::new()),
        "idle connection kept open"
    );
    eprintln!("idle connection closed after {:?}", idle_from.elapsed());
    still_serves(&s, BYSTANDER, "any").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_outlives_the_header_timeout_between_requests() {
    let s = TestServer::start(&[("HTTP_IDLE_TIMEOUT", "20"), ("HTTP_HEADER_TIMEOUT", "1")]).await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    for _ in 0..2 {
        stream
            .write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("send");
        let mut reply = [0u8; 1024];
        let n = stream.read(&mut reply).await.expect("reply");
        assert!(
            reply[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&reply[..n])
        );
        // Longer than the header timeout, well inside the idle one.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_its_responses_is_cut_off_after_the_idle_timeout() {
    const PIPELINED: usize = 500;
    let s = TestServer::start(&[("HTTP_IDLE_TIMEOUT", "2")]).await;
    let history: Vec<u64> = (0..10_000).map(|i| i % 37).collect();
    let (status, body) = s
        .put("/api/roulette/big", &json!({"history": history}))
        .await;
    assert_eq!(status, 200, "{body}");

    // Asks for ~20 MB of replies and reads none: the socket buffers fill
    // after a few of them and the server's writes stall.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(s.addr).await.expect("connect");
    let request = b"GET /api/roulette/big HTTP/1.1\r\nHost: x\r\n\r\n".repeat(PIPELINED);
    stream.write_all(&request).await.expect("send");
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Draining now finds the connection already closed, far short of the end.
    let mut received = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = stream.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection was not closed");
    let replies = received
        .windows(12)
        .filter(|w| *w == b"HTTP/1.1 200")
        .count();
    eprintln!("a non-reading client got {replies} of {PIPELINED} replies before the cut");
    assert!(
        replies < PIPELINED / 2,
        "{replies} replies: the writes never stalled"
    );
    still_serves(&s, BYSTANDER, "big").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_answered_408_and_stores_nothing() {
    let s = TestServer::start(&[("HTTP_BODY_TIMEOUT", "2")]).await;
    let body = br#"{"key": "trickle", "number": 7}"#;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let head = format!(
        "POST /api/roulette/save HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len() + 1000
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    // One byte every 200 ms: never silent long enough for an inactivity timer.
    let started = Instant::now();
    let trickle = async {
        for byte in body.iter().cycle() {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(4), trickle).await;
    let reply = match fate(&mut stream, Duration::from_secs(10)).await {
        Fate::Closed(reply) => reply,
        Fate::Open => panic!("a trickled body kept its connection past the body timeout"),
    };
    let (status, json) = parse_reply(&reply);
    assert_eq!(status, 408, "{reply}");
    assert_error_body(&json, "body timeout");
    eprintln!(
        "trickled body refused, closed {:?} after its head",
        started.elapsed()
    );
    assert_room_untouched(&s, "trickle").await;
    still_serves(&s, BYSTANDER, "trickle").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_websocket_outlives_the_http_timeouts_and_counts_against_the_cap() {
    let s = TestServer::start(&[
        ("HTTP_IDLE_TIMEOUT", "1"),
        ("HTTP_HEADER_TIMEOUT", "1"),
        ("HTTP_MAX_CONNECTIONS", "4"),
        ("WS_MAX_CONNECTIONS", "3"),
    ])
    .await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let mut ws = s.ws().await;
        ws.send(json!({"type": "join", "key": "lasting", "version": 0}))
            .await;
        assert_eq!(ws.recv().await["type"], "sync");
        sockets.push(ws);
    }
    // Silent past both HTTP timeouts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ws in sockets.iter_mut() {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.recv().await, json!({"type": "pong"}));
    }
    // Three WebSockets and the harness's idle pool (closed by now) leave one
    // slot of four: one more connection is held, the next is refused.
    let mut fourth = connect_from(ATTACKER, s.addr).await;
    let mut fifth = connect_from(ATTACKER, s.addr).await;
    assert_eq!(
        fate(&mut fourth, Duration::from_millis(300)).await,
        Fate::Open
    );
    match fate(&mut fifth, Duration::from_secs(5)).await {
        Fate::Closed(reply) => assert_eq!(parse_reply(&reply).0, 503),
        Fate::Open => panic!("a fifth connection was admitted with a cap of four"),
    }
    drop((fourth, fifth));
    for ws in sockets.iter_mut() {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.recv().await, json!({"type": "pong"}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_by_the_http_layer_carry_the_json_error_body() {
    let s = TestServer::start(&[]).await;
    let headers = |n: usize| -> String { (0..n).map(|i| format!("X-Filler-{i}: a\r\n")).collect() };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("garbage request line", b"HELLO THERE\r\n\r\n".to_vec(), 400),
        (
            "bad header",
            b"GET /health HTTP/1.1\r\nHost x\r\n\r\n".to_vec(),
            400,
        ),
        (
            "URL over the limit",
            format!(
                "GET /api/roulette/{} HTTP/1.1\r\nHost: x\r\n\r\n",
                "k".repeat(9_000)
            )
            .into_bytes(),
            414,
        ),
        (
            "too many headers (router)",
            format!("GET /health HTTP/1.1\r\nHost: x\r\n{}\r\n", headers(150)).into_bytes(),
            431,
        ),
        (
            "too many headers (hyper)",
            format!("GET /health HTTP/1.1\r\nHost: x\r\n{}\r\n", headers(400)).into_bytes(),
            431,
        ),
        (
            "head too large (router)",
            format!(
                "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
                "b".repeat(40_000)
            )
            .into_bytes(),
            431,
        ),
    ];
    for (what, request, expected) in cases {
        let (status, body) = raw_exchange(s.addr, &request).await;
        assert_eq!(status, expected, "{what}: {body}");
        assert_error_body(&body, what);
    }
    still_serves(&s, BYSTANDER, "any").await;
}
