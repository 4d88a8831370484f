//! croupier on replicated Redis: a Redis Cluster of three masters with a
//! replica each, and a master and replica behind Sentinel — real servers on
//! loopback (`tests/support/redis_ha.rs`), PostgreSQL as the store, and two
//! croupier instances whose WebSocket members must follow every room through
//! a master killed under load.
//!
//! Also the cache rule that matters most after a failover: a cache write that
//! the promoted replica never received is never served.
//!
//! Run with `--nocapture` to see the measured failover and convergence times.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use croupier::bus::redis::{RedisBusOptions, connect_client};
use croupier::domain::{Change, Number, RoomKey};
use croupier::store::cached::CachedStore;
use croupier::store::sqlite::SqliteStore;
use croupier::store::{DynStore, Mutation, Store};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::Row;
use support::app::TestServer;
use support::postgres::TestPostgres;
use support::redis_ha::{TestRedisCluster, TestSentinel, cli, hget_anywhere};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const JWT_SECRET: &str = "redis-ha-test-secret-0123456789abcdef";
/// How long members get to converge after the last write.
const CONVERGE: Duration = Duration::from_secs(30);

// ---- a member that rebuilds its room from the frames it receives -----------

#[derive(Debug, Default, Clone)]
struct Replica {
    history: Vec<Value>,
    version: u64,
    frames: usize,
}

impl Replica {
    /// Applies one v2 frame; panics on a gap or an event out of order.
    fn apply(&mut self, frame: &Value, who: &str) {
        let version = frame["version"].as_u64();
        let next = |current: u64| {
            assert_eq!(
                version,
                Some(current + 1),
                "{who}: event out of order after version {current}: {frame}"
            );
        };
        self.frames += 1;
        match frame["type"].as_str() {
            Some("sync") if frame.get("epoch").is_some() => {
                self.history = frame["history"].as_array().cloned().unwrap_or_default();
                self.version = version.expect("version");
            }
            Some("sync") => {
                next(self.version);
                self.history = frame["history"].as_array().cloned().unwrap_or_default();
                self.version += 1;
            }
            Some("add") => {
                next(self.version);
                self.history.push(frame["number"].clone());
                self.version += 1;
            }
            Some("remove") => {
                next(self.version);
                let index = frame["index"].as_u64().expect("index") as usize;
                self.history.remove(index);
                self.version += 1;
            }
            _ => {}
        }
    }
}

struct Member {
    name: String,
    key: String,
    replica: Arc<Mutex<Replica>>,
    task: JoinHandle<()>,
}

impl Member {
    /// Joins `key` on the instance at `ws_url` and follows it until `stop`.
    async fn join(name: String, ws_url: &str, key: &str, stop: CancellationToken) -> Member {
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("WebSocket connect");
        let join = json!({"type": "join", "key": key, "version": 0});
        ws.send(Message::Text(join.to_string().into()))
            .await
            .expect("send join");
        let replica = Arc::new(Mutex::new(Replica::default()));
        let (state, who) = (replica.clone(), name.clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                let frame = tokio::select! {
                    _ = stop.cancelled() => return,
                    frame = ws.next() => frame,
                };
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        let value: Value = serde_json::from_str(&text).expect("JSON frame");
                        state.lock().unwrap().apply(&value, &who);
                        if value["type"] == "sync"
                            && let Some(tx) = ready.take()
                        {
                            let _ = tx.send(());
                        }
                    }
                    Some(Ok(_)) => {}
                    other => panic!("{who}: connection ended: {other:?}"),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("no greeting after join")
            .expect("member task ended");
        Member {
            name,
            key: key.to_owned(),
            replica,
            task,
        }
    }

    fn state(&self) -> Replica {
        self.replica.lock().unwrap().clone()
    }
}

// ---- two croupier instances over PostgreSQL and a given REDIS_URL ----------

struct Deployment {
    postgres: TestPostgres,
    instances: Vec<TestServer>,
}

