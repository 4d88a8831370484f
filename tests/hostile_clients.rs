//! Attacks by hostile clients on rooms, writes and sockets, each performed for
//! real against the binary on loopback: the attack is refused, the store is
//! unchanged by it, memory stays bounded and the instance keeps serving.

mod support;

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::app::{TestServer, WsClient, WsEvent, encode};
use support::cluster::TestCluster;

/// The production defaults of the per-client quotas (an empty value means
/// "unset" to the server), overriding the harness's load-test quotas.
const DEFAULT_QUOTAS: &[(&str, &str)] = &[
    ("WRITE_RATE_LIMIT", ""),
    ("WRITE_RATE_BURST", ""),
    ("ROOM_CREATE_LIMIT", ""),
    ("WS_MAX_PER_CLIENT", ""),
];

const QUIET: Duration = Duration::from_millis(400);

/// Joins `key` without a token in each dialect: v2 `join` with a version, v1
/// `join` without one, and the seed document's `getHistory`.
async fn open_members(url: &str, key: &str) -> [WsClient; 3] {
    let mut v2 = WsClient::connect(url).await;
    v2.send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    assert_eq!(v2.recv().await["type"], "sync");
    let mut v1 = WsClient::connect(url).await;
    v1.send(json!({"type": "join", "key": key})).await;
    assert_eq!(v1.recv().await["type"], "sync");
    let mut seed = WsClient::connect(url).await;
    seed.send(json!({"type": "getHistory", "key": key})).await;
    assert_eq!(seed.recv().await["type"], "historyUpdate");
    [v2, v1, seed]
}

/// Each member is told it was removed, in its dialect.
async fn expect_removed(members: &mut [WsClient; 3], key: &str) {
    let [v2, v1, seed] = members;
    let told = v2.recv().await;
    assert_eq!(told["type"], "authRequired", "v2: {told}");
    assert_eq!(told["key"], key);
    for (name, member) in [("v1", v1), ("seed", seed)] {
        let told = member.recv().await;
        assert_eq!(told["type"], "error", "{name}: {told}");
        assert_eq!(told["code"], "auth_required", "{name}: {told}");
    }
}

/// Every removed member tries to write in its own dialect; none succeeds.
async fn removed_members_cannot_write(members: &mut [WsClient; 3], key: &str) {
    let [v2, v1, seed] = members;
    v2.send(json!({"type": "add", "key": key, "number": 1}))
        .await;
    let refused = v2.recv().await;
    assert_eq!(refused["code"], "not_joined", "v2 add: {refused}");
    v2.send(json!({"type": "update", "history": [1, 2]})).await;
    assert_eq!(v2.recv().await["code"], "not_joined");
    v1.send(json!({"type": "remove", "key": key, "index": 0}))
        .await;
    assert_eq!(v1.recv().await["code"], "not_joined");
    seed.send(json!({"type": "saveNumber", "key": key, "number": 3}))
        .await;
    let refused = seed.recv().await;
    assert_eq!(
        refused["type"], "authRequired",
        "seed saveNumber: {refused}"
    );
}

async fn expect_silence_all(members: &mut [WsClient; 3]) {
    for member in members.iter_mut() {
        member.expect_silence(QUIET).await;
    }
}

async fn post_with_token(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let mut request = server.http.post(server.url(path)).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    support::app::decode(request.send().await.expect("request")).await
}

