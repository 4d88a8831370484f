//! Many writers on one room: every mutation gets its own version, versions are
//! contiguous, and every member sees every event once, in version order.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::app::{TestServer, WsClient, WsEvent};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 20;
const ADDS_PER_CONNECTION: usize = 100;
const TOTAL: usize = CONNECTIONS * ADDS_PER_CONNECTION;

fn number_for(client: usize, seq: usize) -> Value {
    // Covers the whole wheel, "00" included, with a value that differs between
    // neighbouring messages.
    match (client * 7 + seq * 3) % 38 {
        37 => json!("00"),
        n => json!(n),
    }
}

/// Reads frames until `count` events arrived (or anything unexpected happens).
async fn collect_events(
    mut stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
    count: usize,
) -> Result<Vec<Value>, String> {
    let mut events = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while events.len() < count {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| format!("timed out after {} events", events.len()))?;
        match message {
            Some(Ok(Message::Text(text))) => {
                let value: Value =
                    serde_json::from_str(&text).map_err(|e| format!("non-JSON frame: {e}"))?;
                if value["type"] != "add" {
                    return Err(format!(
                        "unexpected frame after {} events: {value}",
                        events.len()
                    ));
                }
                events.push(value);
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed after {} events: {frame:?}", events.len()));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read error after {} events: {e}", events.len())),
            None => return Err(format!("stream ended after {} events", events.len())),
        }
    }
    Ok(events)
}

/// Follows a v1 (`sync` with the history) or seed (`numberSaved`) member until
/// the history has `count` numbers; every frame must extend the previous
/// history by exactly one number. Returns the numbers in the order they came.
async fn follow_histories(
    mut ws: WsClient,
    frame_type: &'static str,
    count: usize,
) -> Result<Vec<Value>, String> {
    let mut previous: Vec<Value> = Vec::new();
    let mut appended = Vec::with_capacity(count);
    while previous.len() < count {
        let frame = match ws.next_within(Duration::from_secs(60)).await {
            WsEvent::Json(frame) => frame,
            WsEvent::Closed(code) => {
                return Err(format!("closed ({code:?}) after {} events", previous.len()));
            }
        };
        if frame["type"] != frame_type {
            return Err(format!(
                "unexpected frame after {} events: {frame}",
                previous.len()
            ));
        }
        let history = frame["history"]
            .as_array()
            .cloned()
            .ok_or("frame without history")?;
        if history.len() != previous.len() + 1 || history[..previous.len()] != previous[..] {
            return Err(format!(
                "history of {} numbers followed by one of {}",
                previous.len(),
                history.len()
            ));
        }
        if frame_type == "numberSaved" && frame["number"] != history[previous.len()] {
            return Err(format!(
                "numberSaved {} but history ends with {}",
                frame["number"],
                history[previous.len()]
            ));
        }
        appended.push(history[previous.len()].clone());
        previous = history;
    }
    Ok(appended)
}

