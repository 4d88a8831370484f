//! The Redis bus and the Redis room cache against a real `redis-server`.
//!
//! Each test starts its own server (see `support::redis`), so tests run in
//! parallel without seeing each other's channels or keys. Two `RedisBus`
//! values on one server stand for two instances of a cluster.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use croupier::bus::redis::{RedisBus, RedisBusOptions, connect_client};
use croupier::bus::{
    Broker, BusHealth, ConnectionInfo, ControlMessage, ControlPlane, Inbound, InboundHandler,
};
use croupier::domain::{Change, History, MutationId, Number, Room, RoomEvent, RoomKey, Version};
use croupier::store::cached::CachedStore;
use croupier::store::sqlite::SqliteStore;
use croupier::store::{DynStore, Mutation, Store};
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use support::redis::TestRedis;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

/// Fast reconnects so outage tests finish quickly.
fn options() -> RedisBusOptions {
    RedisBusOptions {
        startup_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(1),
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_millis(300),
        ..RedisBusOptions::default()
    }
}

/// What one instance's bus handed to its handler.
struct Inbox {
    rx: mpsc::UnboundedReceiver<Inbound>,
}

fn inbox() -> (InboundHandler, Inbox) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler: InboundHandler = Arc::new(move |inbound| {
        let _ = tx.send(inbound);
    });
    (handler, Inbox { rx })
}

impl Inbox {
    async fn next(&mut self) -> Inbound {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("nothing arrived from the bus in time")
            .expect("bus handler dropped")
    }