#[tokio::test]
async fn protecting_a_room_removes_every_open_member_in_every_dialect() {
    let server = TestServer::start(&[]).await;
    let key = "table-protected-later";
    let mut members = open_members(&server.ws_url(), key).await;

    let token = server.token(key, "s3cret-password").await;
    expect_removed(&mut members, key).await;

    // A member admitted with the token re-joins with a forged one: the refused
    // re-join must not leave its old membership behind.
    let mut rejoiner = server.ws().await;
    rejoiner
        .send(json!({"type": "join", "key": key, "version": 0, "token": token}))
        .await;
    assert_eq!(rejoiner.recv().await["type"], "sync");
    rejoiner
        .send(json!({"type": "join", "key": key, "version": 0, "token": "forged"}))
        .await;
    assert_eq!(rejoiner.recv().await["type"], "authRequired");

    removed_members_cannot_write(&mut members, key).await;
    let (status, _) = server
        .post("/api/roulette/save", &json!({"key": key, "number": 9}))
        .await;
    assert_eq!(status, 401, "a write without the token is refused");

    // The owner writes; nobody who was removed hears of it.
    let (status, body) = post_with_token(
        &server,
        "/api/roulette/save",
        Some(&token),
        &json!({"key": key, "number": 17}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    expect_silence_all(&mut members).await;
    rejoiner.expect_silence(QUIET).await;

    let (status, body) = server
        .get_with_token(&format!("/api/roulette/{}", encode(key)), &token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["history"],
        json!([17]),
        "only the owner's write landed"
    );
    server.assert_healthy().await;
}

#[tokio::test]
async fn a_member_that_joined_with_a_token_stays() {
    let server = TestServer::start(&[]).await;
    let key = "table-with-owner";
    let token = server.token(key, "pw-of-the-owner").await;
    let mut owner = server.ws().await;
    owner
        .send(json!({"type": "join", "key": key, "version": 0, "token": token}))
        .await;
    assert_eq!(owner.recv().await["type"], "sync");
    owner.send(json!({"type": "add", "number": 4})).await;
    let event = owner.recv().await;
    assert_eq!(
        (event["type"].clone(), event["number"].clone()),
        (json!("add"), json!(4))
    );
    server.assert_healthy().await;
}

#[tokio::test]
async fn protection_reaches_members_on_every_instance() {
    let cluster = TestCluster::start(2, &[]).await;
    let (first, second) = (&cluster.instances[0], &cluster.instances[1]);
    let key = "table-across-instances";
    let mut members = open_members(&second.ws_url(), key).await;
    let mut local = open_members(&first.ws_url(), key).await;

    let token = first.token(key, "cluster-password").await;
    expect_removed(&mut members, key).await;
    expect_removed(&mut local, key).await;
    removed_members_cannot_write(&mut members, key).await;

    let (status, _) = post_with_token(
        &cluster.instances[1],
        "/api/roulette/save",
        Some(&token),
        &json!({"key": key, "number": 22}),
    )
    .await;
    assert_eq!(status, 200);
    expect_silence_all(&mut members).await;
    expect_silence_all(&mut local).await;
    let stored = cluster.db_room(key).await.expect("room stored");
    assert_eq!(stored.0, json!([22]), "only the owner's write is stored");
    first.assert_healthy().await;
    second.assert_healthy().await;
}

#[tokio::test]
async fn writes_and_new_rooms_are_limited_per_client() {
    let server = TestServer::start(DEFAULT_QUOTAS).await;
    let key = "busy-table";
    let mut acked = 0;
    let mut limited = 0;
    for n in 0..60 {
        let response = server
            .http
            .post(server.url("/api/roulette/save"))
            .json(&json!({"key": key, "number": n % 37}))
            .send()
            .await
            .expect("save");
        match response.status().as_u16() {
            200 => acked += 1,
            429 => {
                limited += 1;
                let retry: u64 = response.headers()["retry-after"]
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("Retry-After in seconds");
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                let body: Value = response.json().await.expect("JSON error body");
                assert_eq!(body["success"], false);
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(limited > 0, "60 saves at once must meet the write quota");
    let (history, _) = server.room(key).await;
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(acked),
        "stored == acknowledged"
    );

    // New rooms: a few dozen a minute per address. Paced below the write
    // quota (10 a second), after its burst has refilled, so that only the
    // room quota can refuse them.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let mut created = 0;
    for i in 0..45 {
        let (status, reply) = server
            .put(
                &format!("/api/roulette/new-room-{i}"),
                &json!({"history": [1]}),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(110)).await;
        match status {
            200 => created += 1,
            429 => {}
            other => panic!("unexpected {other}: {reply}"),
        }
    }
    assert!(
        (25..=40).contains(&created),
        "{created} rooms created of 45"
    );
    let (_, listing) = server.get("/api/roulette/sessions?limit=1000").await;
    assert_eq!(
        listing["total"],
        json!(created + 1),
        "refused rooms do not exist"
    );

    // Another address is not affected.
    let (status, _) = {
        let client = reqwest::Client::builder()
            .local_address(IpAddr::from([127, 0, 0, 2]))
            .build()
            .expect("client");
        let response = client
            .post(server.url("/api/roulette/save"))
            .json(&json!({"key": "other-client", "number": 1}))
            .send()
            .await
            .expect("save");
        (response.status().as_u16(), ())
    };
    assert_eq!(status, 200);
    server.assert_healthy().await;
}

#[tokio::test]
async fn websocket_writes_share_the_client_quota() {
    let server = TestServer::start(DEFAULT_QUOTAS).await;
    let key = "ws-burst";
    let mut ws = server.ws().await;
    ws.send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    assert_eq!(ws.recv().await["type"], "sync");
    for n in 0..60 {
        ws.send(json!({"type": "add", "number": n % 37})).await;
    }
    let (mut added, mut limited) = (0, 0);
    while added + limited < 60 {
        let frame = ws.recv().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("add"), _) => added += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert!(limited > 0, "a burst of 60 adds meets the write quota");
    let (history, version) = server.room(key).await;
    assert_eq!(history.as_array().map(Vec::len), Some(added));
    assert_eq!(version as usize, added);
    server.assert_healthy().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_socket() {
    let server = TestServer::start(&[("WS_MAX_PER_CLIENT", "5")]).await;
    let url = server.ws_url();
    let here = IpAddr::from([127, 0, 0, 1]);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(
            WsClient::connect_from(&url, here)
                .await
                .expect("within the cap"),
        );
    }
    for _ in 0..20 {
        match WsClient::connect_from(&url, here).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429);
                let body: Value =
                    serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                        .expect("JSON error body");
                assert_eq!(body["success"], false);
            }
            Err(other) => panic!("refused without an HTTP answer: {other}"),
            Ok(_) => panic!("a sixth socket from one address was accepted"),
        }
    }
    // Another client is still served, and a slot comes back when one closes.
    let mut other = WsClient::connect_from(&url, IpAddr::from([127, 0, 0, 3]))
        .await
        .expect("another address");
    other.send(json!({"type": "ping"})).await;
    assert_eq!(other.recv().await["type"], "pong");
    held.pop().expect("held").close().await;
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ws) = WsClient::connect_from(&url, here).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a freed slot can be taken again");
    server.assert_healthy().await;
}

