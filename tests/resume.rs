//! Resuming a v2 membership: `join` with the last seen `version` (and `epoch`)
//! replays exactly the missed events then `recovered`, or — when that is not
//! possible — sends one full `sync`. Never a partial replay.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::app::{TestServer, WsClient};

const QUIET: Duration = Duration::from_millis(400);

async fn join(s: &TestServer, body: Value) -> (WsClient, Value) {
    let mut ws = s.ws().await;
    ws.send(body).await;
    let first = ws.recv().await;
    (ws, first)
}

/// A room with `n` numbers written over HTTP; returns its epoch.
async fn room_with(s: &TestServer, key: &str, n: usize) -> String {
    let history: Vec<usize> = (0..n).map(|i| (i * 5) % 37).collect();
    let mut epoch = String::new();
    for number in history {
        let (status, body) = s
            .post("/api/roulette/save", &json!({"key": key, "number": number}))
            .await;
        assert_eq!(status, 200, "{body}");
        epoch = body["data"]["epoch"].as_str().expect("epoch").to_owned();
    }
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_member_gets_exactly_the_fifty_missed_events() {
    let s = TestServer::start(&[]).await;
    let key = "table";
    let (mut writer, sync) = join(&s, json!({"type": "join", "key": key, "version": 0})).await;
    assert_eq!(sync["version"], 0, "{sync}");
    for n in [3, 14, 15, 9, 26] {
        writer.send(json!({"type": "add", "number": n})).await;
        writer.recv().await;
    }

    let (member, sync) = join(&s, json!({"type": "join", "key": key, "version": 0})).await;
    assert_eq!(sync["type"], "sync");
    assert_eq!(sync["full"], true);
    assert_eq!(sync["history"], json!([3, 14, 15, 9, 26]));
    let last = sync["version"].as_u64().expect("version");
    let epoch = sync["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(last, 5);
    member.close().await;

    // 50 events while it is away, from the other socket and over HTTP; the
    // writer (a v2 member too) receives each one exactly as the returning member
    // must see it.
    let mut missed = Vec::new();
    let mut len = 5usize;
    for i in 0..50usize {
        match i % 10 {
            0 | 5 => {
                let index = (i * 3) % len;
                writer.send(json!({"type": "remove", "index": index})).await;
                len -= 1;
            }
            7 => {
                let history: Vec<Value> = (0..(i % 6 + 2)).map(|j| json!((i + j) % 37)).collect();
                len = history.len();
                writer
                    .send(json!({"type": "update", "history": history}))
                    .await;
            }
            3 => {
                let (status, body) = s
                    .post("/api/roulette/save", &json!({"key": key, "number": "00"}))
                    .await;
                assert_eq!(status, 200, "{body}");
                len += 1;
            }
            9 => {
                let (status, body) = s
                    .put(
                        &format!("/api/roulette/{key}"),
                        &json!({"history": [i % 37, 0]}),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                len = 2;
            }
            _ => {
                writer
                    .send(json!({"type": "add", "number": i % 37, "id": format!("m{i}")}))
                    .await;
                len += 1;
            }
        }
        let event = writer.recv().await;
        assert_eq!(event["version"], json!(last + i as u64 + 1), "{event}");
        missed.push(event);
    }
    let kinds: Vec<&str> = missed.iter().filter_map(|e| e["type"].as_str()).collect();
    for kind in ["add", "remove", "sync"] {
        assert!(kinds.contains(&kind), "the mix lacks {kind}");
    }
    let (history, version) = s.room(key).await;
    assert_eq!(version, last + 50);

    let (mut back, first) = join(
        &s,
        json!({"type": "join", "key": key, "version": last, "epoch": epoch}),
    )
    .await;
    assert_eq!(first, missed[0], "first replayed event");
    for (i, expected) in missed.iter().enumerate().skip(1) {
        assert_eq!(&back.recv().await, expected, "replayed event {i}");
    }
    assert_eq!(
        back.recv().await,
        json!({"type": "recovered", "key": key, "version": version, "epoch": epoch})
    );
    back.expect_silence(QUIET).await;

    // Replaying the events from the old state gives the stored history.
    assert_eq!(history.as_array().map(Vec::len), Some(len));

    // The resumed membership is live: the next event arrives once, at both members.
    writer.send(json!({"type": "add", "number": 36})).await;
    let live = json!({"type": "add", "key": key, "number": 36, "version": version + 1});
    assert_eq!(writer.recv().await, live);
    assert_eq!(back.recv().await, live);
    back.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_without_epoch_replays_too() {
    let s = TestServer::start(&[]).await;
    let epoch = room_with(&s, "no-epoch", 6).await;
    let (mut ws, first) = join(&s, json!({"type": "join", "key": "no-epoch", "version": 4})).await;
    assert_eq!(
        first,
        json!({"type": "add", "key": "no-epoch", "number": 20, "version": 5})
    );
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "no-epoch", "number": 25, "version": 6})
    );
    assert_eq!(
        ws.recv().await,
        json!({"type": "recovered", "key": "no-epoch", "version": 6, "epoch": epoch})
    );
    ws.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_room_went_idle_replays_from_the_log() {
    // No member stays, so the missed events are not in any in-memory buffer
    // when the client comes back.
    let s = TestServer::start(&[]).await;
    let epoch = room_with(&s, "idle", 3).await;
    let (ws, sync) = join(&s, json!({"type": "join", "key": "idle", "version": 0})).await;
    assert_eq!(sync["version"], 3);
    ws.close().await;
    let (status, _) = s
        .put("/api/roulette/idle", &json!({"history": [1, 2, 3, 4]}))
        .await;
    assert_eq!(status, 200);
    // Longer than a room with no member is kept in memory.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": "idle", "number": 5}))
        .await;
    assert_eq!(status, 200);

    let (mut back, first) = join(
        &s,
        json!({"type": "join", "key": "idle", "version": 3, "epoch": epoch}),
    )
    .await;
    assert_eq!(
        first,
        json!({"type": "sync", "key": "idle", "history": [1, 2, 3, 4], "full": true, "version": 4})
    );
    assert_eq!(
        back.recv().await,
        json!({"type": "add", "key": "idle", "number": 5, "version": 5})
    );
    assert_eq!(
        back.recv().await,
        json!({"type": "recovered", "key": "idle", "version": 5, "epoch": epoch})
    );
    back.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_ahead_of_the_room_gets_one_full_sync() {
    let s = TestServer::start(&[]).await;
    let epoch = room_with(&s, "ahead", 4).await;
    let (mut ws, first) = join(
        &s,
        json!({"type": "join", "key": "ahead", "version": 9, "epoch": epoch}),
    )
    .await;
    assert_eq!(
        first,
        json!({"type": "sync", "key": "ahead", "history": [0, 5, 10, 15], "full": true, "version": 4, "epoch": epoch})
    );
    ws.expect_silence(QUIET).await;
    // And it is a member from there on.
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": "ahead", "number": 1}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "ahead", "number": 1, "version": 5})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_another_epoch_gets_one_full_sync() {
    let s = TestServer::start(&[]).await;
    let epoch = room_with(&s, "epochs", 4).await;
    let (mut ws, first) = join(
        &s,
        json!({"type": "join", "key": "epochs", "version": 2, "epoch": "not-this-room"}),
    )
    .await;
    assert_eq!(
        first,
        json!({"type": "sync", "key": "epochs", "history": [0, 5, 10, 15], "full": true, "version": 4, "epoch": epoch})
    );
    ws.expect_silence(QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_at_the_current_version_is_just_recovered() {
    let s = TestServer::start(&[]).await;
    let epoch = room_with(&s, "current", 4).await;
    let (mut ws, first) = join(
        &s,
        json!({"type": "join", "key": "current", "version": 4, "epoch": epoch}),
    )
    .await;
    assert_eq!(
        first,
        json!({"type": "recovered", "key": "current", "version": 4, "epoch": epoch})
    );
    ws.expect_silence(QUIET).await;
    let (status, _) = s
        .post(
            "/api/roulette/save",
            &json!({"key": "current", "number": "00"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "current", "number": "00", "version": 5})
    );
}
