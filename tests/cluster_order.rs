//! One order per room across a three-instance cluster
//! (`tests/support/cluster.rs`): writers on every instance produce one sequence
//! that every member and PostgreSQL agree on, a member resumes on any instance
//! with exactly the events it missed, and reads on one instance follow writes
//! made on another. Each test starts its own cluster.
//!
//! Run with `--nocapture` to see the figures each test measures.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::app::eventually;
use support::cluster::{DbEvent, TestCluster};
use support::contract::QUIET;
use support::members::{Replica, join, send_within};
use tokio_tungstenite::tungstenite::Message;

/// Reads `count` room events from a stream of v2 frames (after the greeting).
async fn collect_events<S>(mut stream: S, count: usize, who: String) -> Vec<Value>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .unwrap_or_else(|_| panic!("{who}: stalled after {} events", events.len()));
        match message {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                assert_eq!(frame["type"], "add", "{who}: unexpected frame {frame}");
                events.push(frame);
            }
            Some(Ok(Message::Close(frame))) => {
                panic!("{who}: closed ({frame:?}) after {} events", events.len())
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{who}: {e} after {} events", events.len()),
            None => panic!("{who}: stream ended after {} events", events.len()),
        }
    }
    events
}

/// A member on every instance, joined to `key` before it exists, each
/// collecting `total` events (named `who` on node-N in failures).
async fn watch_everywhere(
    cluster: &TestCluster,
    key: &str,
    total: usize,
    who: &str,
) -> Vec<tokio::task::JoinHandle<Vec<Value>>> {
    let mut readers = Vec::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let (ws, sync) = join(
            &instance.ws_url(),
            json!({"type": "join", "key": key, "version": 0}),
        )
        .await;
        assert_eq!(sync["version"], 0, "{sync}");
        readers.push(tokio::spawn(collect_events(
            ws.into_inner(),
            total,
            format!("{who} on node-{}", i + 1),
        )));
    }
    readers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_on_three_instances_produce_one_order_everywhere() {
    const WRITES: usize = 1000;
    let cluster = TestCluster::start(
        3,
        &[("WS_RATE_LIMIT", "100000"), ("WS_RATE_BURST", "100000")],
    )
    .await;
    let key = "order";
    let total = WRITES * cluster.instances.len();

    // A watcher on every instance, joined before the room exists.
    let mut readers = watch_everywhere(&cluster, key, total, "watcher").await;
    // A writer on every instance; its own socket also receives every event.
    let mut sinks = Vec::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let (ws, sync) = join(
            &instance.ws_url(),
            json!({"type": "join", "key": key, "version": 0}),
        )
        .await;
        assert_eq!(sync["version"], 0, "{sync}");
        let (sink, stream) = ws.into_inner().split();
        readers.push(tokio::spawn(collect_events(
            stream,
            total,
            format!("writer on node-{}", i + 1),
        )));
        sinks.push(sink);
    }

    let started = Instant::now();
    let mut senders = Vec::new();
    for (w, mut sink) in sinks.into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            for j in 0..WRITES {
                let add = json!({"type": "add", "key": key, "number": (w * WRITES + j) % 37, "id": format!("w{w}-{j}")});
                assert!(send_within(&mut sink, &add).await, "writer {w}: the server stopped reading at add {j}");
            }
            sink
        }));
    }
    let mut sinks = Vec::new();
    for sender in senders {
        sinks.push(sender.await.expect("sender"));
    }
    let mut streams = Vec::new();
    for reader in readers {
        streams.push(reader.await.expect("reader"));
    }
    let elapsed = started.elapsed();
    println!(
        "cross-instance ordering: {total} adds from 3 instances delivered to 6 members in {:.2} s ({:.0} acknowledged adds/s)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );

    // Every member: versions 1..=3000 in order, each id exactly once, each
    // writer's adds in the order it sent them — and all members identical.
    let reference = &streams[0];
    for (m, events) in streams.iter().enumerate() {
        let mut seen = HashSet::new();
        let mut last_of_writer = [None::<usize>; 3];
        for (i, e) in events.iter().enumerate() {
            assert_eq!(
                e["version"],
                json!(i + 1),
                "member {m}: event {i} out of order: {e}"
            );
            let id = e["id"].as_str().expect("id");
            assert!(
                seen.insert(id.to_owned()),
                "member {m}: {id} delivered twice"
            );
            let (w, j) = id[1..].split_once('-').expect("writer id");
            let (w, j): (usize, usize) = (w.parse().expect("w"), j.parse().expect("j"));
            assert_eq!(e["number"], json!((w * WRITES + j) % 37), "member {m}: {e}");
            assert!(
                last_of_writer[w].is_none_or(|prev| prev < j),
                "member {m}: writer {w}'s adds reordered at {e}"
            );
            last_of_writer[w] = Some(j);
        }
        assert_eq!(seen.len(), total);
        assert_eq!(
            events, reference,
            "member {m} saw another sequence than member 0"
        );
    }

    // PostgreSQL holds exactly that history and event log.
    let (history, version) = cluster.db_room(key).await.expect("room");
    assert_eq!(version, total as u64);
    let numbers: Vec<Value> = reference.iter().map(|e| e["number"].clone()).collect();
    assert_eq!(history, json!(numbers), "stored history");
    let logged: Vec<(u64, Value, Option<String>)> = cluster
        .db_events(key)
        .await
        .into_iter()
        .map(|e| (e.version, e.payload, e.mutation_id))
        .collect();
    let delivered: Vec<(u64, Value, Option<String>)> = reference
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().expect("version"),
                e["number"].clone(),
                e["id"].as_str().map(str::to_owned),
            )
        })
        .collect();
    assert_eq!(logged, delivered, "event log");
    for instance in &cluster.instances {
        assert_eq!(instance.room(key).await, (history.clone(), version));
    }
    drop(sinks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_resumes_through_nginx_after_events_on_other_instances() {
    let cluster = TestCluster::start(3, &[]).await;
    let key = "resume";
    let [a, b, c] = [
        &cluster.instances[0],
        &cluster.instances[1],
        &cluster.instances[2],
    ];
    let (status, body) = a
        .put(
            &format!("/api/roulette/{key}"),
            &json!({"history": [1, 2, 3]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let epoch = body["data"]["epoch"].as_str().expect("epoch").to_owned();

    // The member on A sees two adds made on B, then goes away at version 3.
    let (mut member, sync) = join(
        &a.ws_url(),
        json!({"type": "join", "key": key, "version": 0}),
    )
    .await;
    assert_eq!(
        sync,
        json!({"type": "sync", "key": key, "history": [1, 2, 3], "full": true, "version": 1, "epoch": epoch})
    );
    for n in [4, 5] {
        let (status, body) = b
            .post("/api/roulette/save", &json!({"key": key, "number": n}))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let mut replica = Replica::default();
    replica.apply(&sync, "member");
    for _ in 0..2 {
        replica.apply(&member.recv().await, "member");
    }
    assert_eq!(
        (replica.version, json!(replica.history)),
        (3, json!([1, 2, 3, 4, 5]))
    );
    member.close().await;

    // While it is away: adds, a remove and replaces on B (HTTP) and C (WebSocket).
    // A v2 member on C records each event exactly as a member receives it.
    let (mut writer, _) = join(
        &c.ws_url(),
        json!({"type": "join", "key": key, "version": 0}),
    )
    .await;
    let save = |n: Value, id: &str| json!({"key": key, "number": n, "id": id});
    let mut missed = Vec::new();
    for step in 0..8 {
        match step {
            0 => assert_eq!(
                b.post("/api/roulette/save", &save(json!(7), "b-1")).await.0,
                200
            ),
            1 => {
                writer
                    .send(json!({"type": "add", "number": 8, "id": "c-1"}))
                    .await
            }
            2 => writer.send(json!({"type": "remove", "index": 0})).await,
            3 => assert_eq!(
                b.post("/api/roulette/save", &save(json!("00"), "b-2"))
                    .await
                    .0,
                200
            ),
            4 => {
                writer
                    .send(json!({"type": "update", "history": [9, 10, 11]}))
                    .await
            }
            5 => assert_eq!(
                b.put(&format!("/api/roulette/{key}"), &json!({"history": [12]}))
                    .await
                    .0,
                200
            ),
            6 => writer.send(json!({"type": "add", "number": 36})).await,
            _ => assert_eq!(
                b.post("/api/roulette/save", &save(json!(0), "b-3")).await.0,
                200
            ),
        }
        let event = writer.recv().await;
        assert_eq!(event["version"], json!(4 + step), "{event}");
        missed.push(event);
    }
    let final_version = 3 + missed.len() as u64;
    assert_eq!(
        cluster.db_room(key).await,
        Some((json!([12, 36, 0]), final_version))
    );

    // Back through Nginx, with its version and epoch: exactly the missed events,
    // in order, then `recovered`. The same on each instance directly, whether it
    // has the events in memory (C), only in the store's log (B), or had the
    // member before (A).
    let recovered =
        json!({"type": "recovered", "key": key, "version": final_version, "epoch": epoch});
    let resume = json!({"type": "join", "key": key, "version": 3, "epoch": epoch});
    let mut urls = vec![("nginx", cluster.ws_url())];
    urls.extend([
        ("node-1", a.ws_url()),
        ("node-2", b.ws_url()),
        ("node-3", c.ws_url()),
    ]);
    for (via, url) in &urls {
        let (mut back, first) = join(url, resume.clone()).await;
        let mut frames = vec![first];
        for _ in 0..missed.len() {
            frames.push(back.recv().await);
        }
        for (i, expected) in missed.iter().enumerate() {
            assert_eq!(&frames[i], expected, "resume via {via}: replayed event {i}");
        }
        assert_eq!(frames[missed.len()], recovered, "resume via {via}");
        back.expect_silence(QUIET).await;
        let mut resumed = replica.clone();
        for f in &frames {
            resumed.apply(f, via);
        }
        assert_eq!(
            json!(resumed.history),
            json!([12, 36, 0]),
            "replaying from version 3 via {via}"
        );
    }

    // The resumed membership is live, and another epoch gets one full sync.
    let (mut back, _) = join(&cluster.ws_url(), resume.clone()).await;
    for _ in 0..missed.len() {
        back.recv().await;
    }
    writer.send(json!({"type": "add", "number": 1})).await;
    let live = json!({"type": "add", "key": key, "number": 1, "version": final_version + 1});
    assert_eq!(writer.recv().await, live);
    assert_eq!(back.recv().await, live);
    let (mut stale, first) = join(
        &cluster.ws_url(),
        json!({"type": "join", "key": key, "version": 3, "epoch": "another-epoch"}),
    )
    .await;
    assert_eq!(
        first,
        json!({"type": "sync", "key": key, "history": [12, 36, 0, 1], "full": true, "version": final_version + 1, "epoch": epoch})
    );
    stale.expect_silence(QUIET).await;
}

/// A room read on one instance is answered from that instance's snapshot once
/// it follows the room; writes made elsewhere reach the snapshot over Redis, and
/// while its subscription is down the instance reads PostgreSQL/Redis instead of
/// serving a snapshot that may have fallen behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_one_instance_follow_writes_on_another() {
    let cluster = TestCluster::start(2, &[]).await;
    let [a, b] = [&cluster.instances[0], &cluster.instances[1]];
    let key = "followed";
    let (status, body) = b
        .put("/api/roulette/followed", &json!({"history": [0]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(a.room(key).await, (json!([0]), 1));

    let mut expected = vec![json!(0)];
    let mut fresh_at_once = 0;
    for i in 0..100u64 {
        let number = json!((i * 11) % 37);
        let (status, body) = b
            .post("/api/roulette/save", &json!({"key": key, "number": number}))
            .await;
        assert_eq!(status, 200, "{body}");
        expected.push(number);
        let target = (json!(expected), i + 2);
        if a.room(key).await == target {
            fresh_at_once += 1;
            continue;
        }
        eventually(
            Duration::from_secs(5),
            "node-1 reads node-2's write",
            || {
                let target = target.clone();
                async move { (a.room(key).await == target).then_some(()) }
            },
        )
        .await;
    }
    println!("node-1 read node-2's write at once after {fresh_at_once} of 100 saves");

    // Cut node-1's subscription and keep it from coming back; once node-1 knows,
    // every read there must show each write made on node-2 at once.
    let mut redis = cluster.redis_admin().await;
    let clients = redis.client_count().await;
    let limit = (clients - 1).to_string();
    redis
        .command(&["CONFIG", "SET", "maxclients", &limit])
        .await;
    assert_eq!(redis.kill_links(a, "pubsub").await, 1);
    eventually(
        Duration::from_secs(10),
        "node-1 notices the cut",
        || async {
            let text = a.send(a.http.get(a.url("/metrics"))).await.text;
            text.contains("croupier_dependency_up{dependency=\"redis\"} 0")
                .then_some(())
        },
    )
    .await;
    for i in 0..20u64 {
        let (status, body) = b
            .post("/api/roulette/save", &json!({"key": key, "number": i}))
            .await;
        assert_eq!(status, 200, "{body}");
        expected.push(json!(i));
        assert_eq!(
            a.room(key).await,
            (json!(expected), 102 + i),
            "read on node-1 while its subscription is down, after save {i}"
        );
    }
    redis
        .command(&["CONFIG", "SET", "maxclients", "10000"])
        .await;
}
/// HTTP writers on two instances at once, several in flight on each, so that
/// each instance commits batches of saves while the other writes the same
/// room: every acknowledged save is stored exactly once, each reply is the
/// room right after its own save, and the members on both instances see the
/// store's one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batches_from_two_instances_make_one_order() {
    const WRITERS: usize = 8;
    const SAVES: usize = 40;
    let cluster = TestCluster::start(2, &[]).await;
    let key = "batches";
    let total = 2 * WRITERS * SAVES;

    let readers = watch_everywhere(&cluster, key, total, "member").await;

    let mut writers = Vec::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        for w in 0..WRITERS {
            let (http, url) = (instance.http.clone(), instance.url("/api/roulette/save"));
            writers.push(tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for j in 0..SAVES {
                    let id = format!("n{i}-w{w}-{j}");
                    let number = (w * SAVES + j) % 37;
                    let reply = http
                        .post(&url)
                        .json(&json!({"key": key, "number": number, "id": id}))
                        .send()
                        .await
                        .expect("save");
                    assert_eq!(reply.status(), 200, "{id}");
                    let body: Value = reply.json().await.expect("JSON reply");
                    let data = &body["data"];
                    let version = data["version"].as_u64().expect("version");
                    let history = data["history"].as_array().expect("history");
                    // The room right after this save, whatever else its batch held.
                    assert_eq!(history.len() as u64, version, "{id}: {body}");
                    assert_eq!(history.last(), Some(&json!(number)), "{id}: {body}");
                    acknowledged.push((id, version, number));
                }
                acknowledged
            }));
        }
    }
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    let mut streams = Vec::new();
    for reader in readers {
        streams.push(reader.await.expect("member"));
    }

    // The event log: versions 1..=total, each acknowledged id exactly once, at
    // the version its reply named.
    let logged = cluster.db_events(key).await;
    assert_eq!(logged.len(), total, "event log length");
    for (i, event) in logged.iter().enumerate() {
        assert_eq!(event.version, i as u64 + 1, "event log out of order");
    }
    let by_id: BTreeMap<&str, &DbEvent> = logged
        .iter()
        .map(|e| (e.mutation_id.as_deref().expect("id logged"), e))
        .collect();
    assert_eq!(by_id.len(), total, "an id was logged twice");
    for (id, version, number) in &acknowledged {
        let event = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} acknowledged, not stored"));
        assert_eq!(event.version, *version, "{id}: reply and log disagree");
        assert_eq!(event.payload, json!(number), "{id}");
    }

    // Both instances' members saw exactly that order.
    let stored: Vec<(u64, Value, Option<String>)> = logged
        .iter()
        .map(|e| (e.version, e.payload.clone(), e.mutation_id.clone()))
        .collect();
    for (m, events) in streams.iter().enumerate() {
        let seen: Vec<(u64, Value, Option<String>)> = events
            .iter()
            .map(|e| {
                (
                    e["version"].as_u64().expect("version"),
                    e["number"].clone(),
                    e["id"].as_str().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(seen, stored, "member on node-{} diverged", m + 1);
    }
    let (history, version) = cluster.db_room(key).await.expect("room");
    assert_eq!(version, total as u64);
    for instance in &cluster.instances {
        assert_eq!(instance.room(key).await, (history.clone(), version));
    }
}
