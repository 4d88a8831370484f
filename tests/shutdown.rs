//! SIGTERM drains the instance: every socket is closed with 1001 (clients come
//! back at once), readiness stops saying 200, the process exits 0 within
//! SHUTDOWN_GRACE, and nothing that was acknowledged is lost.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::app::{TestServer, WsClient, eventually};
use tokio::io::AsyncWriteExt;

const GRACE_SECS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_socket_with_1001_and_loses_nothing_acknowledged() {
    let grace = GRACE_SECS.to_string();
    let mut s = TestServer::start(&[("SHUTDOWN_GRACE", &grace)]).await;

    // Acknowledged before the signal.
    let mut acknowledged = Vec::new();
    for i in 0..20u64 {
        let number = (i * 11) % 37;
        let (status, body) = s
            .post(
                "/api/roulette/save",
                &json!({"key": "keep", "number": number}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        acknowledged.push(json!(number));
    }
    let (status, body) = s
        .put("/api/roulette/kept", &json!({"history": [1, "00", 2]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let kept_epoch = body["data"]["epoch"].clone();

    // Members in every dialect, in two rooms.
    let mut members: Vec<WsClient> = Vec::new();
    for (key, join) in [
        ("keep", json!({"type": "join", "key": "keep", "version": 0})),
        ("keep", json!({"type": "join", "key": "keep"})),
        ("keep", json!({"type": "getHistory", "key": "keep"})),
        (
            "kept",
            json!({"type": "join", "key": "kept", "version": 3, "epoch": kept_epoch}),
        ),
        ("kept", json!({"type": "join", "key": "kept", "version": 0})),
    ] {
        let mut ws = s.ws().await;
        ws.send(join).await;
        let greeting = ws.recv().await;
        assert!(
            greeting["type"].is_string() && greeting.get("error").is_none(),
            "{key}: {greeting}"
        );
        members.push(ws);
    }
    // A socket that joined nothing is closed the same way.
    let mut idle = s.ws().await;
    idle.send(json!({"type": "ping"})).await;
    assert_eq!(idle.recv().await, json!({"type": "pong"}));
    members.push(idle);

    // A writer still saving while the signal arrives: whatever it gets
    // acknowledged must be durable too.
    let busy_acks: Arc<Mutex<Vec<(u64, Value)>>> = Arc::default();
    let writer = {
        let acks = busy_acks.clone();
        let url = s.url("/api/roulette/save");
        tokio::spawn(async move {
            let http = TestServer::fresh_http();
            for i in 0u64.. {
                let number = json!(i % 37);
                let Ok(r) = http
                    .post(&url)
                    .json(&json!({"key": "busy", "number": number}))
                    .send()
                    .await
                else {
                    break;
                };
                if r.status() != 200 {
                    break;
                }
                let Ok(body) = r.json::<Value>().await else {
                    break;
                };
                let version = body["data"]["version"].as_u64().expect("version");
                acks.lock().expect("acks").push((version, number));
            }
        })
    };
    // Let it get a few saves in.
    let deadline = Instant::now() + Duration::from_secs(5);
    while busy_acks.lock().expect("acks").len() < 5 {
        assert!(Instant::now() < deadline, "background saves do not succeed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let signalled = Instant::now();
    s.signal_term();

    // Every member, whatever its dialect or room, is told 1001.
    let closes = futures_util::future::join_all(members.iter_mut().map(|ws| ws.closed())).await;
    let close_time = signalled.elapsed();
    for (i, code) in closes.iter().enumerate() {
        assert_eq!(
            *code,
            Some(1001),
            "member {i} was not closed with 1001 (got {code:?})"
        );
    }

    // Draining: readiness must never say 200 again (the listener may also already
    // be closed, which a load balancer sees the same way).
    let probe = TestServer::fresh_http();
    let mut saw_503 = false;
    let status = loop {
        if let Ok(r) = probe
            .get(s.url("/readyz"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
        {
            assert_ne!(r.status().as_u16(), 200, "/readyz said 200 while draining");
            saw_503 |= r.status().as_u16() == 503;
        }
        if let Some(status) = s.wait_exit(Duration::from_millis(20)).await {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(GRACE_SECS + 1),
            "still running after SHUTDOWN_GRACE"
        );
    };
    let exit_time = signalled.elapsed();
    eprintln!(
        "closed sockets after {close_time:?}, exited after {exit_time:?} ({status}); /readyz 503 observed: {saw_503}"
    );
    assert!(status.success(), "exit status {status}");
    assert!(
        exit_time < Duration::from_secs(GRACE_SECS),
        "exit took {exit_time:?}"
    );
    writer.await.expect("writer task");

    // Same DATA_DIR: everything acknowledged is there.
    s.start_again().await;
    let (history, version) = s.room("keep").await;
    assert_eq!(
        history,
        Value::Array(acknowledged),
        "acknowledged adds lost"
    );
    assert_eq!(version, 20);
    let (history, version) = s.room("kept").await;
    assert_eq!((history, version), (json!([1, "00", 2]), 1));
    let (history, version) = s.room("busy").await;
    let history = history.as_array().expect("history").clone();
    let acks = busy_acks.lock().expect("acks").clone();
    assert!(acks.len() >= 5);
    assert!(
        version as usize >= acks.len(),
        "fewer versions ({version}) than acknowledged saves ({})",
        acks.len()
    );
    for (v, number) in &acks {
        assert_eq!(
            history.get(*v as usize - 1),
            Some(number),
            "acknowledged save at version {v} lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_cannot_hold_the_exit_past_the_grace_period() {
    let mut s = TestServer::start(&[("SHUTDOWN_GRACE", "2")]).await;
    // A request that never finishes its headers, and a WebSocket that never reads.
    let mut stalled = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    stalled
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: test\r\n")
        .await
        .expect("write");
    let mut deaf = s.ws().await;
    deaf.send(json!({"type": "join", "key": "deaf", "version": 0}))
        .await;
    eventually(Duration::from_secs(5), "the deaf client joined", || async {
        let (_, stats) = s.admin_get("/api/admin/stats").await;
        (stats["activeSessions"] == 1).then_some(())
    })
    .await;

    let signalled = Instant::now();
    s.signal_term();
    let status = s
        .wait_exit(Duration::from_secs(4))
        .await
        .expect("still running 4 s after SIGTERM with a 2 s grace");
    let took = signalled.elapsed();
    eprintln!("exited after {took:?} ({status})");
    assert!(status.success(), "exit status {status}");
    assert!(
        took < Duration::from_millis(2600),
        "exit took {took:?} with SHUTDOWN_GRACE=2"
    );
    drop(stalled);
}