#[tokio::test]
async fn clients_that_never_read_are_bounded_by_bytes() {
    let server = TestServer::start(&[
        ("WS_QUEUE_BYTES", "262144"),
        ("WS_IDLE_TIMEOUT", "3"),
        ("WS_PING_INTERVAL", "1"),
    ])
    .await;
    let key = "slow-readers";
    let history: Vec<u8> = (0..9_000).map(|i| (i % 37) as u8).collect();
    let (status, _) = server
        .put(
            &format!("/api/roulette/{key}"),
            &json!({"history": history}),
        )
        .await;
    assert_eq!(status, 200);
    let mut sleepers = Vec::new();
    for _ in 0..5 {
        // v1 members get the whole history with every event: the largest frames.
        let mut ws = server.ws().await;
        ws.send(json!({"type": "join", "key": key})).await;
        sleepers.push(ws);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle = server.rss_kib();
    // 400 adds → 400 frames of ~25 KB for each of the five: 50 MB if queued.
    for n in 0..400 {
        let (status, _) = server
            .post("/api/roulette/save", &json!({"key": key, "number": n % 37}))
            .await;
        assert_eq!(status, 200, "save {n}");
    }
    let peak = server.rss_kib();
    eprintln!("five clients that never read: RSS {idle} KiB before, {peak} KiB after 400 events");
    assert!(
        peak < idle + 64 * 1024,
        "RSS {idle} KiB → {peak} KiB with five clients that never read"
    );
    // They were dropped (1013, then cut off when they did not read it).
    let mut gone = false;
    for _ in 0..100 {
        let (_, text) = metrics(&server).await;
        if gauge(&text, "croupier_ws_connections") == Some(0.0) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "slow readers are closed");
    let (history, _) = server.room(key).await;
    assert_eq!(
        history.as_array().map(Vec::len),
        Some(9_400),
        "every save landed"
    );
    drop(sleepers);
    server.assert_healthy().await;
}

async fn metrics(server: &TestServer) -> (u16, String) {
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    (
        response.status().as_u16(),
        response.text().await.expect("metrics text"),
    )
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn reads_of_many_rooms_follow_only_a_bounded_number() {
    let server = TestServer::start(&[("MAX_READ_ROOMS", "20")]).await;
    for i in 0..120 {
        let (status, _) = server
            .post(
                "/api/roulette/save",
                &json!({"key": format!("read-{i}"), "number": 1}),
            )
            .await;
        assert_eq!(status, 200);
    }
    for i in 0..120 {
        let (history, _) = server.room(&format!("read-{i}")).await;
        assert_eq!(history, json!([1]));
    }
    let (_, text) = metrics(&server).await;
    let active = gauge(&text, "croupier_rooms_active").expect("rooms gauge");
    assert!(active <= 20.0, "{active} rooms followed, bound 20");
    server.assert_healthy().await;
}

#[tokio::test]
async fn listings_with_histories_are_bounded() {
    let server = TestServer::start(&[]).await;
    let history: Vec<u8> = (0..10_000).map(|i| (i % 37) as u8).collect();
    let body = json!({"history": history});
    for i in 0..300 {
        let (status, _) = server.put(&format!("/api/roulette/long-{i}"), &body).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    for _ in 0..10 {
        let (status, reply) = server
            .get("/api/roulette/sessions?limit=1000&include=history")
            .await;
        assert_eq!(status, 400, "{reply}");
        assert!(
            reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("at most 20")),
            "{reply}"
        );
    }
    for page in 0..15 {
        let (status, reply) = server
            .get(&format!(
                "/api/roulette/sessions?include=history&offset={}",
                page * 20
            ))
            .await;
        assert_eq!(status, 200);
        let sessions = reply["sessions"].as_array().expect("sessions");
        assert_eq!(sessions.len(), 20);
        assert!(
            sessions
                .iter()
                .all(|s| s["history"].as_array().map(Vec::len) == Some(10_000))
        );
        assert_eq!(reply["total"], 300);
    }
    let after = server.rss_kib();
    eprintln!("listing 300 rooms of 10,000 numbers: RSS {before} KiB before, {after} KiB after");
    assert!(
        after < before + 64 * 1024,
        "RSS {before} KiB → {after} KiB after paging every history"
    );
    // An offset beyond what SQLite takes is refused instead of wrapping to page 1.
    let (status, reply) = server
        .get("/api/roulette/sessions?offset=9223372036854775808")
        .await;
    assert_eq!(status, 400, "{reply}");
    let (status, reply) = server
        .get("/api/roulette/sessions?offset=9223372036854775807")
        .await;
    assert_eq!(status, 200);
    assert_eq!(reply["sessions"], json!([]));
    server.assert_healthy().await;
}

/// A WebSocket handshake on a raw TCP stream, then raw frames.
mod raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub async fn handshake(addr: std::net::SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.expect("handshake reply");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        tcp
    }

    /// A frame as a client sends it (masked unless `masked` is false).
    pub fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut out = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
        if masked {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// The close code of the first close frame the server sends.
    pub async fn close_code(tcp: &mut TcpStream) -> Option<u16> {
        let read = async {
            loop {
                let mut head = [0u8; 2];
                tcp.read_exact(&mut head).await.ok()?;
                let len = (head[1] & 0x7f) as usize;
                let mut payload = vec![0u8; len];
                tcp.read_exact(&mut payload).await.ok()?;
                if head[0] & 0x0f == 0x8 {
                    return (len >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .expect("the server neither closed nor answered")
    }
}

#[tokio::test]
async fn protocol_violations_close_with_their_codes() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start(&[]).await;
    let cases: [(&str, Vec<u8>, u16); 4] = [
        (
            "invalid UTF-8 in a text frame",
            raw::frame(0x81, &[0xff, 0xfe, 0xfd], true),
            1007,
        ),
        (
            "an unmasked client frame",
            raw::frame(0x81, b"{}", false),
            1002,
        ),
        ("a reserved opcode", raw::frame(0x83, b"{}", true), 1002),
        ("a fragmented ping", raw::frame(0x09, b"", true), 1002),
    ];
    for (what, bytes, code) in cases {
        let mut tcp = raw::handshake(server.addr).await;
        tcp.write_all(&bytes).await.expect("write frame");
        assert_eq!(raw::close_code(&mut tcp).await, Some(code), "{what}");
    }
    // A well-behaved client on the same instance is unaffected.
    let mut ws = server.ws().await;
    ws.send(json!({"type": "ping"})).await;
    match ws.next_within(Duration::from_secs(5)).await {
        WsEvent::Json(pong) => assert_eq!(pong["type"], "pong"),
        WsEvent::Closed(code) => panic!("closed {code:?}"),
    }
    server.assert_healthy().await;
}
