//! Room members for the cluster tests: background WebSocket members that
//! reconnect and resume like the frontend and check every frame against the
//! ordering contract ([`Replica`]), HTTP writers that record every save, and the
//! checks that compare what they saw with what PostgreSQL holds.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::app::{WsClient, eventually};
use super::cluster::{DbEvent, TestCluster};

/// How long members get to converge after the last write of a fault test.
pub const CONVERGE: Duration = Duration::from_secs(20);

/// Sends a `join` and returns the first reply.
pub async fn join(url: &str, message: Value) -> (WsClient, Value) {
    let mut ws = WsClient::connect(url).await;
    ws.send(message).await;
    let first = ws.recv().await;
    (ws, first)
}

/// A room as one v2 member knows it, built only from the frames it received.
#[derive(Debug, Default, Clone)]
pub struct Replica {
    pub history: Vec<Value>,
    pub version: u64,
    pub epoch: Option<String>,
}

/// What a frame was, for the member's bookkeeping.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// A room event, with its mutation id.
    Event(Option<String>),
    /// The greeting of a join (`sync` with an epoch) or a resync.
    Synced,
    Recovered,
    Error(String),
}

impl Replica {
    /// Applies one frame. Panics on anything the contract forbids: a gap, a
    /// duplicate, an event out of order, a `recovered` that does not match.
    pub fn apply(&mut self, frame: &Value, who: &str) -> Seen {
        let version = frame["version"].as_u64();
        let id = frame["id"].as_str().map(str::to_owned);
        let next = |v: Option<u64>, current: u64| {
            assert_eq!(
                v,
                Some(current + 1),
                "{who}: event out of order after version {current}: {frame}"
            );
        };
        match frame["type"].as_str() {
            // A greeting or resync carries the epoch (null for a room not created
            // yet); a replace event does not.
            Some("sync") if frame.get("epoch").is_some() => {
                assert_eq!(frame["full"], true, "{who}: {frame}");
                self.history = frame["history"].as_array().expect("history").clone();
                self.version = version.expect("version");
                self.epoch = frame["epoch"].as_str().map(str::to_owned);
                Seen::Synced
            }
            Some("sync") => {
                next(version, self.version);
                self.history = frame["history"].as_array().expect("history").clone();
                self.version += 1;
                Seen::Event(id)
            }
            Some("add") => {
                next(version, self.version);
                self.history.push(frame["number"].clone());
                self.version += 1;
                Seen::Event(id)
            }
            Some("remove") => {
                next(version, self.version);
                let index = frame["index"].as_u64().expect("index") as usize;
                assert!(
                    index < self.history.len(),
                    "{who}: remove out of range: {frame}"
                );
                self.history.remove(index);
                self.version += 1;
                Seen::Event(id)
            }
            Some("recovered") => {
                assert_eq!(
                    version,
                    Some(self.version),
                    "{who}: recovered at another version: {frame}"
                );
                if let Some(epoch) = &self.epoch {
                    assert_eq!(
                        frame["epoch"].as_str(),
                        Some(epoch.as_str()),
                        "{who}: {frame}"
                    );
                }
                self.epoch = frame["epoch"].as_str().map(str::to_owned);
                Seen::Recovered
            }
            Some("error") => Seen::Error(frame["code"].as_str().unwrap_or_default().to_owned()),
            _ => panic!("{who}: unexpected frame {frame}"),
        }
    }
}

/// How a [`Member`] behaves.
#[derive(Clone)]
pub struct MemberPlan {
    pub name: String,
    /// WebSocket URLs, tried in turn on every (re)connect.
    pub urls: Vec<String>,
    pub key: String,
    /// Sends an `add` with a fresh id this often once joined...
    pub write_every: Option<Duration>,
    /// ...until this is cancelled (the member keeps receiving).
    pub write_until: CancellationToken,
    /// After a reconnect, sends unacknowledged adds again with the same id
    /// (the server applies a repeated id once).
    pub retry_unacknowledged: bool,
}

#[derive(Debug, Default)]
pub struct MemberState {
    pub replica: Replica,
    /// Every add sent: id and when.
    pub sent: Vec<(String, Instant)>,
    /// Ids whose event came back to this member: acknowledged writes.
    pub acked: HashSet<String>,
    /// Adds answered with `unavailable` (errors carry no id).
    pub unavailable: usize,
    pub other_errors: Vec<String>,
    /// When each join completed (greeting or replay done)...
    pub ready_at: Vec<Instant>,
    /// ...and how: `sync` (full state) or `recovered` (a replay).
    pub greetings: Vec<&'static str>,
    /// Close codes of the connections that ended (`None`: no close frame).
    pub closes: Vec<Option<u16>>,
    pub resent: usize,
}

