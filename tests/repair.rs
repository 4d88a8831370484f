//! Repairs, for real: a change committed without its publish reaching an
//! instance, and a store that went back in time after an asynchronous
//! failover. Both must reach every member and every read within the repair
//! period (invariant 7).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::app::{TestServer, WsClient};
use support::cluster::JWT_SECRET;
use support::exposition;
use support::postgres::TestPostgres;
use support::redis::TestRedis;

/// The repair period the instances of these tests run with.
const REPAIR_INTERVAL_MS: &str = "500";
/// How long a repair may take here: the period, plus slack for a loaded box.
const REPAIR_LIMIT: Duration = Duration::from_secs(5);

async fn instance(name: &str, database: &str, redis: &str) -> TestServer {
    TestServer::start(&[
        ("DATABASE_URL", database),
        ("REDIS_URL", redis),
        ("INSTANCE_ID", name),
        ("JWT_SECRET", JWT_SECRET),
        ("REPAIR_INTERVAL_MS", REPAIR_INTERVAL_MS),
    ])
    .await
}

/// A v2 member of `key` on `server`, past its greeting; returns the greeting.
async fn member(server: &TestServer, key: &str) -> (WsClient, Value) {
    let mut ws = server.ws().await;
    ws.send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    let greeting = ws.recv().await;
    assert_eq!(greeting["type"], "sync", "{greeting}");
    (ws, greeting)
}

/// Reads frames until one satisfies `wanted`, or fails after `limit`.
async fn frame_where(ws: &mut WsClient, limit: Duration, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no matching frame within {limit:?}");
        match ws.next_within(left).await {
            support::app::WsEvent::Json(frame) if wanted(&frame) => return frame,
            support::app::WsEvent::Json(_) => continue,
            support::app::WsEvent::Closed(code) => panic!("member closed ({code:?})"),
        }
    }
}

