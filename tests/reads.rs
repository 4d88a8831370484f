//! Room reads answered from the hub's snapshot of a followed room: a read after
//! an acknowledged write never sees an older version, and protection holds
//! even for a room that got its password after the instance started following it.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::app::TestServer;

fn version(body: &Value) -> u64 {
    body["version"].as_u64().expect("version")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_acknowledged_write_sees_it() {
    let s = TestServer::start(&[("WS_RATE_LIMIT", "10000"), ("WS_RATE_BURST", "10000")]).await;
    let key = "hot";
    let (status, body) = s
        .put("/api/roulette/hot", &json!({"history": [1, 2, 3]}))
        .await;
    assert_eq!(status, 200, "{body}");
    // The first read goes to the store and makes the instance follow the room.
    assert_eq!(s.room(key).await, (json!([1, 2, 3]), 1));

    // A WebSocket member keeps adding meanwhile, so the room task always has
    // events in flight while the HTTP writes are acknowledged and read back.
    let mut member = s.ws().await;
    member
        .send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    assert_eq!(member.recv().await["type"], "sync");
    let adder = tokio::spawn(async move {
        for i in 0..150u64 {
            let id = format!("ws-{i}");
            member
                .send(json!({"type": "add", "number": i % 37, "id": id}))
                .await;
            // Its own event comes back with its mutation id.
            while member.recv().await["id"] != json!(id) {}
        }
        member.close().await;
    });

    for i in 0..150u64 {
        let number = (i * 7) % 37;
        let (status, saved) = s
            .post("/api/roulette/save", &json!({"key": key, "number": number}))
            .await;
        assert_eq!(status, 200, "{saved}");
        let saved_version = version(&saved["data"]);
        let (status, read) = s.get("/api/roulette/hot").await;
        assert_eq!(status, 200, "{read}");
        assert!(
            version(&read) >= saved_version,
            "save {i} was acknowledged at version {saved_version}, the next read shows {read}"
        );
        if version(&read) == saved_version {
            assert_eq!(read["history"], saved["data"]["history"], "save {i}");
            assert_eq!(read["epoch"], saved["data"]["epoch"], "save {i}");
        }
    }
    adder.await.expect("adder");

    let (status, read) = s.get("/api/roulette/hot").await;
    assert_eq!(status, 200);
    assert_eq!(version(&read), 1 + 300, "{read}");
    assert_eq!(read["history"].as_array().map(Vec::len), Some(303));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_given_a_password_while_followed_needs_its_token() {
    let s = TestServer::start(&[]).await;
    let key = "vault";
    // A member joins before the room exists: the instance follows it from then on.
    let mut member = s.ws().await;
    member
        .send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    let sync = member.recv().await;
    assert_eq!((sync["type"].clone(), version(&sync)), (json!("sync"), 0));

    let token = s.token(key, "secret").await;
    let (status, body) = s.get("/api/roulette/vault").await;
    assert_eq!(status, 401, "{body}");
    // The member joined without a token: it is removed, and comes back with one.
    assert_eq!(member.recv().await["type"], "authRequired");
    member
        .send(json!({"type": "join", "key": key, "version": 0, "token": token}))
        .await;
    assert_eq!(member.recv().await["type"], "sync");

    // After the first event the followed room has a snapshot; reads still need
    // the token.
    let (status, body) = s
        .call(
            Method::POST,
            "/api/roulette/save",
            Some(&token),
            Some(&json!({"key": key, "number": 17})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let event = member.recv().await;
    assert_eq!(event["number"], 17, "{event}");
    for _ in 0..20 {
        let (status, body) = s.get("/api/roulette/vault").await;
        assert_eq!(status, 401, "{body}");
        let (status, body) = s.get_with_token("/api/roulette/vault", &token).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["history"], json!([17]));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