/// Joins (v2) after `delay`, while the writers run; returns the greeting and
/// the events after it, up to version `last`.
async fn late_joiner(
    url: String,
    delay: Duration,
    last: u64,
) -> Result<(Value, Vec<Value>), String> {
    tokio::time::sleep(delay).await;
    let mut ws = WsClient::connect(&url).await;
    ws.send(json!({"type": "join", "key": "race", "version": 0}))
        .await;
    let sync = match ws.next_within(Duration::from_secs(30)).await {
        WsEvent::Json(frame) => frame,
        WsEvent::Closed(code) => return Err(format!("closed ({code:?}) before its sync")),
    };
    let mut version = sync["version"]
        .as_u64()
        .ok_or_else(|| format!("bad greeting {sync}"))?;
    let mut events = Vec::new();
    while version < last {
        match ws.next_within(Duration::from_secs(60)).await {
            WsEvent::Json(frame) => {
                version = frame["version"]
                    .as_u64()
                    .ok_or_else(|| format!("bad frame {frame}"))?;
                events.push(frame);
            }
            WsEvent::Closed(code) => return Err(format!("closed ({code:?}) at version {version}")),
        }
    }
    Ok((sync, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sockets_a_hundred_adds_each_every_member_sees_all_in_order() {
    let s = TestServer::start(&[("WS_RATE_LIMIT", "100000"), ("WS_RATE_BURST", "100000")]).await;

    // Every connection is a member before anyone writes, so each must see all.
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut ws = s.ws().await;
        ws.send(json!({"type": "join", "key": "race", "version": 0}))
            .await;
        let sync = ws.recv().await;
        assert_eq!(sync["type"], "sync", "{sync}");
        assert_eq!(sync["version"], 0, "{sync}");
        clients.push(ws);
    }

    // The same events in the older dialects, and members joining mid-stream.
    let mut v1 = s.ws().await;
    v1.send(json!({"type": "join", "key": "race"})).await;
    assert_eq!(
        v1.recv().await,
        json!({"type": "sync", "key": "race", "history": []})
    );
    let mut seed = s.ws().await;
    seed.send(json!({"type": "getHistory", "key": "race"}))
        .await;
    assert_eq!(
        seed.recv().await,
        json!({"type": "historyUpdate", "key": "race", "history": []})
    );
    let v1 = tokio::spawn(follow_histories(v1, "sync", TOTAL));
    let seed = tokio::spawn(follow_histories(seed, "numberSaved", TOTAL));
    let late: Vec<_> = [10u64, 200, 800, 2000]
        .into_iter()
        .map(|ms| {
            tokio::spawn(late_joiner(
                s.ws_url(),
                Duration::from_millis(ms),
                TOTAL as u64,
            ))
        })
        .collect();

    let started = std::time::Instant::now();
    let mut readers = JoinSet::new();
    let mut writers = JoinSet::new();
    for (client, ws) in clients.into_iter().enumerate() {
        let (mut sink, stream) = WsClient::into_inner(ws).split();
        readers.spawn(async move { (client, collect_events(stream, TOTAL).await) });
        writers.spawn(async move {
            for seq in 0..ADDS_PER_CONNECTION {
                let add = json!({"type": "add", "number": number_for(client, seq), "id": format!("c{client}-{seq}")});
                sink.send(Message::text(add.to_string())).await.expect("send add");
            }
            sink
        });
    }
    // Keep the write halves open until every reader is done.
    let mut sinks = Vec::new();
    while let Some(sink) = writers.join_next().await {
        sinks.push(sink.expect("writer task"));
    }

    let mut seen: Vec<Option<Vec<Value>>> = vec![None; CONNECTIONS];
    while let Some(result) = readers.join_next().await {
        let (client, events) = result.expect("reader task");
        match events {
            Ok(events) => seen[client] = Some(events),
            Err(e) => panic!("member {client}: {e}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("{TOTAL} adds from {CONNECTIONS} sockets fanned out to all in {elapsed:?}");

    // Member 0's view is the reference; every member must see the same sequence.
    let reference = seen[0].clone().expect("member 0 events");
    for (v, event) in reference.iter().enumerate() {
        assert_eq!(
            event["version"],
            json!(v + 1),
            "member 0: event {v} out of order: {event}"
        );
        assert_eq!(event["key"], "race");
    }
    for (client, events) in seen.iter().enumerate() {
        let events = events.as_ref().expect("events");
        assert_eq!(events.len(), TOTAL, "member {client}");
        for (i, (got, want)) in events.iter().zip(&reference).enumerate() {
            assert_eq!(
                got, want,
                "member {client} differs from member 0 at position {i}"
            );
        }
    }

    // Every add applied exactly once, each sender's adds in the order it sent them,
    // echoed with the very number it sent.
    let mut by_id: HashMap<String, (u64, Value)> = HashMap::new();
    for event in &reference {
        let id = event["id"]
            .as_str()
            .expect("the mutation id is echoed")
            .to_owned();
        let version = event["version"].as_u64().expect("version");
        assert!(
            by_id
                .insert(id.clone(), (version, event["number"].clone()))
                .is_none(),
            "{id} applied twice"
        );
    }
    assert_eq!(by_id.len(), TOTAL);
    for client in 0..CONNECTIONS {
        let mut last = 0;
        for seq in 0..ADDS_PER_CONNECTION {
            let (version, number) = &by_id[&format!("c{client}-{seq}")];
            assert!(
                *version > last,
                "client {client}: add {seq} overtook an earlier add"
            );
            assert_eq!(
                number,
                &number_for(client, seq),
                "client {client} add {seq} came back changed"
            );
            last = *version;
        }
    }

    // The store holds exactly those 2000 numbers, in version order.
    let (history, version) = s.room("race").await;
    assert_eq!(version, TOTAL as u64);
    let history = history.as_array().expect("history").clone();
    assert_eq!(history.len(), TOTAL);
    for (i, event) in reference.iter().enumerate() {
        assert_eq!(
            history[i], event["number"],
            "stored history differs at index {i}"
        );
    }

    // The older dialects saw the same sequence, one number per frame.
    let numbers: Vec<Value> = reference.iter().map(|e| e["number"].clone()).collect();
    for (name, follower) in [("v1", v1), ("seed", seed)] {
        let appended = follower
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("{name} member: {e}"));
        assert_eq!(appended, numbers, "{name} member saw another sequence");
    }
    // A member that joined mid-stream got the state at some version V, then
    // exactly the events after V.
    for (i, joiner) in late.into_iter().enumerate() {
        let (sync, events) = joiner
            .await
            .expect("task")
            .unwrap_or_else(|e| panic!("late joiner {i}: {e}"));
        let v = sync["version"].as_u64().expect("version") as usize;
        eprintln!("late joiner {i} joined at version {v}");
        assert_eq!(sync["type"], "sync", "{sync}");
        assert_eq!(
            sync["history"],
            Value::Array(numbers[..v].to_vec()),
            "late joiner {i}: state at version {v}"
        );
        assert_eq!(
            events,
            reference[v..],
            "late joiner {i}: events after version {v}"
        );
    }
    drop(sinks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_http_saves_get_contiguous_versions() {
    const N: usize = 200;
    let s = TestServer::start(&[]).await;
    let mut observer = s.ws().await;
    observer
        .send(json!({"type": "join", "key": "http-race", "version": 0}))
        .await;
    assert_eq!(observer.recv().await["version"], 0);

    let mut saves = JoinSet::new();
    for i in 0..N {
        let http = s.http.clone();
        let url = s.url("/api/roulette/save");
        saves.spawn(async move {
            let number = i % 37;
            let r = http
                .post(url)
                .json(&json!({"key": "http-race", "number": number}))
                .send()
                .await;
            let r = r.map_err(|e| format!("save {i}: {e}"))?;
            let status = r.status().as_u16();
            let body: Value = r.json().await.map_err(|e| format!("save {i}: {e}"))?;
            if status != 200 {
                return Err(format!("save {i}: {status} {body}"));
            }
            Ok::<_, String>((number, body))
        });
    }
    let mut by_version: HashMap<u64, u64> = HashMap::new();
    while let Some(result) = saves.join_next().await {
        let (number, body) = result.expect("task").unwrap_or_else(|e| panic!("{e}"));
        let version = body["data"]["version"].as_u64().expect("version in reply");
        let history = body["data"]["history"]
            .as_array()
            .expect("history in reply");
        // The reply is the room right after this save: its number is last.
        assert_eq!(history.len() as u64, version, "{body}");
        assert_eq!(history.last(), Some(&json!(number)), "{body}");
        assert!(
            by_version.insert(version, number as u64).is_none(),
            "version {version} acknowledged twice"
        );
    }
    let mut versions: Vec<u64> = by_version.keys().copied().collect();
    versions.sort_unstable();
    assert_eq!(
        versions,
        (1..=N as u64).collect::<Vec<_>>(),
        "acknowledged versions are not 1..={N}"
    );

    let (history, version) = s.room("http-race").await;
    assert_eq!(version, N as u64);
    let history = history.as_array().expect("history").clone();
    assert_eq!(history.len(), N);
    for (i, n) in history.iter().enumerate() {
        assert_eq!(
            n,
            &json!(by_version[&(i as u64 + 1)]),
            "stored number at index {i}"
        );
    }

    // A member saw every save once, in version order.
    for v in 1..=N as u64 {
        let event = observer.recv().await;
        assert_eq!(
            event,
            json!({"type": "add", "key": "http-race", "number": by_version[&v], "version": v})
        );
    }
    observer.expect_silence(Duration::from_millis(300)).await;
}