async fn repairs(server: &TestServer) -> f64 {
    exposition::scrape(server)
        .await
        .sum("croupier_repairs_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_publish_never_arrives_reaches_members_and_reads() {
    let postgres = TestPostgres::start_new().await;
    // Two Redis servers that know nothing of each other: what node-2
    // publishes never reaches node-1, as if every one of its messages was lost.
    let (redis_a, redis_b) = (TestRedis::start_new().await, TestRedis::start_new().await);
    support::app::migrate(&postgres.url(), false);
    let node1 = instance("node-1", &postgres.url(), &redis_a.url()).await;
    let node2 = instance("node-2", &postgres.url(), &redis_b.url()).await;

    let (status, _) = node1
        .post("/api/roulette/save", &json!({"key": "lost", "number": 7}))
        .await;
    assert_eq!(status, 200);
    let (mut ws, greeting) = member(&node1, "lost").await;
    assert_eq!(greeting["version"], 1);
    let before = repairs(&node1).await;

    let saved_at = Instant::now();
    let (status, reply) = node2
        .post("/api/roulette/save", &json!({"key": "lost", "number": 8}))
        .await;
    assert_eq!(status, 200, "{reply}");
    let add = frame_where(&mut ws, REPAIR_LIMIT, |f| f["type"] == "add").await;
    let delivered = saved_at.elapsed();
    assert_eq!(add["number"], 8, "{add}");
    assert_eq!(add["version"], 2, "{add}");
    // node-1's reads have it too (they are answered from the same mirror).
    let (history, version) = node1.room("lost").await;
    assert_eq!((history, version), (json!([7, 8]), 2));
    assert!(repairs(&node1).await > before, "the repair is counted");
    eprintln!("a lost publish reached the member after {delivered:?}");

    node1.assert_healthy().await;
    node2.assert_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_went_back_in_time_moves_every_member_to_its_truth() {
    let mut primary = TestPostgres::start_new().await;
    let standby = primary.start_standby(false).await;
    let redis = TestRedis::start_new().await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/croupier",
        primary.port(),
        standby.port()
    );
    support::app::migrate(&url, false);
    let node1 = instance("node-1", &url, &redis.url()).await;
    let node2 = instance("node-2", &url, &redis.url()).await;

    for n in 1..=5 {
        let (status, _) = node1
            .post("/api/roulette/save", &json!({"key": "rewind", "number": n}))
            .await;
        assert_eq!(status, 200);
    }
    let (mut m1, greeting) = member(&node1, "rewind").await;
    let (mut m2, _) = member(&node2, "rewind").await;
    let old_epoch = greeting["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(greeting["version"], 5);

    // The standby has the first five, then stops receiving.
    let deadline = Instant::now() + Duration::from_secs(20);
    while standby
        .sql(
            "croupier",
            "SELECT coalesce(max(version), 0) FROM rooms WHERE key = 'rewind'",
        )
        .await
        != "5"
    {
        assert!(Instant::now() < deadline, "the standby never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    standby
        .sql("postgres", "ALTER SYSTEM SET primary_conninfo = ''")
        .await;
    standby.sql("postgres", "SELECT pg_reload_conf()").await;
    while standby
        .sql("postgres", "SELECT count(*) FROM pg_stat_wal_receiver")
        .await
        != "0"
    {
        assert!(Instant::now() < deadline, "the standby kept streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Three more saves, acknowledged by the (asynchronous) primary and seen
    // by every member, that the standby never gets.
    for n in 6..=8 {
        let (status, _) = node1
            .post("/api/roulette/save", &json!({"key": "rewind", "number": n}))
            .await;
        assert_eq!(status, 200);
    }
    for ws in [&mut m1, &mut m2] {
        frame_where(ws, Duration::from_secs(10), |f| f["version"] == 8).await;
    }
    // A room the standby never sees at all, cached in Redis by its writer.
    let (status, _) = node1
        .post(
            "/api/roulette/save",
            &json!({"key": "lost-room", "number": 1}),
        )
        .await;
    assert_eq!(status, 200);
    // Deliberately idle past the room task's linger (5 s): no instance follows
    // the room any more, so only the cache remembers it.
    tokio::time::sleep(Duration::from_secs(6)).await;

    primary.stop_immediately().await;
    standby.promote().await;
    let promoted_at = Instant::now();

    // Every member is moved to the store's five numbers, under a new epoch.
    let truth = json!([1, 2, 3, 4, 5]);
    let failover_limit = REPAIR_LIMIT + Duration::from_secs(10);
    for ws in [&mut m1, &mut m2] {
        let sync = frame_where(ws, failover_limit, |f| f["type"] == "sync").await;
        assert_eq!(sync["history"], truth, "{sync}");
        assert_ne!(sync["epoch"], json!(old_epoch), "{sync}");
    }
    let moved = promoted_at.elapsed();
    let mut epochs = Vec::new();
    for node in [&node1, &node2] {
        let (status, body) = node.get("/api/roulette/rewind").await;
        assert_eq!(status, 200);
        assert_eq!(body["history"], truth, "{body}");
        epochs.push(body["epoch"].clone());
    }
    assert_eq!(epochs[0], epochs[1], "both instances serve one epoch");
    // node-2 never followed that room: its read goes to the store through the
    // Redis cache, which was flushed when the database failed over.
    let (history, version) = node2.room("lost-room").await;
    assert_eq!(
        (history, version),
        (json!([]), 0),
        "a room the store lost is not served from the cache"
    );
    assert_ne!(epochs[0], json!(old_epoch));
    eprintln!("members moved to the store's history {moved:?} after the promotion");

    // Writing continues on top of the store's truth, in the new epoch.
    let (status, reply) = node2
        .post("/api/roulette/save", &json!({"key": "rewind", "number": 9}))
        .await;
    assert_eq!(status, 200, "{reply}");
    for ws in [&mut m1, &mut m2] {
        let add = frame_where(ws, Duration::from_secs(10), |f| f["type"] == "add").await;
        assert_eq!(add["number"], 9, "{add}");
    }
    let (history, _) = node1.room("rewind").await;
    assert_eq!(history, json!([1, 2, 3, 4, 5, 9]));
    node1.assert_healthy().await;
    node2.assert_healthy().await;
}