impl MemberState {
    /// Books one frame received by `plan`'s member; true when it completed a join.
    pub fn receive(&mut self, frame: &Value, plan: &MemberPlan, joining: bool) -> bool {
        match self.replica.apply(frame, &plan.name) {
            Seen::Event(Some(id)) if id.starts_with(&format!("{}-", plan.name)) => {
                self.acked.insert(id);
            }
            Seen::Event(_) => {}
            seen @ (Seen::Synced | Seen::Recovered) if joining => {
                self.ready_at.push(Instant::now());
                self.greetings.push(if seen == Seen::Synced {
                    "sync"
                } else {
                    "recovered"
                });
                return true;
            }
            Seen::Synced | Seen::Recovered => {}
            Seen::Error(code) if code == "unavailable" => self.unavailable += 1,
            Seen::Error(code) => self.other_errors.push(code),
        }
        false
    }
}

/// A room member running in the background: reconnects and resumes like the
/// frontend does, and checks every frame with a [`Replica`].
pub struct Member {
    state: Arc<Mutex<MemberState>>,
    task: JoinHandle<()>,
}

impl Member {
    pub fn spawn(plan: MemberPlan, stop: CancellationToken) -> Member {
        let state = Arc::new(Mutex::new(MemberState::default()));
        let task = tokio::spawn(run_member(plan, state.clone(), stop));
        Member { state, task }
    }

    /// Whether its task still runs: one that ended before it was stopped has
    /// panicked (its message is in the test output).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().expect("member state")
    }

    pub async fn wait_ready(&self) {
        eventually(Duration::from_secs(15), "member joined", || async {
            (!self.lock().ready_at.is_empty()).then_some(())
        })
        .await;
    }

    /// Waits for it to stop (the caller cancelled its token), surfacing a panic.
    pub async fn finish(self) -> MemberState {
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("member task did not stop")
            .expect("member task failed");
        Arc::try_unwrap(self.state)
            .expect("member state still shared")
            .into_inner()
            .expect("member state")
    }
}

/// One plan per URL, named `{name}0`, `{name}1`..., sharing one `write_until`
/// token (returned).
pub fn member_plans(
    name: &str,
    urls: &[String],
    key: &str,
    write_every: Option<Duration>,
    retry: bool,
) -> (Vec<MemberPlan>, CancellationToken) {
    let write_until = CancellationToken::new();
    let plans = urls
        .iter()
        .enumerate()
        .map(|(i, url)| MemberPlan {
            name: format!("{name}{i}"),
            urls: vec![url.clone()],
            key: key.to_owned(),
            write_every,
            write_until: write_until.clone(),
            retry_unacknowledged: retry,
        })
        .collect();
    (plans, write_until)
}

async fn run_member(plan: MemberPlan, state: Arc<Mutex<MemberState>>, stop: CancellationToken) {
    let lock = || state.lock().expect("member state");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seq = 0usize;
    for attempt in 0..600usize {
        assert!(
            Instant::now() < deadline,
            "{}: still reconnecting after 120 s",
            plan.name
        );
        if stop.is_cancelled() {
            return;
        }
        let url = &plan.urls[attempt % plan.urls.len()];
        let Ok(ws) = WsClient::connect_with_headers(url, &[("User-Agent", &plan.name)]).await
        else {
            // Paces reconnection like the frontend's back-off; not a wait for
            // anything in particular.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = ws.into_inner();
        let join = {
            let s = lock();
            match (&s.replica.epoch, s.replica.version) {
                (_, 0) => json!({"type": "join", "key": plan.key, "version": 0}),
                (Some(epoch), v) => {
                    json!({"type": "join", "key": plan.key, "version": v, "epoch": epoch})
                }
                (None, v) => json!({"type": "join", "key": plan.key, "version": v}),
            }
        };
        let mut ready = false;
        let mut tick = tokio::time::interval(plan.write_every.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let writing =
            |ready: bool| ready && plan.write_every.is_some() && !plan.write_until.is_cancelled();
        let close = if !send_within(&mut stream, &join).await {
            None
        } else {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = stream.close(None).await;
                        return;
                    }
                    incoming = tokio::time::timeout(Duration::from_secs(30), stream.next()) => match incoming {
                        Err(_) => panic!("{}: nothing from the server for 30 s", plan.name),
                        Ok(Some(Ok(Message::Text(text)))) => {
                            let frame: Value = serde_json::from_str(&text).expect("JSON frame");
                            let joined = lock().receive(&frame, &plan, !ready);
                            ready |= joined;
                            if joined && plan.retry_unacknowledged && lock().ready_at.len() > 1 {
                                // Rejoined: what the replay did not show as committed
                                // is sent again under the same id.
                                let pending: Vec<String> = {
                                    let s = lock();
                                    s.sent.iter().map(|(id, _)| id.clone()).filter(|id| !s.acked.contains(id)).collect()
                                };
                                lock().resent += pending.len();
                                for id in pending {
                                    let number = id.rsplit('-').next().and_then(|n| n.parse::<usize>().ok()).unwrap_or(0) % 37;
                                    let add = json!({"type": "add", "key": plan.key, "number": number, "id": id});
                                    if !send_within(&mut stream, &add).await {
                                        break;
                                    }
                                }
                            }
                        }
                        Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| u16::from(f.code)),
                        Ok(Some(Ok(_))) => {}
                        Ok(Some(Err(_)) | None) => break None,
                    },
                    _ = tick.tick(), if writing(ready) => {
                        seq += 1;
                        let id = format!("{}-{seq}", plan.name);
                        let add = json!({"type": "add", "key": plan.key, "number": seq % 37, "id": id});
                        lock().sent.push((id, Instant::now()));
                        if !send_within(&mut stream, &add).await {
                            break None;
                        }
                    }
                }
            }
        };
        lock().closes.push(close);
        // The same pacing after a lost connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{}: gave up after 600 connection attempts", plan.name);
}