impl Deployment {
    async fn start(redis_url: &str) -> Deployment {
        let postgres = TestPostgres::start_new().await;
        support::app::migrate(&postgres.url(), false);
        let mut instances = Vec::new();
        for i in 1..=2 {
            let name = format!("node-{i}");
            let pg = postgres.url();
            instances.push(
                TestServer::start(&[
                    ("DATABASE_URL", &pg),
                    ("REDIS_URL", redis_url),
                    ("JWT_SECRET", JWT_SECRET),
                    ("INSTANCE_ID", &name),
                ])
                .await,
            );
        }
        Deployment {
            postgres,
            instances,
        }
    }

    fn bases(&self) -> Vec<String> {
        self.instances.iter().map(|s| s.url("")).collect()
    }

    /// The room as PostgreSQL holds it: (history, version).
    async fn db_room(&self, key: &str) -> (Value, u64) {
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&self.postgres.url())
            .await
            .expect("connecting to PostgreSQL");
        let row = sqlx::query(support::postgres::ROOM_SQL)
            .bind(key)
            .fetch_one(&db)
            .await
            .expect("the room in PostgreSQL");
        db.close().await;
        let history: String = row.get("history");
        let version: i64 = row.get("version");
        (serde_json::from_str(&history).unwrap(), version as u64)
    }

    /// Members in every room on every instance.
    async fn members(&self, rooms: &[String], stop: &CancellationToken) -> Vec<Member> {
        let mut members = Vec::new();
        for (i, instance) in self.instances.iter().enumerate() {
            for key in rooms {
                let name = format!("node-{}/{key}", i + 1);
                members.push(Member::join(name, &instance.ws_url(), key, stop.clone()).await);
            }
        }
        members
    }

    /// Waits until every member equals PostgreSQL; returns how long it took.
    async fn converge(&self, members: &[Member]) -> Duration {
        let started = Instant::now();
        loop {
            assert!(
                members.iter().all(|m| !m.task.is_finished()),
                "a member stopped following its room"
            );
            let mut behind = Vec::new();
            for m in members {
                let db = self.db_room(&m.key).await;
                let seen = m.state();
                if json!(seen.history) != db.0 || seen.version != db.1 {
                    behind.push(format!("{} at {} of {}", m.name, seen.version, db.1));
                }
            }
            if behind.is_empty() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < CONVERGE,
                "members did not converge within {CONVERGE:?}: {behind:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The end of a failover under load: lets the writer go on for `more`,
    /// stops it, checks that no save failed and that enough came after the
    /// fault, waits for every member to converge, checks Redis is up again
    /// and that every instance reads each room as PostgreSQL holds it.
    /// Returns the writes and how long the members took to converge.
    async fn finish_writing(
        &self,
        writer: JoinHandle<Writes>,
        writing: &CancellationToken,
        more: Duration,
        members: &[Member],
        rooms: &[String],
    ) -> (Writes, Duration) {
        tokio::time::sleep(more).await;
        writing.cancel();
        let writes = writer.await.unwrap();
        assert_eq!(writes.failed, 0, "saves failed although PostgreSQL was up");
        assert!(
            writes.ok_after >= 20,
            "too few saves after the kill: {}",
            writes.ok_after
        );
        let converged_after = self.converge(members).await;
        self.assert_redis_up().await;
        for room in rooms {
            let db = self.db_room(room).await;
            for instance in &self.instances {
                assert_eq!(
                    instance.room(room).await.1,
                    db.1,
                    "{room} read behind PostgreSQL"
                );
            }
        }
        (writes, converged_after)
    }

    async fn assert_redis_up(&self) {
        for base in self.bases() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let reply = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap()
                    .get(format!("{base}/health"))
                    .send()
                    .await;
                let body: Value = match reply {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => Value::Null,
                };
                if body["checks"]["redis"]["status"] == "up" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{base}: /health never showed Redis up: {body}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

struct Writes {
    ok: usize,
    failed: usize,
    /// Successful saves that started after the fault.
    ok_after: usize,
}

/// Saves numbers over HTTP into `rooms`, round robin over rooms and instances,
/// until `stop`; counts successes before and after `fault` is set.
fn spawn_writer(
    bases: Vec<String>,
    rooms: Vec<String>,
    stop: CancellationToken,
    fault: Arc<Mutex<Option<Instant>>>,
) -> JoinHandle<Writes> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        let mut writes = Writes {
            ok: 0,
            failed: 0,
            ok_after: 0,
        };
        for n in 0usize.. {
            if stop.is_cancelled() {
                break;
            }
            let base = &bases[n % bases.len()];
            let key = &rooms[(n / bases.len()) % rooms.len()];
            let started = Instant::now();
            let body = json!({"key": key, "number": n % 37, "id": format!("w-{n}")});
            let ok = http
                .post(format!("{base}/api/roulette/save"))
                .json(&body)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ok {
                writes.ok += 1;
                if fault.lock().unwrap().is_some_and(|at| started > at) {
                    writes.ok_after += 1;
                }
            } else {
                writes.failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writes
    })
}

fn rooms(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// The Cluster name of a room's cache entry and channel (see
/// `croupier::redis_layout`), for rooms without special characters.
fn cache_key(room: &str) -> String {
    format!("croupier:{{room:{room}}}:cache")
}

fn channel(room: &str) -> String {
    format!("croupier:{{room:{room}}}:events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_spreads_rooms_and_survives_a_master_killed_under_load() {
    let mut cluster = TestRedisCluster::start(3).await;
    let deployment = Deployment::start(&cluster.url()).await;
    deployment.assert_redis_up().await;
    let rooms = rooms("table", 12);
    let stop = CancellationToken::new();
    let members = deployment.members(&rooms, &stop).await;

    // Presence entries hash to every master; each instance lists them all.
    for instance in &deployment.instances {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = instance.admin_get("/api/admin/sessions").await;
            assert_eq!(status, 200, "{body}");
            let listed: u64 = body
                .as_array()
                .map(|rooms| {
                    rooms
                        .iter()
                        .filter_map(|r| r["activeConnections"].as_u64())
                        .sum()
                })
                .unwrap_or_default();
            if listed == members.len() as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "admin lists {listed} of {} connections: {body}",
                members.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Cross-instance order: writes through both instances reach every member.
    let fault = Arc::new(Mutex::new(None));
    let writing = CancellationToken::new();
    let writer = spawn_writer(
        deployment.bases(),
        rooms.clone(),
        writing.clone(),
        fault.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Rooms spread over the masters; each room's cache entry and channel share
    // its shard, and the channel is a sharded one there.
    let mut owners = std::collections::BTreeMap::new();
    for room in &rooms {
        let owner = cluster.owner_of(&cache_key(room)).await;
        assert_eq!(
            cluster.owner_of(&channel(room)).await,
            owner,
            "{room}: channel and cache entry on different shards"
        );
        owners
            .entry(owner)
            .or_insert_with(Vec::new)
            .push(room.clone());
    }
    assert_eq!(
        owners.len(),
        3,
        "12 rooms did not spread over 3 masters: {owners:?}"
    );
    for (port, owned) in &owners {
        let version = cli(*port, &["HGET", &cache_key(&owned[0]), "version"]).await;
        assert!(
            version.parse::<u64>().is_ok(),
            "{}: no cache entry on its master {port}: {version:?}",
            owned[0]
        );
        let sharded = cli(*port, &["PUBSUB", "SHARDCHANNELS", "croupier:*"]).await;
        assert!(
            sharded.contains(&channel(&owned[0])),
            "{}: not a shard channel on its master {port}: {sharded}",
            owned[0]
        );
        let plain = cli(*port, &["PUBSUB", "CHANNELS", "croupier:{room:*"]).await;
        assert!(plain.is_empty(), "room events on plain channels: {plain}");
    }

    // Kill the master of the first room under load; its replica takes over.
    let victim_room = &rooms[0];
    let master = cluster.owner_of(&cache_key(victim_room)).await;
    let replica = cluster.replica_of(master).await;
    let killed_at = Instant::now();
    *fault.lock().unwrap() = Some(killed_at);
    cluster.node_mut(master).kill();
    cluster.take_over(replica).await;
    let promoted_after = killed_at.elapsed();
    assert_eq!(cluster.owner_of(&cache_key(victim_room)).await, replica);
    // The promoted master carries the room's events again, and writes continue.
    let resubscribed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let sharded = cli(replica, &["PUBSUB", "SHARDCHANNELS", "croupier:*"]).await;
            if sharded.contains(&channel(victim_room)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let resubscribed_after = killed_at.elapsed();
    assert!(
        resubscribed.is_ok(),
        "instances never re-subscribed to {victim_room} on the promoted master"
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;

    // A graceful failover of another, live master: nothing breaks a
    // connection, the old master just answers MOVED and drops its shard
    // subscribers. The instances must find the new owner all the same.
    let other_room = rooms
        .iter()
        .find(|r| owners.get(&master).is_none_or(|owned| !owned.contains(r)))
        .expect("a room on another master")
        .clone();
    let other_master = cluster.owner_of(&cache_key(&other_room)).await;
    let other_replica = cluster.replica_of(other_master).await;
    let switched_at = Instant::now();
    cluster.fail_over(other_replica, &[]).await;
    let moved = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let sharded = cli(other_replica, &["PUBSUB", "SHARDCHANNELS", "croupier:*"]).await;
            if sharded.contains(&channel(&other_room)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        moved.is_ok(),
        "instances never subscribed to {other_room} on its new master after a graceful failover"
    );
    let followed_graceful_after = switched_at.elapsed();
    // Reads agree with PostgreSQL on both instances.
    let (writes, converged_after) = deployment
        .finish_writing(
            writer,
            &writing,
            Duration::from_millis(1000),
            &members,
            &rooms,
        )
        .await;
    stop.cancel();
    println!(
        "Redis Cluster: {} saves ({} after the master was killed, none failed); replica promoted {:.0} ms after \
         the kill, room re-subscribed on it {:.0} ms after the kill; after a graceful failover of another master its room \
         was subscribed on the new master within {:.0} ms; every member ({}) converged {:.0} ms after the last save",
        writes.ok,
        writes.ok_after,
        promoted_after.as_secs_f64() * 1e3,
        resubscribed_after.as_secs_f64() * 1e3,
        followed_graceful_after.as_secs_f64() * 1e3,
        members.len(),
        converged_after.as_secs_f64() * 1e3
    );
}

fn options() -> RedisBusOptions {
    RedisBusOptions {
        startup_timeout: Duration::from_secs(10),
        command_timeout: Duration::from_secs(1),
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_millis(500),
        ..RedisBusOptions::default()
    }
}

fn add(room: &str, n: u8) -> Mutation {
    Mutation {
        key: RoomKey::parse(room).unwrap(),
        change: Change::Added(Number::Single(n)),
        mutation_id: None,
        max_history: 10_000,
        authorized: true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_write_lost_in_a_cluster_failover_is_never_served() {
    let mut cluster = TestRedisCluster::start(3).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("rooms.db"))
        .await
        .unwrap();
    sqlite.migrate().await.unwrap();
    let store: DynStore = Arc::new(sqlite);
    let seed = cluster.url();
    let cached = |store: DynStore| {
        let url = seed.clone();
        async move {
            let client = connect_client(&url, &options()).await.unwrap();
            CachedStore::new(store, client, Duration::from_secs(60), 1000)
        }
    };
    let here = cached(store.clone()).await;
    // An instance that reads nothing while the failover happens.
    let idle = cached(store.clone()).await;
    let room = "lost";
    let key = RoomKey::parse(room).unwrap();

    let v1 = here.apply(add(room, 1)).await.unwrap().room;
    // The first read of a new instance flushes (it may have missed a failover);
    // then the cache serves.
    assert_eq!(here.room(&key).await.unwrap().unwrap(), v1);
    let hits = here.cache_stats().hits;
    assert_eq!(here.room(&key).await.unwrap().unwrap(), v1);
    assert_eq!(here.cache_stats().hits, hits + 1, "cache not in use");
    assert_eq!(idle.room(&key).await.unwrap().unwrap(), v1);

    let master = cluster.owner_of(&cache_key(room)).await;
    let replica = cluster.replica_of(master).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hget_anywhere(replica, &cache_key(room), "version").await != "1" {
        assert!(Instant::now() < deadline, "the replica never got version 1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The replica loses its link to the master and cannot get it back: the
    // master now wants a password the replica does not have (connections
    // already open, croupier's included, stay authenticated). Version 2
    // reaches only the master.
    let master_node = cluster.node(master);
    assert_eq!(
        master_node
            .cli(&["CONFIG", "SET", "requirepass", "no-replica"])
            .await,
        "OK"
    );
    let killed = cluster
        .node(replica)
        .cli(&["CLIENT", "KILL", "TYPE", "master"])
        .await;
    assert_eq!(killed, "1", "CLIENT KILL TYPE master on the replica");
    let v2 = here.apply(add(room, 2)).await.unwrap().room;
    assert_eq!(v2.version.get(), 2);
    let on_master = master_node
        .cli(&[
            "-a",
            "no-replica",
            "--no-auth-warning",
            "HGET",
            &cache_key(room),
            "version",
        ])
        .await;
    assert_eq!(on_master, "2");
    // The master dies; the replica, which never saw version 2, takes over.
    let failed_at = Instant::now();
    cluster.node_mut(master).kill();
    cluster.take_over(replica).await;
    assert_eq!(
        hget_anywhere(replica, &cache_key(room), "version").await,
        "1",
        "the failover did not lose the cache write (test set-up)"
    );

    // From here on no read may answer version 1: not on the instance that
    // wrote, not on the idle one, not on one that starts now.
    let fresh = cached(store.clone()).await;
    let mut recovered_after = None;
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        for (name, cache) in [("writer", &here), ("idle", &idle), ("fresh", &fresh)] {
            let read = cache.room(&key).await.unwrap().unwrap();
            assert_eq!(read, v2, "{name} served the lost cache write");
        }
        if recovered_after.is_none()
            && !here.is_stale()
            && hget_anywhere(replica, &cache_key(room), "version").await == "2"
        {
            recovered_after = Some(failed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered_after = recovered_after.expect("the cache never held version 2 again");
    let hits = here.cache_stats().hits;
    assert_eq!(here.room(&key).await.unwrap().unwrap(), v2);
    assert_eq!(
        here.cache_stats().hits,
        hits + 1,
        "cache not used again after the failover"
    );
    println!(
        "lost cache write: never served; the cache held the store's version again {:.0} ms after the master died",
        recovered_after.as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sentinel_failover_under_load_is_followed_by_every_instance() {
    let mut sentinel = TestSentinel::start(3).await;
    let deployment = Deployment::start(&sentinel.url()).await;
    deployment.assert_redis_up().await;
    let rooms = rooms("sentinel", 4);
    let stop = CancellationToken::new();
    let members = deployment.members(&rooms, &stop).await;
    let fault = Arc::new(Mutex::new(None));
    let writing = CancellationToken::new();
    let writer = spawn_writer(
        deployment.bases(),
        rooms.clone(),
        writing.clone(),
        fault.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let old_master = sentinel.master.port;
    assert_eq!(sentinel.master_port().await, Some(old_master));

    let killed_at = Instant::now();
    *fault.lock().unwrap() = Some(killed_at);
    sentinel.master.kill();
    let new_master = sentinel.replica.port;
    let deadline = Instant::now() + Duration::from_secs(30);
    while sentinel.master_port().await != Some(new_master) {
        assert!(
            Instant::now() < deadline,
            "Sentinel never promoted the replica: {}",
            sentinel.sentinels[0].log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted_after = killed_at.elapsed();
    // Both instances follow the new master: they subscribe there again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let clients = cli(new_master, &["CLIENT", "LIST"]).await;
        let subscribers = clients
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .any(|f| f.strip_prefix("sub=").is_some_and(|n| n != "0"))
            })
            .count();
        if subscribers >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances did not follow the new master: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let followed_after = killed_at.elapsed();
    // The cache on the new master serves what PostgreSQL holds.
    let (writes, converged_after) = deployment
        .finish_writing(
            writer,
            &writing,
            Duration::from_millis(1500),
            &members,
            &rooms,
        )
        .await;
    stop.cancel();
    println!(
        "Redis Sentinel: {} saves ({} after the master was killed, none failed); Sentinel promoted the replica \
         {:.1} s after the kill, both instances subscribed on it {:.1} s after the kill, every member ({}) \
         converged {:.0} ms after the last save",
        writes.ok,
        writes.ok_after,
        promoted_after.as_secs_f64(),
        followed_after.as_secs_f64(),
        members.len(),
        converged_after.as_secs_f64() * 1e3
    );
}

/// Cross-instance order and resume over a Redis Cluster: events written on
/// one instance reach a member of the other in order through the room's
/// shard, and a member that left resumes on the other instance with exactly
/// the events it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_and_resume_across_instances_over_a_redis_cluster() {
    let cluster = TestRedisCluster::start(3).await;
    let deployment = Deployment::start(&cluster.url()).await;
    let (node1, node2) = (&deployment.instances[0], &deployment.instances[1]);
    // Each instance reports the cluster's three masters, all answering.
    for node in [node1, node2] {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let scrape = support::exposition::scrape(node).await;
            let shards = scrape.exact("croupier_redis_shards", &[]);
            let up = scrape.exact("croupier_redis_shards_up", &[]);
            if shards == Some(3.0) && up == Some(3.0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shard gauges: {shards:?} known, {up:?} up"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let key = "resume-over-shards";
    let mut member = node1.ws().await;
    member
        .send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    let sync = member.recv().await;
    assert_eq!(sync["type"], "sync", "{sync}");
    for n in 1..=3u64 {
        let (status, reply) = node2
            .post("/api/roulette/save", &json!({"key": key, "number": n}))
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    for n in 1..=3u64 {
        let add = member.recv().await;
        assert_eq!(
            (&add["type"], &add["version"], &add["number"]),
            (&json!("add"), &json!(n), &json!(n)),
            "{add}"
        );
    }
    let (status, room) = node2.get(&format!("/api/roulette/{key}")).await;
    assert_eq!(status, 200, "{room}");
    let epoch = room["epoch"].clone();
    member.close().await;

    // Written while the member is away, on the instance it left.
    for n in 4..=5u64 {
        let (status, _) = node1
            .post("/api/roulette/save", &json!({"key": key, "number": n}))
            .await;
        assert_eq!(status, 200);
    }
    let mut resumed = node2.ws().await;
    resumed
        .send(json!({"type": "join", "key": key, "version": 3, "epoch": epoch}))
        .await;
    for n in 4..=5u64 {
        let add = resumed.recv().await;
        assert_eq!(
            (&add["type"], &add["version"]),
            (&json!("add"), &json!(n)),
            "{add}"
        );
    }
    let recovered = resumed.recv().await;
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["version"], 5, "{recovered}");
    let (history, version) = node2.room(key).await;
    assert_eq!((history, version), (json!([1, 2, 3, 4, 5]), 5));
}