    async fn next_event(&mut self) -> RoomEvent {
        match self.next().await {
            Inbound::Event(event) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Skips everything until `pick` accepts a message.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(Inbound) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(inbound)) => {
                    if let Some(found) = pick(inbound) {
                        return found;
                    }
                }
                Ok(None) => panic!("bus handler dropped while waiting for {what}"),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    async fn assert_quiet(&mut self, for_: Duration) {
        if let Ok(Some(inbound)) = tokio::time::timeout(for_, self.rx.recv()).await {
            panic!("expected nothing, got {inbound:?}");
        }
    }
}

async fn instance(redis: &TestRedis, name: &str) -> (RedisBus, Inbox) {
    instance_with(redis, name, options()).await
}

async fn instance_with(
    redis: &TestRedis,
    name: &str,
    options: RedisBusOptions,
) -> (RedisBus, Inbox) {
    let (handler, inbox) = inbox();
    let bus = RedisBus::connect_with(&redis.url(), name, handler, options)
        .await
        .expect("connecting the Redis bus");
    (bus, inbox)
}

fn key(raw: &str) -> RoomKey {
    RoomKey::parse(raw).unwrap()
}

fn event(room: &str, version: u64, change: Change) -> RoomEvent {
    RoomEvent {
        key: key(room),
        epoch: "epoch-1".into(),
        version: Version::new(version),
        change,
        mutation_id: Some(MutationId::parse(format!("m{version}")).unwrap()),
        committed_at: Utc::now(),
    }
}

fn added(n: u8) -> Change {
    Change::Added(Number::Single(n))
}

/// A plain client for poking at Redis directly.
async fn raw_client(redis: &TestRedis) -> Client {
    connect_client(&redis.url(), &options())
        .await
        .expect("connecting a raw Redis client")
}

#[tokio::test]
async fn events_reach_subscribed_instances_but_not_their_sender() {
    let redis = TestRedis::start_new().await;
    let (a, mut a_in) = instance(&redis, "a").await;
    let (b, mut b_in) = instance(&redis, "b").await;
    a.subscribe(&key("Рулетка")).await.unwrap();
    b.subscribe(&key("Рулетка")).await.unwrap();

    let history = History::from_numbers(vec![
        Number::Single(0),
        Number::DoubleZero,
        Number::Single(36),
    ]);
    let sent = vec![
        event("Рулетка", 1, added(17)),
        event("Рулетка", 2, Change::Added(Number::DoubleZero)),
        event("Рулетка", 3, Change::Removed(0)),
        event("Рулетка", 4, Change::Replaced(history)),
        RoomEvent {
            mutation_id: None,
            ..event("Рулетка", 5, Change::Replaced(History::default()))
        },
    ];
    for e in &sent {
        a.publish(e).await.unwrap();
    }
    for e in &sent {
        // Every field survives the trip, including nanosecond commit times.
        assert_eq!(&b_in.next_event().await, e);
    }
    a_in.assert_quiet(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unsubscribed_rooms_are_not_delivered() {
    let redis = TestRedis::start_new().await;
    let (a, _a_in) = instance(&redis, "a").await;
    let (b, mut b_in) = instance(&redis, "b").await;

    b.subscribe(&key("one")).await.unwrap();
    a.publish(&event("two", 1, added(1))).await.unwrap();
    b_in.assert_quiet(Duration::from_millis(300)).await;

    b.unsubscribe(&key("one")).await.unwrap();
    a.publish(&event("one", 1, added(1))).await.unwrap();
    b_in.assert_quiet(Duration::from_millis(300)).await;

    b.subscribe(&key("one")).await.unwrap();
    a.publish(&event("one", 2, added(2))).await.unwrap();
    assert_eq!(b_in.next_event().await.version.get(), 2);
}

#[tokio::test]
async fn a_subscription_is_in_effect_when_subscribe_returns() {
    // The hub subscribes and then reads its snapshot; an event published right
    // after `subscribe` returned must therefore arrive, every time.
    let redis = TestRedis::start_new().await;
    let (a, _a_in) = instance(&redis, "a").await;
    let (b, mut b_in) = instance(&redis, "b").await;
    for i in 0..200 {
        let room = format!("room-{i}");
        b.subscribe(&key(&room)).await.unwrap();
        let e = event(&room, 1, added(i % 37));
        a.publish(&e).await.unwrap();
        assert_eq!(b_in.next_event().await, e);
    }
}

#[tokio::test]
async fn control_messages_reach_every_instance_including_the_sender() {
    let redis = TestRedis::start_new().await;
    let (a, mut a_in) = instance(&redis, "a").await;
    let (_b, mut b_in) = instance(&redis, "b").await;
    let message = ControlMessage::Disconnect {
        connection_id: "conn-7".into(),
    };
    a.control(message.clone()).await.unwrap();
    for inbox in [&mut a_in, &mut b_in] {
        match inbox.next().await {
            Inbound::Control(got) => assert_eq!(got, message),
            other => panic!("expected a control message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn malformed_messages_are_ignored_and_later_ones_still_arrive() {
    let redis = TestRedis::start_new().await;
    let (a, _a_in) = instance(&redis, "a").await;
    let (b, mut b_in) = instance(&redis, "b").await;
    b.subscribe(&key("r")).await.unwrap();
    let raw = raw_client(&redis).await;
    for garbage in [
        "",
        "not json",
        "{}",
        r#"{"origin":"x","key":"r","kind":"add","value":99}"#,
    ] {
        let _: i64 = raw.publish("croupier:room:r", garbage).await.unwrap();
    }
    let _: i64 = raw
        .publish("croupier:control", r#"{"type":"explode"}"#)
        .await
        .unwrap();
    // An event whose key does not match its channel is refused too.
    let _: i64 = raw
        .publish(
            "croupier:room:r",
            r#"{"origin":"x","key":"other","epoch":"e","version":1,"kind":"add","value":1,"committedAt":"2024-01-01T00:00:00Z"}"#,
        )
        .await
        .unwrap();
    let good = event("r", 1, added(3));
    a.publish(&good).await.unwrap();
    assert_eq!(b_in.next_event().await, good);
}

#[tokio::test]
async fn presence_is_shared_and_entries_of_a_silent_instance_expire() {
    let redis = TestRedis::start_new().await;
    let short = RedisBusOptions {
        presence_ttl: Duration::from_millis(700),
        ..options()
    };
    let (a, _a_in) = instance_with(&redis, "a", short).await;
    let (b, _b_in) = instance(&redis, "b").await;
    let info = |id: &str, instance: &str| ConnectionInfo {
        id: id.into(),
        instance: instance.into(),
        rooms: vec!["r".into(), "Рулетка".into()],
        connected_at: Utc::now(),
        last_activity: Utc::now(),
        ip_address: "127.0.0.1".into(),
        user_agent: "test".into(),
    };
    let ids = |list: Vec<ConnectionInfo>| {
        let mut ids: Vec<String> = list.into_iter().map(|c| c.id).collect();
        ids.sort();
        ids
    };
    let a1 = info("a-1", "a");
    let a2 = info("a-2", "a");
    let b1 = info("b-1", "b");

    a.put_presence(&a1).await.unwrap();
    a.put_presence(&a2).await.unwrap();
    b.put_presence(&b1).await.unwrap();
    let mut listed = b.presence().await.unwrap();
    listed.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(listed, [a1, a2, b1]);

    a.remove_presence("a-2").await.unwrap();
    assert_eq!(ids(a.presence().await.unwrap()), ["a-1", "b-1"]);

    // Instance a stops refreshing (as if it crashed): its entries vanish on their own.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(ids(b.presence().await.unwrap()), ["b-1"]);

    // Join counts are cluster-wide.
    a.count_join(&key("r")).await.unwrap();
    b.count_join(&key("r")).await.unwrap();
    b.count_join(&key("s")).await.unwrap();
    let counts = a.join_counts().await.unwrap();
    assert_eq!(counts.get("r"), Some(&2));
    assert_eq!(counts.get("s"), Some(&1));
}

#[tokio::test]
async fn a_redis_restart_resyncs_resubscribes_and_delivers_again() {
    let mut redis = TestRedis::start_new().await;
    let (a, mut a_in) = instance(&redis, "a").await;
    let (b, mut b_in) = instance(&redis, "b").await;
    b.subscribe(&key("r")).await.unwrap();
    a.publish(&event("r", 1, added(1))).await.unwrap();
    assert_eq!(b_in.next_event().await.version.get(), 1);
    assert!(matches!(a.health().await, BusHealth::Up(_)));

    redis.stop();
    let deadline = Instant::now() + WAIT;
    while a.health().await != BusHealth::Down {
        assert!(
            Instant::now() < deadline,
            "health still up with Redis stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        a.publish(&event("r", 2, added(2))).await.is_err(),
        "publish succeeded with Redis down"
    );
    // A room joined during the outage is subscribed once Redis is back.
    let _ = b.subscribe(&key("joined-while-down")).await;

    redis.start().await;
    b_in.wait_for("resync on b", |m| {
        matches!(m, Inbound::Resync).then_some(())
    })
    .await;
    a_in.wait_for("resync on a", |m| {
        matches!(m, Inbound::Resync).then_some(())
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while !matches!(a.health().await, BusHealth::Up(_)) {
        assert!(
            Instant::now() < deadline,
            "health still down after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each connection reconnects on its own schedule, and whatever is published
    // before b's subscriber is back is lost (b's later resync covers it). So keep
    // publishing until the event arrives: it must, for both rooms.
    for (room, version) in [("r", 3), ("joined-while-down", 1)] {
        let e = event(room, version, added(3));
        let deadline = Instant::now() + WAIT;
        let got = loop {
            assert!(
                Instant::now() < deadline,
                "no event for {room} after the restart"
            );
            let _ = a.publish(&e).await;
            let wait = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    match b_in.rx.recv().await {
                        Some(Inbound::Event(got)) if got.key.as_str() == room => return got,
                        Some(_) => continue,
                        None => panic!("bus handler dropped"),
                    }
                }
            });
            if let Ok(got) = wait.await {
                break got;
            }
        };
        assert_eq!(got, e);
    }
}

#[tokio::test]
async fn start_up_waits_for_redis_but_not_forever() {
    let mut redis = TestRedis::start_new().await;
    redis.stop();

    let started = Instant::now();
    let (handler, _inbox) = inbox();
    let quick = RedisBusOptions {
        startup_timeout: Duration::from_secs(1),
        ..options()
    };
    let result = RedisBus::connect_with(&redis.url(), "x", handler, quick).await;
    assert!(result.is_err(), "connected to a stopped Redis");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "gave up too early"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took too long to give up"
    );

    let (handler, _inbox) = inbox();
    let url = redis.url();
    let patient = RedisBusOptions {
        startup_timeout: Duration::from_secs(15),
        ..options()
    };
    let connecting =
        tokio::spawn(async move { RedisBus::connect_with(&url, "late", handler, patient).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.start().await;
    let bus = connecting
        .await
        .unwrap()
        .expect("connects once Redis is up");
    assert!(matches!(bus.health().await, BusHealth::Up(_)));
}

// ---- the room cache --------------------------------------------------------

struct CacheFixture {
    _dir: tempfile::TempDir,
    inner: DynStore,
    raw: Client,
    redis: TestRedis,
}

async fn cache_fixture() -> CacheFixture {
    let redis = TestRedis::start_new().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("rooms.db"))
        .await
        .unwrap();
    sqlite.migrate().await.unwrap();
    let raw = raw_client(&redis).await;
    CacheFixture {
        _dir: dir,
        inner: Arc::new(sqlite),
        raw,
        redis,
    }
}

impl CacheFixture {
    async fn cached(&self, max_cached_history: usize) -> CachedStore {
        let client = connect_client(&self.redis.url(), &options()).await.unwrap();
        CachedStore::new(
            self.inner.clone(),
            client,
            Duration::from_secs(60),
            max_cached_history,
        )
    }

    /// The cached version of a room, straight from Redis.
    async fn cached_version(&self, room: &str) -> Option<String> {
        self.raw
            .hget(format!("croupier:cache:room:{room}"), "version")
            .await
            .unwrap()
    }
}

fn mutation(room: &str, change: Change) -> Mutation {
    Mutation {
        key: key(room),
        change,
        mutation_id: None,
        max_history: 10_000,
        authorized: true,
    }
}

#[tokio::test]
async fn cache_misses_once_then_hits() {
    let fx = cache_fixture().await;
    let cached = fx.cached(100).await;
    fx.inner.apply(mutation("t", added(5))).await.unwrap();

    assert_eq!(cached.room(&key("nobody")).await.unwrap(), None);
    let first = cached.room(&key("t")).await.unwrap().unwrap();
    assert_eq!(cached.cache_stats().hits, 0);
    assert_eq!(cached.cache_stats().misses, 2);
    let second = cached.room(&key("t")).await.unwrap().unwrap();
    assert_eq!(cached.cache_stats().hits, 1);
    assert_eq!(first, second);
    assert_eq!(Some(first), fx.inner.room(&key("t")).await.unwrap());

    // Proof that the hit came from Redis: a write that bypasses the cache is not seen.
    fx.inner.apply(mutation("t", added(6))).await.unwrap();
    assert_eq!(
        cached.room(&key("t")).await.unwrap().unwrap().version.get(),
        1
    );
}

#[tokio::test]
async fn write_through_keeps_every_instance_current() {
    let fx = cache_fixture().await;
    let here = fx.cached(100).await;
    let there = fx.cached(100).await;
    let changes = [
        added(1),
        added(2),
        Change::Added(Number::DoubleZero),
        Change::Removed(0),
        Change::Replaced(History::from_numbers(vec![
            Number::Single(7),
            Number::Single(8),
        ])),
        Change::Removed(1),
        Change::Replaced(History::default()),
    ];
    for (i, change) in changes.into_iter().enumerate() {
        let applied = here.apply(mutation("w", change)).await.unwrap();
        let truth = fx.inner.room(&key("w")).await.unwrap().unwrap();
        assert_eq!(applied.room, truth);
        assert_eq!(
            here.room(&key("w")).await.unwrap().unwrap(),
            truth,
            "after change {i}"
        );
        assert_eq!(
            there.room(&key("w")).await.unwrap().unwrap(),
            truth,
            "elsewhere after change {i}"
        );
    }
    // Every read was served from the cache: write-through, not fill on miss.
    assert_eq!(here.cache_stats().misses, 0);
    assert_eq!(there.cache_stats().misses, 0);

    let auth = here
        .create_room(&key("locked"), Some("$argon2id$fake".into()))
        .await
        .unwrap();
    let got = there.room(&key("locked")).await.unwrap().unwrap();
    assert_eq!(got, auth.room);
    assert!(got.protected);
    assert_eq!(there.cache_stats().misses, 0);
}

#[tokio::test]
async fn an_older_version_never_overwrites_a_newer_one() {
    let fx = cache_fixture().await;
    let writer = fx.cached(100).await;
    let late = fx.cached(100).await;
    let v1 = writer.apply(mutation("o", added(1))).await.unwrap().room;
    let v2 = writer.apply(mutation("o", added(2))).await.unwrap().room;
    let v3 = writer
        .apply(mutation("o", Change::Removed(0)))
        .await
        .unwrap()
        .room;

    // Writers on other instances that finish late, in any order.
    late.write_through(&v1).await;
    late.write_through(&v2).await;
    writer.write_through(&v3).await;
    assert_eq!(late.room(&key("o")).await.unwrap().unwrap(), v3);
    assert_eq!(fx.cached_version("o").await.as_deref(), Some("3"));

    // A different epoch (room recreated, database restored) always replaces.
    let reborn = Room {
        epoch: "new-epoch".into(),
        version: Version::ZERO,
        history: History::default(),
        ..v3.clone()
    };
    late.write_through(&reborn).await;
    assert_eq!(writer.room(&key("o")).await.unwrap().unwrap(), reborn);
}

#[tokio::test]
async fn long_histories_are_not_cached_and_not_resurrected() {
    let fx = cache_fixture().await;
    let cached = fx.cached(2).await;
    cached.apply(mutation("long", added(1))).await.unwrap();
    let v2 = cached.apply(mutation("long", added(2))).await.unwrap().room;
    assert_eq!(cached.room(&key("long")).await.unwrap().unwrap(), v2);
    assert_eq!(cached.cache_stats().hits, 1);

    let v3 = cached.apply(mutation("long", added(3))).await.unwrap().room;
    // A late write of v2 must not bring the shorter, older room back.
    cached.write_through(&v2).await;
    for _ in 0..2 {
        assert_eq!(cached.room(&key("long")).await.unwrap().unwrap(), v3);
    }
    assert_eq!(cached.cache_stats().hits, 1);
    assert_eq!(cached.cache_stats().misses, 2);
    let blob: Option<String> = fx
        .raw
        .hget("croupier:cache:room:long", "room")
        .await
        .unwrap();
    assert_eq!(blob, None);
}

#[tokio::test]
async fn reads_survive_an_outage_and_a_lost_write_is_never_served() {
    let mut fx = cache_fixture().await;
    let cached = fx.cached(100).await;
    let v1 = cached.apply(mutation("d", added(1))).await.unwrap().room;
    assert_eq!(cached.room(&key("d")).await.unwrap().unwrap(), v1);
    // Persist v1 so that the restarted server brings the outdated entry back.
    let save = CustomCommand::new_static("SAVE", ClusterHash::FirstKey, false);
    let _: String = fx.raw.custom(save, Vec::<String>::new()).await.unwrap();

    fx.redis.stop();
    assert_eq!(
        cached.room(&key("d")).await.unwrap().unwrap(),
        v1,
        "read failed with Redis down"
    );
    let v2 = cached
        .apply(mutation("d", added(2)))
        .await
        .expect("writes do not depend on Redis")
        .room;
    assert!(cached.is_stale());
    assert_eq!(cached.room(&key("d")).await.unwrap().unwrap(), v2);
    assert_eq!(cached.room(&key("nobody")).await.unwrap(), None);

    fx.redis.start().await;
    assert_eq!(
        fx.cached_version("d").await.as_deref(),
        Some("1"),
        "the dump did not bring v1 back"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        // Never v1, not even once, while the cache is being brought back.
        assert_eq!(cached.room(&key("d")).await.unwrap().unwrap(), v2);
        if !cached.is_stale() && fx.cached_version("d").await.as_deref() == Some("2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache never recovered after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hits = cached.cache_stats().hits;
    assert_eq!(cached.room(&key("d")).await.unwrap().unwrap(), v2);
    assert_eq!(
        cached.cache_stats().hits,
        hits + 1,
        "cache not used again after recovery"
    );
}