/// Sends one JSON frame; false when the connection is unusable (the write failed
/// or the server took no data for 10 s).
pub async fn send_within<S>(stream: &mut S, frame: &Value) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    let send = stream.send(Message::text(frame.to_string()));
    matches!(
        tokio::time::timeout(Duration::from_secs(10), send).await,
        Ok(Ok(()))
    )
}

/// One HTTP save: id, status (0 = no reply), and when it started and ended.
#[derive(Debug, Clone)]
pub struct HttpWrite {
    pub id: String,
    pub status: u16,
    pub started: Instant,
    pub finished: Instant,
}

/// Posts saves with fresh ids to `bases` in turn, every `every`, until stopped.
pub fn spawn_http_writer(
    name: &str,
    bases: Vec<String>,
    key: &str,
    every: Duration,
    stop: CancellationToken,
) -> JoinHandle<Vec<HttpWrite>> {
    let (name, key) = (name.to_owned(), key.to_owned());
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client");
        let mut writes = Vec::new();
        for n in 0..5_000usize {
            if stop.is_cancelled() {
                break;
            }
            let base = &bases[n % bases.len()];
            let id = format!("{name}-{n}");
            let started = Instant::now();
            let body = json!({"key": key, "number": n % 37, "id": id});
            let status = match http
                .post(format!("{base}/api/roulette/save"))
                .json(&body)
                .send()
                .await
            {
                Ok(reply) => reply.status().as_u16(),
                Err(_) => 0,
            };
            writes.push(HttpWrite {
                id,
                status,
                started,
                finished: Instant::now(),
            });
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
        writes
    })
}

/// Waits until every member's replica equals the room in PostgreSQL; returns it.
pub async fn converge(
    cluster: &TestCluster,
    key: &str,
    members: &[&Member],
    limit: Duration,
) -> (Value, u64) {
    eventually(limit, "members converge to PostgreSQL", || async {
        assert!(
            members.iter().all(|m| m.is_running()),
            "a member stopped checking frames"
        );
        let db = cluster.db_room(key).await.expect("room in PostgreSQL");
        let behind: Vec<String> = members
            .iter()
            .map(|m| m.lock())
            .filter(|s| json!(s.replica.history) != db.0 || s.replica.version != db.1)
            .map(|s| {
                format!(
                    "at version {} ({} numbers)",
                    s.replica.version,
                    s.replica.history.len()
                )
            })
            .collect();
        if behind.is_empty() {
            return Ok(db);
        }
        Err(format!(
            "PostgreSQL at version {} ({} numbers), members behind: {behind:?}",
            db.1,
            db.0.as_array().map_or(0, Vec::len)
        ))
    })
    .await
}

/// Mutation ids in the event log; panics if one appears twice or versions have gaps.
pub fn logged_ids(events: &[DbEvent]) -> HashSet<String> {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.version,
            i as u64 + 1,
            "event log has a gap or duplicate at {e:?}"
        );
    }
    let mut ids = HashSet::new();
    for id in events.iter().filter_map(|e| e.mutation_id.clone()) {
        assert!(ids.insert(id.clone()), "mutation id {id} was applied twice");
    }
    ids
}

/// GET of the room on every instance equals PostgreSQL (the Redis cache is not stale).
pub async fn every_instance_reads(cluster: &TestCluster, key: &str, db: &(Value, u64)) {
    for (i, instance) in cluster.instances.iter().enumerate() {
        let (history, version) = instance.room(key).await;
        assert_eq!(
            (&history, version),
            (&db.0, db.1),
            "GET on node-{} differs from PostgreSQL",
            i + 1
        );
    }
}

/// `GET /health` on `base` with a fresh client: status and body.
pub async fn health(base: &str) -> (u16, Value) {
    let reply = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("GET /health");
    let status = reply.status().as_u16();
    (status, reply.json().await.expect("health JSON"))
}

/// The status of `GET /readyz` on `base` (0 when nothing answered).
pub async fn readyz(base: &str) -> u16 {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
        .get(format!("{base}/readyz"))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Every instance's base URL, node-1 first.
pub fn bases(cluster: &TestCluster) -> Vec<String> {
    cluster.instances.iter().map(|s| s.url("")).collect()
}

/// How many writes got each status.
pub fn statuses(writes: &[HttpWrite]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for w in writes {
        *counts.entry(w.status).or_default() += 1;
    }
    counts
}
