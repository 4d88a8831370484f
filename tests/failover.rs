//! PostgreSQL failover, for real: a primary with a streaming standby, two
//! instances reaching them through one multi-host `DATABASE_URL`, writers with
//! mutation ids on both, and the primary killed under load.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Mutex;

use support::app::TestServer;
use support::cluster::JWT_SECRET;
use support::postgres::TestPostgres;
use support::redis::TestRedis;

const ROOM: &str = "failover";
/// How long writes may be refused after the standby is promoted.
const RESUME_LIMIT: Duration = Duration::from_secs(15);

/// What one writer saw: every id it got acknowledged, how many attempts were
/// refused, and when it was first acknowledged after the failover.
#[derive(Debug, Default)]
struct Tally {
    acknowledged: Vec<String>,
    refused: u64,
    /// The first acknowledgement after `resumed_after` was set.
    resumed_at: Option<Instant>,
}

/// Saves numbers with ids `{name}-{n}` one after another until `stop`, each
/// retried with the same id until acknowledged, as a client would.
async fn writer(
    server: Arc<TestServer>,
    name: String,
    stop: Arc<tokio::sync::Notify>,
    failed_over: Arc<Mutex<Option<Instant>>>,
) -> Tally {
    let mut tally = Tally::default();
    let mut stopping = false;
    let stopped = stop.notified();
    tokio::pin!(stopped);
    for n in 0.. {
        if stopping {
            break;
        }
        let id = format!("{name}-{n}");
        loop {
            let body = json!({"key": ROOM, "number": n % 37, "id": id});
            let (status, reply) = server.post("/api/roulette/save", &body).await;
            if status == 200 {
                assert_eq!(reply["success"], true, "{reply}");
                tally.acknowledged.push(id.clone());
                if tally.resumed_at.is_none() && failed_over.lock().await.is_some() {
                    tally.resumed_at = Some(Instant::now());
                }
                break;
            }
            // Refused while no primary is reachable: never a 500, never a
            // client error for a valid save.
            assert_eq!(status, 503, "save {id} answered {status}: {reply}");
            tally.refused += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if futures_util::FutureExt::now_or_never(stopped.as_mut()).is_some() {
            stopping = true;
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_follow_a_promoted_synchronous_standby() {
    let mut primary = TestPostgres::start_new().await;
    let standby = primary.start_standby(true).await;
    let redis = TestRedis::start_new().await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/croupier?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    // The migration finds the primary through the same list.
    support::app::migrate(&url, false);
    let redis_url = redis.url();
    let mut instances = Vec::new();
    for name in ["node-1", "node-2"] {
        let env = [
            ("DATABASE_URL", url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("INSTANCE_ID", name),
            ("JWT_SECRET", JWT_SECRET),
        ];
        instances.push(Arc::new(TestServer::start(&env).await));
    }

    let stop = Arc::new(tokio::sync::Notify::new());
    let failed_over = Arc::new(Mutex::new(None));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let server = instances[w % 2].clone();
            let (stop, failed_over) = (stop.clone(), failed_over.clone());
            tokio::spawn(writer(server, format!("w{w}"), stop, failed_over))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The primary dies without a checkpoint; the standby is promoted.
    primary.stop_immediately().await;
    let promoting = Instant::now();
    standby.promote().await;
    *failed_over.lock().await = Some(Instant::now());
    let promoted_after = promoting.elapsed();

    // Writes resume, then run on the new primary for a while.
    let deadline = Instant::now() + RESUME_LIMIT + Duration::from_secs(3);
    loop {
        let (status, _) = instances[0]
            .post("/api/roulette/save", &json!({"key": "probe", "number": 1}))
            .await;
        let (status2, _) = instances[1]
            .post("/api/roulette/save", &json!({"key": "probe", "number": 2}))
            .await;
        if status == 200 && status2 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume on both instances within {RESUME_LIMIT:?}:\n{}\n{}",
            instances[0].log_tail(),
            instances[1].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.notify_waiters();
    let mut tallies = Vec::new();
    for writer in writers {
        tallies.push(
            tokio::time::timeout(Duration::from_secs(30), writer)
                .await
                .expect("writer stopped")
                .expect("writer panicked"),
        );
    }

    let failover_at = failed_over.lock().await.expect("failover time");
    for (w, tally) in tallies.iter().enumerate() {
        let resumed = tally
            .resumed_at
            .expect("writer acknowledged after the failover");
        let resume = resumed.saturating_duration_since(failover_at);
        assert!(
            resume < RESUME_LIMIT,
            "writer {w} resumed only after {resume:?}"
        );
        eprintln!(
            "writer {w}: {} acknowledged, {} refused with 503, resumed {:?} after promotion (promotion took {:?})",
            tally.acknowledged.len(),
            tally.refused,
            resume,
            promoted_after
        );
    }

    // Every acknowledged id is stored exactly once, and nothing else is.
    let acknowledged: HashSet<&str> = tallies
        .iter()
        .flat_map(|t| t.acknowledged.iter().map(String::as_str))
        .collect();
    let total: usize = tallies.iter().map(|t| t.acknowledged.len()).sum();
    assert_eq!(acknowledged.len(), total, "an id was acknowledged twice");
    let stored = standby
        .sql(
            "croupier",
            "SELECT coalesce(string_agg(e.mutation_id, ',' ORDER BY e.version), '') \
             FROM room_events e JOIN rooms r ON r.id = e.room_id WHERE r.key = 'failover'",
        )
        .await;
    let stored: Vec<&str> = stored.split(',').filter(|s| !s.is_empty()).collect();
    let distinct: HashSet<&str> = stored.iter().copied().collect();
    assert_eq!(distinct.len(), stored.len(), "an id is stored twice");
    assert_eq!(
        distinct, acknowledged,
        "stored ids differ from acknowledged ones"
    );

    // Both instances serve the store's history.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, va) = instances[0].room(ROOM).await;
        let (b, vb) = instances[1].room(ROOM).await;
        let histories_match =
            a == b && va == vb && a.as_array().map(Vec::len) == Some(stored.len());
        if histories_match {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instances disagree after the failover: {va} vs {vb}, {} stored",
            stored.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for instance in &instances {
        instance.assert_healthy().await;
    }
}
