//! `scripts/backup.sh` and `scripts/restore.sh` against a real cluster: rooms
//! written through Nginx and WebSockets are dumped, the database is wiped, the
//! dump is restored as docs/operations.md describes (instances stopped, Redis
//! flushed, instances started), and every room must come back exactly: history,
//! version, protection, event log — with a new epoch, so that clients resync
//! rather than resume across the restore — and nothing written after the dump.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::app::{decode, encode};
use support::cluster::TestCluster;
use support::ops::{psql, redis_command, run_script};

const PROTECTED: &str = "bk-protected";
const PASSWORD: &str = "open sesame";

/// What a room looks like from outside.
#[derive(Debug, Clone, PartialEq)]
struct RoomState {
    history: Value,
    version: u64,
    epoch: String,
}

/// `GET {base}/api/roulette/{key}` (with `token` when given) → status and body.
async fn get_room(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let mut request = http.get(format!("{base}/api/roulette/{}", encode(key)));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    decode(request.send().await.expect("GET room")).await
}

fn room_state(key: &str, status: u16, body: &Value) -> RoomState {
    assert_eq!(status, 200, "reading {key}: {body}");
    RoomState {
        history: body["history"].clone(),
        version: body["version"]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: no version in {body}")),
        epoch: body["epoch"]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: no epoch in {body}"))
            .to_owned(),
    }
}

async fn post(http: &reqwest::Client, url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = http.post(url).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    decode(request.send().await.expect("POST")).await
}

async fn save(cluster: &TestCluster, key: &str, number: u32, token: Option<&str>) -> Value {
    let http = &cluster.instances[0].http;
    let (status, body) = post(
        http,
        &cluster.url("/api/roulette/save"),
        token,
        json!({"key": key, "number": number}),
    )
    .await;
    assert_eq!(status, 200, "saving {number} to {key}: {body}");
    body["data"].clone()
}

