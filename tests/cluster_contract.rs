//! The wire contract through Nginx in front of a three-instance cluster
//! (`tests/support/cluster.rs`): the HTTP API, the WebSocket dialects, TLS and
//! the admin API, each answered the same whichever instance serves a request.
//! The tables are the ones `tests/conformance.rs` runs against one embedded
//! instance (`tests/support/contract.rs`). Each test starts its own cluster.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::app::{WsClient, assert_shape, eventually};
use support::cluster::{JWT_SECRET, TestCluster};
use support::contract::{
    DialectRow, Dialects, Sender, error_body, room_path, room_reply, row, run_rows, saved,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_contract_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let s = cluster.front();
    let save = "/api/roulette/save";
    #[rustfmt::skip]
    let rows = vec![
        row("unknown room reads as empty", Method::GET, &room_path("t1"), None, 200, json!({"key": "t1", "history": [], "version": 0})),
        row("save creates the room", Method::POST, save, Some(json!({"key": "t1", "number": 17})), 200, saved("t1", json!([17]), 1, false)),
        row("save appends \"00\"", Method::POST, save, Some(json!({"key": "t1", "number": "00"})), 200, saved("t1", json!([17, "00"]), 2, false)),
        row("integral float", Method::POST, save, Some(json!({"key": "t1", "number": 15.0})), 200, saved("t1", json!([17, "00", 15]), 3, false)),
        row("GET an existing room", Method::GET, &room_path("t1"), None, 200, room_reply("t1", json!([17, "00", 15]), 3)),
        row("PUT replaces; the path key wins", Method::PUT, &room_path("t1"), Some(json!({"key": "other", "history": [36, "00"]})), 200, saved("t1", json!([36, "00"]), 4, false)),
        row("the body key was ignored", Method::GET, &room_path("other"), None, 200, json!({"key": "other", "history": [], "version": 0})),
        row("PUT creates a missing room", Method::PUT, &room_path("t2"), Some(json!({"history": [1, 2]})), 200, saved("t2", json!([1, 2]), 1, false)),
        row("Cyrillic key", Method::POST, save, Some(json!({"key": "Рулетка", "number": 36})), 200, saved("Рулетка", json!([36]), 1, false)),
        row("Cyrillic key, read", Method::GET, &room_path("Рулетка"), None, 200, room_reply("Рулетка", json!([36]), 1)),
        row("invalid number", Method::POST, save, Some(json!({"key": "t1", "number": 37})), 400, error_body()),
        row("unknown API route", Method::GET, "/api/nope", None, 404, error_body()),
        row("unknown route outside /api (answered by Nginx)", Method::GET, "/nope", None, 404, error_body()),
        row("metrics are not served through the balancer", Method::GET, "/metrics", None, 404, error_body()),
        row("wrong method on a room", Method::DELETE, &room_path("t1"), None, 405, error_body()),
        row("sessions list", Method::GET, "/api/roulette/sessions?limit=2", None, 200, json!({"sessions": "<array>", "total": 3})),
    ];
    let replies = run_rows(&s, rows).await;
    let listed: Vec<&Value> = replies[15]["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .collect();
    assert_eq!(listed.len(), 2, "limit=2: {}", replies[15]);
    assert_eq!(
        listed[0]["key"], "Рулетка",
        "newest activity first: {}",
        replies[15]
    );
    assert_shape(
        listed[1],
        &json!({
            "id": "<int>", "key": "t2", "historyLength": 2, "created_at": "<rfc3339>", "updated_at": "<rfc3339>",
            "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "protected": false,
        }),
        "session summary",
    );
    // Every reply about t1 names the same room, whichever instance served it.
    let t1: Vec<&Value> = replies
        .iter()
        .filter_map(|r| r.get("data"))
        .filter(|d| d["key"] == "t1")
        .collect();
    for d in &t1 {
        assert_eq!(
            (&d["id"], &d["epoch"]),
            (&t1[0]["id"], &t1[0]["epoch"]),
            "room identity is stable"
        );
    }
    assert_eq!(replies[4]["epoch"], t1[0]["epoch"]);

    // A body over Nginx's limit is refused by Nginx, as JSON.
    let big = json!({"history": vec![1; 600_000]});
    let (status, body) = s.put("/api/roulette/big", &big).await;
    assert_eq!(status, 413, "{body}");
    assert_shape(&body, &error_body(), "413 from Nginx");

    // Protected rooms: a token minted by one instance is honoured by every other
    // one (they share JWT_SECRET), and the HS256 claims are the contract's.
    let token = cluster.instances[0].token("vault", "s3cret").await;
    let other = cluster.instances[1].token("open", "").await;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .expect("an HS256 token signed with JWT_SECRET")
    .claims;
    assert_eq!(claims["key"], "vault");
    let auth = "/api/rooms/auth";
    #[rustfmt::skip]
    let rows = vec![
        row("right password", Method::POST, auth, Some(json!({"key": "vault", "password": "s3cret"})), 200, json!({"token": "<string>", "protected": true})),
        row("wrong password", Method::POST, auth, Some(json!({"key": "vault", "password": "guess"})), 401, error_body()),
        row("unprotected room accepts any password", Method::POST, auth, Some(json!({"key": "open", "password": "x"})), 200, json!({"token": "<string>", "protected": false})),
        row("GET without token", Method::GET, &room_path("vault"), None, 401, error_body()),
        row("GET with another room's token", Method::GET, &room_path("vault"), None, 401, error_body()).with_token(&other),
        row("save without token", Method::POST, save, Some(json!({"key": "vault", "number": 7})), 401, error_body()),
        row("save with token", Method::POST, save, Some(json!({"key": "vault", "number": 7})), 200, saved("vault", json!([7]), 1, true)).with_token(&token),
        row("PUT with token", Method::PUT, &room_path("vault"), Some(json!({"history": [1, "00"]})), 200, saved("vault", json!([1, "00"]), 2, true)).with_token(&token),
        row("GET with token", Method::GET, &room_path("vault"), None, 200, room_reply("vault", json!([1, "00"]), 2)).with_token(&token),
    ];
    run_rows(&s, rows).await;
    for (i, instance) in cluster.instances.iter().enumerate() {
        let (status, body) = instance.get_with_token("/api/roulette/vault", &token).await;
        assert_eq!(
            (status, &body["history"]),
            (200, &json!([1, "00"])),
            "node-{}: {body}",
            i + 1
        );
        let (status, body) = instance.get("/api/roulette/vault").await;
        assert_eq!(status, 401, "node-{} without token: {body}", i + 1);
    }

    // Admin API through Nginx.
    let (status, stats) = s.admin_get("/api/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_shape(
        &stats,
        &json!({"totalSessions": 5, "activeSessions": 0, "totalConnections": "<uint>", "activeConnections": 0, "averageHistoryLength": "<number>"}),
        "admin stats",
    );
    assert_eq!(
        s.admin_get("/api/admin/sessions/vault/history").await,
        (200, json!([1, "00"]))
    );
    let (status, body) = s.get_with_token("/api/admin/stats", "not-the-token").await;
    assert_eq!(status, 401, "{body}");
    let (status, migrations) = s.admin_get("/api/admin/migrations").await;
    assert_eq!(status, 200, "{migrations}");
    assert_shape(
        &migrations,
        &json!({"backend": "postgres", "applied": "<array>", "pending": []}),
        "migrations",
    );

    // Operational endpoints through Nginx: some instance answers, both
    // dependencies up.
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_shape(
        &body,
        &json!({
            "status": "ok", "timestamp": "<rfc3339>", "instance": "<string>", "version": env!("CARGO_PKG_VERSION"),
            "checks": {"database": {"status": "up", "latency_ms": "<number>"}, "redis": {"status": "up", "latency_ms": "<number>"}},
        }),
        "/health through Nginx",
    );
    assert!(
        ["node-1", "node-2", "node-3"].contains(&body["instance"].as_str().unwrap_or_default()),
        "{body}"
    );
    for path in ["/livez", "/readyz"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_dialects_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let s = cluster.front();
    let (status, put) = s.put("/api/roulette/t", &json!({"history": []})).await;
    assert_eq!(status, 200, "{put}");
    let epoch = put["data"]["epoch"].clone();

    // Three sockets through Nginx: least_conn spreads them over the instances,
    // so the members below are normally on three different ones.
    let mut members = Dialects::join(&s, "t", &epoch).await;

    #[rustfmt::skip]
    let table: Vec<DialectRow> = vec![
        (Sender::V2, json!({"type": "add", "number": 17}),
            json!({"type": "add", "key": "t", "number": 17, "version": 2}),
            json!({"type": "sync", "key": "t", "history": [17]}),
            json!({"type": "numberSaved", "key": "t", "number": 17, "history": [17]})),
        (Sender::V1, json!({"type": "add", "key": "t", "number": "00", "id": "v1-click"}),
            json!({"type": "add", "key": "t", "number": "00", "version": 3, "id": "v1-click"}),
            json!({"type": "sync", "key": "t", "history": [17, "00"], "id": "v1-click"}),
            json!({"type": "numberSaved", "key": "t", "number": "00", "history": [17, "00"], "id": "v1-click"})),
        (Sender::Seed, json!({"type": "saveNumber", "key": "t", "number": 0}),
            json!({"type": "add", "key": "t", "number": 0, "version": 4}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0]}),
            json!({"type": "numberSaved", "key": "t", "number": 0, "history": [17, "00", 0]})),
        (Sender::HttpSave, json!({"key": "t", "number": 36}),
            json!({"type": "add", "key": "t", "number": 36, "version": 5}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0, 36]}),
            json!({"type": "numberSaved", "key": "t", "number": 36, "history": [17, "00", 0, 36]})),
        (Sender::V2, json!({"type": "remove", "index": 1}),
            json!({"type": "remove", "key": "t", "index": 1, "version": 6}),
            json!({"type": "sync", "key": "t", "history": [17, 0, 36]}),
            json!({"type": "historyUpdated", "key": "t", "history": [17, 0, 36]})),
        (Sender::Seed, json!({"type": "updateHistory", "key": "t", "history": [2, 3]}),
            json!({"type": "sync", "key": "t", "history": [2, 3], "full": true, "version": 7}),
            json!({"type": "sync", "key": "t", "history": [2, 3]}),
            json!({"type": "historyUpdated", "key": "t", "history": [2, 3]})),
        (Sender::HttpPut, json!({"history": [5]}),
            json!({"type": "sync", "key": "t", "history": [5], "full": true, "version": 8}),
            json!({"type": "sync", "key": "t", "history": [5]}),
            json!({"type": "historyUpdated", "key": "t", "history": [5]})),
        (Sender::V1, json!({"type": "update", "key": "t", "history": []}),
            json!({"type": "sync", "key": "t", "history": [], "full": true, "version": 9}),
            json!({"type": "sync", "key": "t", "history": []}),
            json!({"type": "historyUpdated", "key": "t", "history": []})),
    ];
    members.run(&s, table).await;
    assert_eq!(cluster.db_room("t").await, Some((json!([]), 9)));

    // The three sockets really were spread over the instances.
    let (status, sessions) = cluster.instances[0].admin_get("/api/admin/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    let room = sessions
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == "t"))
        .expect("room t")
        .clone();
    let instances: HashSet<&str> = room["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| c["instance"].as_str())
        .collect();
    println!("dialect members were served by {instances:?}");
    assert!(
        instances.len() >= 2,
        "Nginx put every member on one instance: {room}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sees_and_disconnects_connections_on_every_instance() {
    let cluster = TestCluster::start(3, &[]).await;
    let key = "adm";
    let (status, _) = cluster.instances[0]
        .put("/api/roulette/adm", &json!({"history": [1, "00"]}))
        .await;
    assert_eq!(status, 200);
    let mut clients = Vec::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let agent = format!("admin-client-{}", i + 1);
        let mut ws = instance
            .ws_with_headers(&[("User-Agent", &agent)])
            .await
            .expect("connect");
        ws.send(json!({"type": "join", "key": key, "version": 0}))
            .await;
        assert_eq!(ws.recv().await["type"], "sync");
        clients.push(ws);
    }

    // Any instance lists all three connections, each with the instance holding it.
    let mut held_by_c = String::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let room = eventually(
            Duration::from_secs(5),
            "three connections listed",
            || async {
                let (status, body) = instance.admin_get("/api/admin/sessions").await;
                assert_eq!(status, 200, "{body}");
                let room = body.as_array()?.iter().find(|r| r["key"] == key)?.clone();
                (room["activeConnections"] == 3).then_some(room)
            },
        )
        .await;
        assert_shape(
            &room,
            &json!({
                "key": key, "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "historyLength": 2,
                "activeConnections": 3, "totalConnections": 3, "protected": false,
                "connections": ["<any>", "<any>", "<any>"],
            }),
            &format!("sessions on node-{}", i + 1),
        );
        let mut seen: Vec<(String, String)> = Vec::new();
        for c in room["connections"].as_array().expect("connections") {
            assert_shape(
                c,
                &json!({
                    "id": "<string>", "key": key, "connectedAt": "<rfc3339>", "lastActivity": "<rfc3339>",
                    "status": "connected", "ipAddress": "127.0.0.1", "userAgent": "<string>", "instance": "<string>",
                }),
                "connection",
            );
            let (agent, instance) = (
                c["userAgent"].as_str().unwrap_or_default(),
                c["instance"].as_str().unwrap_or_default(),
            );
            assert_eq!(
                agent.trim_start_matches("admin-client-"),
                instance.trim_start_matches("node-"),
                "{c}"
            );
            if instance == "node-3" {
                held_by_c = c["id"].as_str().unwrap_or_default().to_owned();
            }
            seen.push((agent.to_owned(), instance.to_owned()));
        }
        seen.sort();
        assert_eq!(seen.len(), 3, "{room}");
        let (status, stats) = instance.admin_get("/api/admin/stats").await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(
            (&stats["activeConnections"], &stats["activeSessions"]),
            (&json!(3), &json!(1)),
            "{stats}"
        );
    }

    // A disconnect on node-1 closes the connection node-3 holds, and only it.
    let (status, body) = cluster.instances[0]
        .admin_post("/api/admin/connections/node-3-999/disconnect")
        .await;
    assert_eq!(status, 404, "unknown connection: {body}");
    let (status, body) = cluster.instances[0]
        .admin_post(&format!("/api/admin/connections/{held_by_c}/disconnect"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_shape(
        &body,
        &json!({"status": "success", "message": "<string>"}),
        "disconnect",
    );
    let mut c = clients.pop().expect("client on node-3");
    let code = tokio::time::timeout(Duration::from_secs(5), c.closed())
        .await
        .expect("client on node-3 closed");
    assert_eq!(code, Some(1000), "an admin disconnect closes normally");
    for ws in &mut clients {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(
            ws.recv().await,
            json!({"type": "pong"}),
            "other connections stay open"
        );
    }
    eventually(
        Duration::from_secs(5),
        "the closed connection leaves the listing",
        || async {
            let (_, body) = cluster.instances[1].admin_get("/api/admin/stats").await;
            (body["activeConnections"] == 2).then_some(())
        },
    )
    .await;
    let (status, body) = cluster.instances[1]
        .admin_post(&format!("/api/admin/connections/{held_by_c}/disconnect"))
        .await;
    assert_eq!(status, 404, "second disconnect: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let https = cluster.https_client();
    let pem = cluster.nginx.certificate_pem();

    let reply = https
        .get(cluster.nginx.https_url("/health"))
        .send()
        .await
        .expect("HTTPS /health");
    assert_eq!(reply.status().as_u16(), 200);
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(body["status"], "ok", "{body}");

    let mut ws = WsClient::connect_tls(&cluster.nginx.wss_url(), &pem)
        .await
        .expect("wss handshake");
    ws.send(json!({"type": "join", "key": "tls", "version": 0}))
        .await;
    assert_shape(
        &ws.recv().await,
        &json!({"type": "sync", "key": "tls", "history": [], "full": true, "version": 0, "epoch": null}),
        "join over wss",
    );
    ws.send(json!({"type": "add", "number": 17})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "tls", "number": 17, "version": 1})
    );
    let reply = https
        .post(cluster.nginx.https_url("/api/roulette/save"))
        .json(&json!({"key": "tls", "number": "00"}))
        .send()
        .await
        .expect("HTTPS save");
    assert_eq!(reply.status().as_u16(), 200);
    let body: Value = reply.json().await.expect("JSON");
    assert_shape(
        &body,
        &saved("tls", json!([17, "00"]), 2, false),
        "save over HTTPS",
    );
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "tls", "number": "00", "version": 2})
    );
    let reply = https
        .get(cluster.nginx.https_url("/api/roulette/tls"))
        .send()
        .await
        .expect("HTTPS GET");
    let body: Value = reply.json().await.expect("JSON");
    assert_shape(
        &body,
        &room_reply("tls", json!([17, "00"]), 2),
        "GET over HTTPS",
    );

    // The certificate is what makes these work: without trusting it, both fail.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    assert!(
        untrusting
            .get(cluster.nginx.https_url("/health"))
            .send()
            .await
            .is_err(),
        "an untrusted certificate was accepted"
    );
    assert!(
        tokio_tungstenite::connect_async(cluster.nginx.wss_url())
            .await
            .is_err(),
        "wss with an untrusted certificate was accepted"
    );
}
