//! Everything the server acknowledged survives a restart on the same DATA_DIR:
//! histories, versions, epochs, protection, de-duplication ids, the token
//! secret, and the event log a resuming client is replayed from.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::app::{TestServer, WsClient, decode, encode};

async fn get_room(s: &TestServer, key: &str, token: Option<&str>) -> (u16, Value) {
    let path = format!("/api/roulette/{}", encode(key));
    match token {
        Some(token) => s.get_with_token(&path, token).await,
        None => s.get(&path).await,
    }
}

async fn save_with_token(s: &TestServer, body: &Value, token: &str) -> (u16, Value) {
    let r = s
        .http
        .post(s.url("/api/roulette/save"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("POST");
    decode(r).await
}

async fn save(s: &TestServer, key: &str, number: Value) -> Value {
    let (status, body) = s
        .post("/api/roulette/save", &json!({"key": key, "number": number}))
        .await;
    assert_eq!(status, 200, "save to {key}: {body}");
    body
}

/// Joins `key` in dialect v2 and returns the greeting.
async fn join_v2(s: &TestServer, key: &str, extra: Value) -> (WsClient, Value) {
    let mut ws = s.ws().await;
    let mut join = json!({"type": "join", "key": key, "version": 0});
    if let (Value::Object(join), Value::Object(extra)) = (&mut join, extra) {
        join.extend(extra);
    }
    ws.send(join).await;
    let greeting = ws.recv().await;
    (ws, greeting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_versions_epochs_and_tokens_survive_a_restart() {
    let mut s = TestServer::start(&[]).await;

    // "alpha": HTTP adds (one retried with the same id), then a WS add and remove.
    save(&s, "alpha", json!(1)).await;
    save(&s, "alpha", json!(2)).await;
    let first = s
        .post(
            "/api/roulette/save",
            &json!({"key": "alpha", "number": 3, "id": "retry-me"}),
        )
        .await;
    assert_eq!(first.0, 200, "{}", first.1);
    save(&s, "alpha", json!("00")).await;
    let (mut ws, sync) = join_v2(&s, "alpha", json!({})).await;
    assert_eq!(sync["version"], 4, "{sync}");
    ws.send(json!({"type": "add", "number": 17})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "alpha", "number": 17, "version": 5})
    );
    ws.send(json!({"type": "remove", "index": 0})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "remove", "key": "alpha", "index": 0, "version": 6})
    );
    ws.close().await;

    // "beta": created by a replace, then appended to.
    let (status, body) = s
        .put("/api/roulette/beta", &json!({"history": [5, 6, "00", 7]}))
        .await;
    assert_eq!(status, 200, "{body}");
    save(&s, "beta", json!(8)).await;
    let (status, body) = s
        .put("/api/roulette/beta", &json!({"history": [9, 0]}))
        .await;
    assert_eq!(status, 200, "{body}");

    // A non-Latin key.
    save(&s, "Рулетка №1", json!(36)).await;

    // "vault": protected; written with its token.
    let token = s.token("vault", "s3cret").await;
    let (status, body) = save_with_token(&s, &json!({"key": "vault", "number": 11}), &token).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["protected"], true, "{body}");

    let keys = ["alpha", "beta", "Рулетка №1", "vault"];
    let mut before = Vec::new();
    for key in keys {
        let (status, body) = get_room(&s, key, Some(&token)).await;
        assert_eq!(status, 200, "{key}: {body}");
        assert!(
            body["epoch"].as_str().is_some_and(|e| !e.is_empty()),
            "{key} has no epoch: {body}"
        );
        before.push(body);
    }
    assert_eq!(before[0]["history"], json!([2, 3, "00", 17]));
    assert_eq!(before[0]["version"], 6);
    assert_eq!(before[1]["history"], json!([9, 0]));
    assert_eq!(before[1]["version"], 3);
    assert_eq!(before[2]["version"], 1);
    assert_eq!(before[3]["history"], json!([11]));
    assert_eq!(before[3]["version"], 1);
    let (_, listing_before) = s.get("/api/roulette/sessions").await;

    s.restart().await;

    // Every room is exactly as it was: history, version, epoch.
    for (key, expected) in keys.iter().zip(&before) {
        let (status, body) = get_room(&s, key, Some(&token)).await;
        assert_eq!(status, 200, "{key} after restart: {body}");
        assert_eq!(&body, expected, "{key} changed across the restart");
    }
    let (status, listing) = s.get("/api/roulette/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(listing["total"], 4, "{listing}");
    assert_eq!(
        listing, listing_before,
        "room list changed across the restart"
    );
    let vault = listing["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .find(|r| r["key"] == "vault");
    assert_eq!(
        vault.map(|r| r["protected"].clone()),
        Some(json!(true)),
        "{listing}"
    );

    // Protection survived: no token is still refused, the old token still works.
    let (status, body) = get_room(&s, "vault", None).await;
    assert_eq!(
        status, 401,
        "protected room readable without a token after restart: {body}"
    );
    let (status, body) = save_with_token(&s, &json!({"key": "vault", "number": 12}), &token).await;
    assert_eq!(
        status, 200,
        "token issued before the restart was refused: {body}"
    );
    assert_eq!(body["data"]["version"], 2, "{body}");
    assert_eq!(body["data"]["history"], json!([11, 12]), "{body}");
    // The password hash survived too.
    let (status, _) = s
        .post(
            "/api/rooms/auth",
            &json!({"key": "vault", "password": "wrong"}),
        )
        .await;
    assert_eq!(status, 401, "wrong password accepted after restart");

    // The token also opens the room over WebSocket.
    let (ws, sync) = join_v2(&s, "vault", json!({"token": token})).await;
    assert_eq!(sync["type"], "sync", "{sync}");
    assert_eq!(sync["history"], json!([11, 12]), "{sync}");
    assert_eq!(sync["epoch"], before[3]["epoch"], "{sync}");
    ws.close().await;

    // A mutation id applied before the restart is still recognised.
    let (status, body) = s
        .post(
            "/api/roulette/save",
            &json!({"key": "alpha", "number": 3, "id": "retry-me"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (history, version) = s.room("alpha").await;
    assert_eq!(
        (history, version),
        (json!([2, 3, "00", 17]), 6),
        "a retried id was applied twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_restart_is_served_from_the_event_log() {
    let mut s = TestServer::start(&[]).await;
    for n in [4, 8, 15, 16] {
        save(&s, "log", json!(n)).await;
    }
    let (status, body) = s
        .put("/api/roulette/log", &json!({"history": [23, 35]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (mut ws, sync) = join_v2(&s, "log", json!({})).await;
    let epoch = sync["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(sync["version"], 5, "{sync}");
    ws.send(json!({"type": "remove", "index": 1})).await;
    assert_eq!(ws.recv().await["version"], 6);
    ws.send(json!({"type": "add", "number": "00"})).await;
    assert_eq!(ws.recv().await["version"], 7);

    s.restart().await;
    // The socket opened before the restart is gone.
    assert!(matches!(
        ws.next_within(Duration::from_secs(5)).await,
        support::app::WsEvent::Closed(_)
    ));

    // At the current version: nothing missed.
    let (mut current, greeting) = join_v2(&s, "log", json!({"version": 7, "epoch": epoch})).await;
    assert_eq!(
        greeting,
        json!({"type": "recovered", "key": "log", "version": 7, "epoch": epoch})
    );
    current.expect_silence(Duration::from_millis(300)).await;

    // Behind: the missed events, from the store (the new process has no memory of them).
    let (mut behind, first) = join_v2(&s, "log", json!({"version": 3, "epoch": epoch})).await;
    let expected = [
        json!({"type": "add", "key": "log", "number": 16, "version": 4}),
        json!({"type": "sync", "key": "log", "history": [23, 35], "full": true, "version": 5}),
        json!({"type": "remove", "key": "log", "index": 1, "version": 6}),
        json!({"type": "add", "key": "log", "number": "00", "version": 7}),
        json!({"type": "recovered", "key": "log", "version": 7, "epoch": epoch}),
    ];
    assert_eq!(first, expected[0]);
    for frame in &expected[1..] {
        assert_eq!(&behind.recv().await, frame);
    }
    behind.expect_silence(Duration::from_millis(300)).await;

    // Both resumed members are live members again.
    save(&s, "log", json!(7)).await;
    let live = json!({"type": "add", "key": "log", "number": 7, "version": 8});
    assert_eq!(current.recv().await, live);
    assert_eq!(behind.recv().await, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_secret_is_per_data_dir() {
    // Control for the restart test: a token is accepted after a restart because
    // the secret is persisted, not because any well-formed token passes.
    let a = TestServer::start(&[]).await;
    let b = TestServer::start(&[]).await;
    let token_a = a.token("locked", "pw-one").await;
    let token_b = b.token("locked", "pw-one").await;
    let (status, _) = get_room(&b, "locked", Some(&token_b)).await;
    assert_eq!(status, 200);
    let (status, body) = get_room(&b, "locked", Some(&token_a)).await;
    assert_eq!(
        status, 401,
        "a token signed by another data directory's secret was accepted: {body}"
    );
}