/// The admin listing as key → (protected, historyLength, createdAt, lastActivity).
async fn admin_sessions(cluster: &TestCluster) -> BTreeMap<String, Value> {
    let (status, body) = cluster.instances[0].admin_get("/api/admin/sessions").await;
    assert_eq!(status, 200, "admin sessions: {body}");
    body.as_array()
        .expect("sessions array")
        .iter()
        .map(|s| {
            let key = s["key"].as_str().expect("key").to_owned();
            (
                key,
                json!([
                    s["protected"],
                    s["historyLength"],
                    s["createdAt"],
                    s["lastActivity"]
                ]),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_and_restore_bring_every_room_back_exactly() {
    let started = Instant::now();
    let mut cluster = TestCluster::start(3, &[]).await;
    let http = cluster.instances[0].http.clone();

    // ---- Rooms of every kind --------------------------------------------
    for n in 0..8 {
        save(&cluster, "bk-adds", n, None).await;
    }
    for n in [4, 5, 6] {
        save(&cluster, "bk-replaced", n, None).await;
    }
    let (status, body) = decode(
        http.put(cluster.url("/api/roulette/bk-replaced"))
            .json(&json!({"history": [36, 0, 17, 5]}))
            .send()
            .await
            .expect("PUT"),
    )
    .await;
    assert_eq!(status, 200, "replace: {body}");
    let unicode = "bk ünïcode ключ ♠";
    for n in [1, 2, 3] {
        save(&cluster, unicode, n, None).await;
    }
    for i in 0..20 {
        for n in 0..(i % 4 + 1) {
            save(&cluster, &format!("bk-bulk-{i:02}"), n * 9 % 37, None).await;
        }
    }
    // A protected room, and an open room created without any number.
    let (status, body) = post(
        &http,
        &cluster.url("/api/rooms/auth"),
        None,
        json!({"key": PROTECTED, "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "creating the protected room: {body}");
    let token = body["token"].as_str().expect("token").to_owned();
    for n in [31, 32, 33] {
        save(&cluster, PROTECTED, n, Some(&token)).await;
    }
    let (status, body) = post(
        &http,
        &cluster.url("/api/rooms/auth"),
        None,
        json!({"key": "bk-empty"}),
    )
    .await;
    assert_eq!(status, 200, "creating an empty room: {body}");
    // Adds and removes over a WebSocket on one instance, seen by a member on another.
    let mut writer = cluster.instances[1].ws().await;
    let mut watcher = cluster.instances[2].ws().await;
    for ws in [&mut writer, &mut watcher] {
        ws.send(json!({"type": "join", "key": "bk-removed", "version": 0}))
            .await;
        assert_eq!(ws.recv().await["type"], "sync");
    }
    let changes = [
        json!({"type": "add", "number": 11}),
        json!({"type": "add", "number": 12}),
        json!({"type": "add", "number": 13}),
        json!({"type": "add", "number": 14}),
        json!({"type": "remove", "index": 1}),
        json!({"type": "remove", "index": 0}),
    ];
    for change in &changes {
        writer.send(change.clone()).await;
        for ws in [&mut writer, &mut watcher] {
            let frame = ws.recv().await;
            assert_eq!(frame["type"], change["type"], "{frame}");
        }
    }
    writer.close().await;
    watcher.close().await;

    // ---- Everything as it was -------------------------------------------
    let sessions_before = admin_sessions(&cluster).await;
    let mut before: BTreeMap<String, RoomState> = BTreeMap::new();
    for key in sessions_before.keys() {
        let token = (key == PROTECTED).then_some(token.as_str());
        let (status, body) = get_room(&http, &cluster.url(""), key, token).await;
        before.insert(key.clone(), room_state(key, status, &body));
    }
    assert_eq!(
        before.len(),
        26,
        "rooms written: {:?}",
        before.keys().collect::<Vec<_>>()
    );
    assert_eq!(before["bk-removed"].history, json!([13, 14]));
    assert_eq!(before["bk-removed"].version, 6);
    assert_eq!(before["bk-replaced"].history, json!([36, 0, 17, 5]));
    assert_eq!(before["bk-empty"].version, 0);
    assert_eq!(sessions_before[PROTECTED][0], true);

    // ---- Backup ------------------------------------------------------------
    let backups = tempfile::tempdir().expect("backup dir");
    let backup_dir = backups.path().to_str().expect("utf-8 temp path").to_owned();
    let database_url = cluster.postgres.url();
    let backup_started = Instant::now();
    let output = run_script(
        "backup.sh",
        &[],
        &[("DATABASE_URL", &database_url), ("BACKUP_DIR", &backup_dir)],
    );
    let backup_time = backup_started.elapsed();
    assert!(
        output.status.success(),
        "backup.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let dump_size = std::fs::metadata(&dump)
        .unwrap_or_else(|e| panic!("dump {dump:?}: {e}"))
        .len();
    assert!(
        dump.starts_with(&backup_dir) && dump.ends_with(".dump") && dump_size > 0,
        "dump {dump:?} ({dump_size} bytes)"
    );

    // Written after the dump: must not survive the restore, although Redis
    // caches these newer states.
    let newer = save(&cluster, "bk-adds", 36, None).await;
    assert_eq!(newer["version"], before["bk-adds"].version + 1);
    save(&cluster, "bk-after-backup", 1, None).await;

    // ---- Disaster and restore, as docs/operations.md prescribes ---------
    for server in cluster.instances.iter_mut() {
        assert!(
            server.terminate(Duration::from_secs(20)).await.is_some(),
            "an instance did not stop"
        );
    }
    psql(
        &database_url,
        "DROP SCHEMA public CASCADE; CREATE SCHEMA public;",
    );
    assert_eq!(
        psql(&database_url, "SELECT to_regclass('public.rooms') IS NULL"),
        "t",
        "the wipe left the rooms table"
    );

    let restore_started = Instant::now();
    let output = run_script("restore.sh", &[&dump], &[("DATABASE_URL", &database_url)]);
    let restore_time = restore_started.elapsed();
    assert!(
        output.status.success(),
        "restore.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        psql(&database_url, "SELECT count(*) FROM rooms"),
        before.len().to_string()
    );

    // Redis still holds the room cache (including the post-dump states of
    // bk-adds and bk-after-backup), presence and join counts of the old
    // database: FLUSHALL it rather than restart it, like the documented
    // `redis-cli FLUSHALL`, so the instances read the restored rows.
    assert_eq!(
        redis_command(cluster.redis.port(), &["FLUSHALL"]).await,
        "+OK"
    );
    for server in cluster.instances.iter_mut() {
        server.start_again().await;
    }

    // ---- Every room exactly as before, through every instance and Nginx --
    let sessions_after = admin_sessions(&cluster).await;
    assert_eq!(
        sessions_after, sessions_before,
        "the admin listing changed across the restore"
    );
    let mut after: BTreeMap<String, String> = BTreeMap::new();
    let mut bases: Vec<String> = cluster.instances.iter().map(|s| s.url("")).collect();
    bases.push(cluster.url(""));
    for (key, expected) in &before {
        let token = (key == PROTECTED).then_some(token.as_str());
        let mut epochs = Vec::new();
        for base in &bases {
            let (status, body) = get_room(&http, base, key, token).await;
            let state = room_state(key, status, &body);
            assert_eq!(
                (&state.history, state.version),
                (&expected.history, expected.version),
                "{key} via {base}"
            );
            assert_ne!(
                state.epoch, expected.epoch,
                "{key} via {base}: the restore kept the old epoch"
            );
            epochs.push(state.epoch);
        }
        epochs.dedup();
        assert_eq!(
            epochs.len(),
            1,
            "{key}: instances disagree on the epoch: {epochs:?}"
        );
        after.insert(key.clone(), epochs.remove(0));
    }
    let (status, body) = get_room(&http, &cluster.url(""), "bk-after-backup", None).await;
    assert_eq!(
        (status, &body["version"]),
        (200, &json!(0)),
        "a room created after the dump survived: {body}"
    );

    // Protection survived: no token → 401; the password still works, a wrong one does not.
    let (status, body) = get_room(&http, &cluster.url(""), PROTECTED, None).await;
    assert_eq!(status, 401, "protected room read without a token: {body}");
    let (status, body) = post(
        &http,
        &cluster.url("/api/roulette/save"),
        None,
        json!({"key": PROTECTED, "number": 1}),
    )
    .await;
    assert_eq!(
        status, 401,
        "protected room written without a token: {body}"
    );
    let (status, _) = post(
        &http,
        &cluster.url("/api/rooms/auth"),
        None,
        json!({"key": PROTECTED, "password": "wrong"}),
    )
    .await;
    assert_eq!(status, 401, "wrong password accepted after the restore");
    let (status, body) = post(
        &http,
        &cluster.url("/api/rooms/auth"),
        None,
        json!({"key": PROTECTED, "password": PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "the password no longer works: {body}");

    // A member resuming with the pre-restore epoch gets one full sync.
    let removed = &before["bk-removed"];
    let mut stale = cluster.instances[0].ws().await;
    stale
        .send(json!({"type": "join", "key": "bk-removed", "version": removed.version - 2, "epoch": removed.epoch}))
        .await;
    let sync = stale.recv().await;
    assert_eq!(
        (&sync["type"], &sync["full"], &sync["history"]),
        (&json!("sync"), &json!(true), &removed.history),
        "{sync}"
    );
    assert_eq!(sync["epoch"], after["bk-removed"].as_str(), "{sync}");
    stale.close().await;

    // The event log came back too: a member resuming two versions behind in the
    // new epoch gets the two removes replayed, not a full sync.
    let mut resumer = cluster.instances[0].ws().await;
    resumer
        .send(json!({"type": "join", "key": "bk-removed", "version": removed.version - 2, "epoch": after["bk-removed"]}))
        .await;
    let frames = [
        resumer.recv().await,
        resumer.recv().await,
        resumer.recv().await,
    ];
    let kinds: Vec<&Value> = frames.iter().map(|f| &f["type"]).collect();
    assert_eq!(
        kinds,
        ["remove", "remove", "recovered"],
        "resume after restore: {frames:?}"
    );
    assert_eq!(frames[2]["version"], removed.version);
    resumer.close().await;

    // Writing goes on from the restored version in the new epoch.
    let next = save(&cluster, "bk-adds", 20, None).await;
    assert_eq!(next["version"], before["bk-adds"].version + 1, "{next}");
    assert_eq!(next["epoch"], after["bk-adds"].as_str(), "{next}");

    eprintln!(
        "backup/restore: {} rooms, dump {dump_size} bytes, backup.sh {backup_time:.2?}, restore.sh {restore_time:.2?}, total {:.1?}",
        before.len(),
        started.elapsed()
    );
}
