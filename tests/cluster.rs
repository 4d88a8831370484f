//! The cluster as it runs in production, on loopback: PostgreSQL, Redis, three
//! `croupier` instances sharing them and Nginx in front — every one a real
//! process (`tests/support/cluster.rs`). Each test starts its own cluster.
//!
//! What is checked is what clients and the database see: the wire contract
//! through Nginx (HTTP, TLS, WebSocket dialects), one order per room whichever
//! instances the writers use, resumes across instances, and convergence after an
//! instance crash, a Redis restart and a PostgreSQL restart, with every
//! acknowledged write present in PostgreSQL afterwards.
//!
//! Run with `--nocapture` to see the figures each test measures.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{Value, json};
use support::app::{TestServer, WsClient, assert_shape, encode, eventually};
use support::cluster::{DbEvent, JWT_SECRET, TestCluster};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const QUIET: Duration = Duration::from_millis(300);
/// How long members get to converge after the last write of a fault test.
const CONVERGE: Duration = Duration::from_secs(20);

fn error_body() -> Value {
    json!({"success": false, "error": "<string>"})
}

fn session(key: &str, history: Value, version: u64, protected: bool) -> Value {
    json!({
        "id": "<int>", "key": key, "history": history,
        "created_at": "<rfc3339>", "updated_at": "<rfc3339>",
        "version": version, "epoch": "<string>", "protected": protected,
    })
}

fn saved(key: &str, history: Value, version: u64, protected: bool) -> Value {
    json!({"success": true, "data": session(key, history, version, protected)})
}

fn room_reply(key: &str, history: Value, version: u64) -> Value {
    json!({"key": key, "history": history, "version": version, "epoch": "<string>"})
}

/// One HTTP exchange: what it checks, method, path, bearer token, JSON body, and
/// the expected status and reply (a template for [`assert_shape`]).
type Row<'a> = (
    &'a str,
    Method,
    String,
    Option<String>,
    Option<Value>,
    u16,
    Value,
);

/// Runs the rows in order against `s`; returns the replies.
async fn run_rows(s: &TestServer, rows: Vec<Row<'_>>) -> Vec<Value> {
    let mut replies = Vec::new();
    for (what, method, path, token, body, status, reply) in rows {
        let (got, value) = s
            .call(method.clone(), &path, token.as_deref(), body.as_ref())
            .await;
        let context = format!("{what} ({method} {path} {body:?})");
        assert_eq!(got, status, "{context}: status; body {value}");
        assert_shape(&value, &reply, &context);
        replies.push(value);
    }
    replies
}

/// Receives one frame and compares it with `template`.
async fn expect_frame(ws: &mut WsClient, template: &Value, context: &str) -> Value {
    let frame = ws.recv().await;
    assert_shape(&frame, template, context);
    frame
}

/// Sends a `join` and returns the first reply.
async fn join(url: &str, message: Value) -> (WsClient, Value) {
    let mut ws = WsClient::connect(url).await;
    ws.send(message).await;
    let first = ws.recv().await;
    (ws, first)
}

// ---------------------------------------------------------------------------
// A v2 member that checks the ordering contract frame by frame.
// ---------------------------------------------------------------------------

/// A room as one v2 member knows it, built only from the frames it received.
#[derive(Debug, Default, Clone)]
struct Replica {
    history: Vec<Value>,
    version: u64,
    epoch: Option<String>,
}

/// What a frame was, for the member's bookkeeping.
#[derive(Debug, PartialEq)]
enum Seen {
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
    fn apply(&mut self, frame: &Value, who: &str) -> Seen {
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
struct MemberPlan {
    name: String,
    /// WebSocket URLs, tried in turn on every (re)connect.
    urls: Vec<String>,
    key: String,
    /// Sends an `add` with a fresh id this often once joined...
    write_every: Option<Duration>,
    /// ...until this is cancelled (the member keeps receiving).
    write_until: CancellationToken,
    /// After a reconnect, sends unacknowledged adds again with the same id
    /// (the server applies a repeated id once).
    retry_unacknowledged: bool,
}

#[derive(Debug, Default)]
struct MemberState {
    replica: Replica,
    /// Every add sent: id and when.
    sent: Vec<(String, Instant)>,
    /// Ids whose event came back to this member: acknowledged writes.
    acked: HashSet<String>,
    /// Adds answered with `unavailable` (errors carry no id).
    unavailable: usize,
    other_errors: Vec<String>,
    /// When each join completed (greeting or replay done)...
    ready_at: Vec<Instant>,
    /// ...and how: `sync` (full state) or `recovered` (a replay).
    greetings: Vec<&'static str>,
    /// Close codes of the connections that ended (`None`: no close frame).
    closes: Vec<Option<u16>>,
    resent: usize,
}

impl MemberState {
    /// Books one frame received by `plan`'s member; true when it completed a join.
    fn receive(&mut self, frame: &Value, plan: &MemberPlan, joining: bool) -> bool {
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
struct Member {
    state: Arc<Mutex<MemberState>>,
    task: JoinHandle<()>,
}

impl Member {
    fn spawn(plan: MemberPlan, stop: CancellationToken) -> Member {
        let state = Arc::new(Mutex::new(MemberState::default()));
        let task = tokio::spawn(run_member(plan, state.clone(), stop));
        Member { state, task }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemberState> {
        self.state.lock().expect("member state")
    }

    async fn wait_ready(&self) {
        eventually(Duration::from_secs(15), "member joined", || async {
            (!self.lock().ready_at.is_empty()).then_some(())
        })
        .await;
    }

    /// Waits for it to stop (the caller cancelled its token), surfacing a panic.
    async fn finish(self) -> MemberState {
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

fn member_plans(
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{}: gave up after 600 connection attempts", plan.name);
}

/// Sends one JSON frame; false when the connection is unusable (the write failed
/// or the server took no data for 10 s).
async fn send_within<S>(stream: &mut S, frame: &Value) -> bool
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
struct HttpWrite {
    id: String,
    status: u16,
    started: Instant,
    finished: Instant,
}

/// Posts saves with fresh ids to `bases` in turn, every `every`, until stopped.
fn spawn_http_writer(
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
async fn converge(
    cluster: &TestCluster,
    key: &str,
    members: &[&Member],
    limit: Duration,
) -> (Value, u64) {
    let deadline = Instant::now() + limit;
    loop {
        // A member task that ended early has panicked (its message is above).
        assert!(
            members.iter().all(|m| !m.task.is_finished()),
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
            return db;
        }
        assert!(
            Instant::now() < deadline,
            "members did not converge to PostgreSQL (version {}, {} numbers) within {limit:?}: {behind:?}",
            db.1,
            db.0.as_array().map_or(0, Vec::len)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Mutation ids in the event log; panics if one appears twice or versions have gaps.
fn logged_ids(events: &[DbEvent]) -> HashSet<String> {
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
async fn every_instance_reads(cluster: &TestCluster, key: &str, db: &(Value, u64)) {
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

async fn health(base: &str) -> (u16, Value) {
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

async fn readyz(base: &str) -> u16 {
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

fn bases(cluster: &TestCluster) -> Vec<String> {
    cluster.instances.iter().map(|s| s.url("")).collect()
}

fn statuses(writes: &[HttpWrite]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for w in writes {
        *counts.entry(w.status).or_default() += 1;
    }
    counts
}

// ---------------------------------------------------------------------------
// 1. The wire contract through Nginx
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_contract_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let s = cluster.front();
    let save = "/api/roulette/save";
    let p = |k: &str| format!("/api/roulette/{}", encode(k));
    let none = None::<String>;
    #[rustfmt::skip]
    let rows = vec![
        ("unknown room reads as empty", Method::GET, p("t1"), none.clone(), None, 200, json!({"key": "t1", "history": [], "version": 0})),
        ("save creates the room", Method::POST, save.into(), none.clone(), Some(json!({"key": "t1", "number": 17})), 200, saved("t1", json!([17]), 1, false)),
        ("save appends \"00\"", Method::POST, save.into(), none.clone(), Some(json!({"key": "t1", "number": "00"})), 200, saved("t1", json!([17, "00"]), 2, false)),
        ("integral float", Method::POST, save.into(), none.clone(), Some(json!({"key": "t1", "number": 15.0})), 200, saved("t1", json!([17, "00", 15]), 3, false)),
        ("GET an existing room", Method::GET, p("t1"), none.clone(), None, 200, room_reply("t1", json!([17, "00", 15]), 3)),
        ("PUT replaces; the path key wins", Method::PUT, p("t1"), none.clone(), Some(json!({"key": "other", "history": [36, "00"]})), 200, saved("t1", json!([36, "00"]), 4, false)),
        ("the body key was ignored", Method::GET, p("other"), none.clone(), None, 200, json!({"key": "other", "history": [], "version": 0})),
        ("PUT creates a missing room", Method::PUT, p("t2"), none.clone(), Some(json!({"history": [1, 2]})), 200, saved("t2", json!([1, 2]), 1, false)),
        ("Cyrillic key", Method::POST, save.into(), none.clone(), Some(json!({"key": "Рулетка", "number": 36})), 200, saved("Рулетка", json!([36]), 1, false)),
        ("Cyrillic key, read", Method::GET, p("Рулетка"), none.clone(), None, 200, room_reply("Рулетка", json!([36]), 1)),
        ("invalid number", Method::POST, save.into(), none.clone(), Some(json!({"key": "t1", "number": 37})), 400, error_body()),
        ("unknown API route", Method::GET, "/api/nope".into(), none.clone(), None, 404, error_body()),
        ("unknown route outside /api (answered by Nginx)", Method::GET, "/nope".into(), none.clone(), None, 404, error_body()),
        ("metrics are not served through the balancer", Method::GET, "/metrics".into(), none.clone(), None, 404, error_body()),
        ("wrong method on a room", Method::DELETE, p("t1"), none.clone(), None, 405, error_body()),
        ("sessions list", Method::GET, "/api/roulette/sessions?limit=2".into(), none.clone(), None, 200, json!({"sessions": "<array>", "total": 3})),
    ];
    let replies = run_rows(&s, rows).await;
    let listed: Vec<&Value> = replies[15]["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .collect();
    assert_eq!(listed.len(), 2, "limit=2: {}", replies[15]);
    assert_eq!(
        listed[0]["key"], "Рулетка",
        "newest activity first: {}",
        replies[15]
    );
    assert_shape(
        listed[1],
        &json!({
            "id": "<int>", "key": "t2", "historyLength": 2, "created_at": "<rfc3339>", "updated_at": "<rfc3339>",
            "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "protected": false,
        }),
        "session summary",
    );
    // Every reply about t1 names the same room, whichever instance served it.
    let t1: Vec<&Value> = replies
        .iter()
        .filter_map(|r| r.get("data"))
        .filter(|d| d["key"] == "t1")
        .collect();
    for d in &t1 {
        assert_eq!(
            (&d["id"], &d["epoch"]),
            (&t1[0]["id"], &t1[0]["epoch"]),
            "room identity is stable"
        );
    }
    assert_eq!(replies[4]["epoch"], t1[0]["epoch"]);

    // A body over Nginx's limit is refused by Nginx, as JSON.
    let big = json!({"history": vec![1; 600_000]});
    let (status, body) = s.put("/api/roulette/big", &big).await;
    assert_eq!(status, 413, "{body}");
    assert_shape(&body, &error_body(), "413 from Nginx");

    // Protected rooms: a token minted by one instance is honoured by every other
    // one (they share JWT_SECRET), and the HS256 claims are the contract's.
    let token = cluster.instances[0].token("vault", "s3cret").await;
    let other = cluster.instances[1].token("open", "").await;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    let claims = jsonwebtoken::decode::<Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(JWT_SECRET.as_bytes()),
        &validation,
    )
    .expect("an HS256 token signed with JWT_SECRET")
    .claims;
    assert_eq!(claims["key"], "vault");
    let auth = "/api/rooms/auth";
    let t = Some(token.clone());
    #[rustfmt::skip]
    let rows = vec![
        ("right password", Method::POST, auth.into(), none.clone(), Some(json!({"key": "vault", "password": "s3cret"})), 200, json!({"token": "<string>", "protected": true})),
        ("wrong password", Method::POST, auth.into(), none.clone(), Some(json!({"key": "vault", "password": "guess"})), 401, error_body()),
        ("unprotected room accepts any password", Method::POST, auth.into(), none.clone(), Some(json!({"key": "open", "password": "x"})), 200, json!({"token": "<string>", "protected": false})),
        ("GET without token", Method::GET, p("vault"), none.clone(), None, 401, error_body()),
        ("GET with another room's token", Method::GET, p("vault"), Some(other.clone()), None, 401, error_body()),
        ("save without token", Method::POST, save.into(), none.clone(), Some(json!({"key": "vault", "number": 7})), 401, error_body()),
        ("save with token", Method::POST, save.into(), t.clone(), Some(json!({"key": "vault", "number": 7})), 200, saved("vault", json!([7]), 1, true)),
        ("PUT with token", Method::PUT, p("vault"), t.clone(), Some(json!({"history": [1, "00"]})), 200, saved("vault", json!([1, "00"]), 2, true)),
        ("GET with token", Method::GET, p("vault"), t.clone(), None, 200, room_reply("vault", json!([1, "00"]), 2)),
    ];
    run_rows(&s, rows).await;
    for (i, instance) in cluster.instances.iter().enumerate() {
        let (status, body) = instance.get_with_token("/api/roulette/vault", &token).await;
        assert_eq!(
            (status, &body["history"]),
            (200, &json!([1, "00"])),
            "node-{}: {body}",
            i + 1
        );
        let (status, body) = instance.get("/api/roulette/vault").await;
        assert_eq!(status, 401, "node-{} without token: {body}", i + 1);
    }

    // Admin API through Nginx.
    let (status, stats) = s.admin_get("/api/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_shape(
        &stats,
        &json!({"totalSessions": 5, "activeSessions": 0, "totalConnections": "<uint>", "activeConnections": 0, "averageHistoryLength": "<number>"}),
        "admin stats",
    );
    assert_eq!(
        s.admin_get("/api/admin/sessions/vault/history").await,
        (200, json!([1, "00"]))
    );
    let (status, body) = s.get_with_token("/api/admin/stats", "not-the-token").await;
    assert_eq!(status, 401, "{body}");
    let (status, migrations) = s.admin_get("/api/admin/migrations").await;
    assert_eq!(status, 200, "{migrations}");
    assert_shape(
        &migrations,
        &json!({"backend": "postgres", "applied": "<array>", "pending": []}),
        "migrations",
    );

    // Operational endpoints through Nginx: some instance answers, both
    // dependencies up.
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 200, "{body}");
    assert_shape(
        &body,
        &json!({
            "status": "ok", "timestamp": "<rfc3339>", "instance": "<string>", "version": env!("CARGO_PKG_VERSION"),
            "checks": {"database": {"status": "up", "latency_ms": "<number>"}, "redis": {"status": "up", "latency_ms": "<number>"}},
        }),
        "/health through Nginx",
    );
    assert!(
        ["node-1", "node-2", "node-3"].contains(&body["instance"].as_str().unwrap_or_default()),
        "{body}"
    );
    for path in ["/livez", "/readyz"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

/// Who sends a row's mutation in the dialect table.
#[derive(Debug, Clone, Copy)]
enum Sender {
    V2,
    V1,
    Seed,
    HttpSave,
    HttpPut,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_dialects_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let s = cluster.front();
    let (status, put) = s.put("/api/roulette/t", &json!({"history": []})).await;
    assert_eq!(status, 200, "{put}");
    let epoch = put["data"]["epoch"].clone();

    // Three sockets through Nginx: least_conn spreads them over the instances,
    // so the members below are normally on three different ones.
    let url = cluster.ws_url();
    let mut v2 = WsClient::connect(&url).await;
    v2.send(json!({"type": "join", "key": "t", "version": 0}))
        .await;
    expect_frame(&mut v2, &json!({"type": "sync", "key": "t", "history": [], "full": true, "version": 1, "epoch": epoch}), "v2 join").await;
    let mut v1 = WsClient::connect(&url).await;
    v1.send(json!({"type": "join", "key": "t"})).await;
    expect_frame(
        &mut v1,
        &json!({"type": "sync", "key": "t", "history": []}),
        "v1 join",
    )
    .await;
    let mut seed = WsClient::connect(&url).await;
    seed.send(json!({"type": "getHistory", "key": "t"})).await;
    expect_frame(
        &mut seed,
        &json!({"type": "historyUpdate", "key": "t", "history": []}),
        "seed getHistory",
    )
    .await;

    #[rustfmt::skip]
    let table: Vec<(Sender, Value, Value, Value, Value)> = vec![
        (Sender::V2, json!({"type": "add", "number": 17}),
            json!({"type": "add", "key": "t", "number": 17, "version": 2}),
            json!({"type": "sync", "key": "t", "history": [17]}),
            json!({"type": "numberSaved", "key": "t", "number": 17, "history": [17]})),
        (Sender::V1, json!({"type": "add", "key": "t", "number": "00", "id": "v1-click"}),
            json!({"type": "add", "key": "t", "number": "00", "version": 3, "id": "v1-click"}),
            json!({"type": "sync", "key": "t", "history": [17, "00"], "id": "v1-click"}),
            json!({"type": "numberSaved", "key": "t", "number": "00", "history": [17, "00"], "id": "v1-click"})),
        (Sender::Seed, json!({"type": "saveNumber", "key": "t", "number": 0}),
            json!({"type": "add", "key": "t", "number": 0, "version": 4}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0]}),
            json!({"type": "numberSaved", "key": "t", "number": 0, "history": [17, "00", 0]})),
        (Sender::HttpSave, json!({"key": "t", "number": 36}),
            json!({"type": "add", "key": "t", "number": 36, "version": 5}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0, 36]}),
            json!({"type": "numberSaved", "key": "t", "number": 36, "history": [17, "00", 0, 36]})),
        (Sender::V2, json!({"type": "remove", "index": 1}),
            json!({"type": "remove", "key": "t", "index": 1, "version": 6}),
            json!({"type": "sync", "key": "t", "history": [17, 0, 36]}),
            json!({"type": "historyUpdated", "key": "t", "history": [17, 0, 36]})),
        (Sender::Seed, json!({"type": "updateHistory", "key": "t", "history": [2, 3]}),
            json!({"type": "sync", "key": "t", "history": [2, 3], "full": true, "version": 7}),
            json!({"type": "sync", "key": "t", "history": [2, 3]}),
            json!({"type": "historyUpdated", "key": "t", "history": [2, 3]})),
        (Sender::HttpPut, json!({"history": [5]}),
            json!({"type": "sync", "key": "t", "history": [5], "full": true, "version": 8}),
            json!({"type": "sync", "key": "t", "history": [5]}),
            json!({"type": "historyUpdated", "key": "t", "history": [5]})),
        (Sender::V1, json!({"type": "update", "key": "t", "history": []}),
            json!({"type": "sync", "key": "t", "history": [], "full": true, "version": 9}),
            json!({"type": "sync", "key": "t", "history": []}),
            json!({"type": "historyUpdated", "key": "t", "history": []})),
    ];
    for (step, (sender, message, want_v2, want_v1, want_seed)) in table.into_iter().enumerate() {
        let context = |who: &str| format!("step {step} ({sender:?} sends {message}): {who}");
        match sender {
            Sender::V2 => v2.send(message.clone()).await,
            Sender::V1 => v1.send(message.clone()).await,
            Sender::Seed => seed.send(message.clone()).await,
            Sender::HttpSave => {
                let (status, body) = s.post("/api/roulette/save", &message).await;
                assert_eq!(status, 200, "{}: {body}", context("http"));
            }
            Sender::HttpPut => {
                let (status, body) = s.put("/api/roulette/t", &message).await;
                assert_eq!(status, 200, "{}: {body}", context("http"));
            }
        }
        expect_frame(&mut v2, &want_v2, &context("v2 member")).await;
        expect_frame(&mut v1, &want_v1, &context("v1 member")).await;
        expect_frame(&mut seed, &want_seed, &context("seed member")).await;
    }
    for ws in [&mut v2, &mut v1, &mut seed] {
        ws.expect_silence(QUIET).await;
    }
    assert_eq!(cluster.db_room("t").await, Some((json!([]), 9)));

    // The three sockets really were spread over the instances.
    let (status, sessions) = cluster.instances[0].admin_get("/api/admin/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    let room = sessions
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == "t"))
        .expect("room t")
        .clone();
    let instances: HashSet<&str> = room["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| c["instance"].as_str())
        .collect();
    println!("dialect members were served by {instances:?}");
    assert!(
        instances.len() >= 2,
        "Nginx put every member on one instance: {room}"
    );
}

// ---------------------------------------------------------------------------
// 2. One order per room across instances
// ---------------------------------------------------------------------------

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
            format!("watcher on node-{}", i + 1),
        )));
    }
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
            format!("member on node-{}", i + 1),
        )));
    }

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

// ---------------------------------------------------------------------------
// 3. Resume across instances
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// 4. An instance crashes under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_survive_an_instance_crash() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let key = "crash";
    let stop = CancellationToken::new();
    let urls = vec![cluster.ws_url(); 3];
    let (plans, stop_writing) = member_plans(
        "crash-member-",
        &urls,
        key,
        Some(Duration::from_millis(40)),
        true,
    );
    let members: Vec<Member> = plans
        .into_iter()
        .map(|plan| Member::spawn(plan, stop.clone()))
        .collect();
    for m in &members {
        m.wait_ready().await;
    }
    let http = spawn_http_writer(
        "crash-http",
        vec![cluster.url("")],
        key,
        Duration::from_millis(20),
        stop_writing.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Crash the instance that serves member 0.
    let (status, sessions) = cluster.instances[0].admin_get("/api/admin/sessions").await;
    assert_eq!(status, 200, "{sessions}");
    let holder = sessions
        .as_array()
        .and_then(|rooms| rooms.iter().find(|r| r["key"] == key))
        .and_then(|room| room["connections"].as_array())
        .and_then(|conns| conns.iter().find(|c| c["userAgent"] == "crash-member-0"))
        .and_then(|c| c["instance"].as_str())
        .unwrap_or_else(|| panic!("member 0 is not listed: {sessions}"))
        .to_owned();
    let victim: usize = holder
        .trim_start_matches("node-")
        .parse::<usize>()
        .expect("node-N")
        - 1;
    let joins_before = members[0].lock().ready_at.len();
    let killed_at = Instant::now();
    cluster.instances[victim].kill();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop_writing.cancel();
    let writes = http.await.expect("http writer");
    let refs: Vec<&Member> = members.iter().collect();
    let db = converge(&cluster, key, &refs, CONVERGE).await;
    stop.cancel();

    let logged = logged_ids(&cluster.db_events(key).await);
    let resumed_after = members[0]
        .lock()
        .ready_at
        .get(joins_before)
        .map(|t| t.duration_since(killed_at));
    let mut acked = 0;
    let mut reports = Vec::new();
    let mut members_greetings = Vec::new();
    for m in members {
        let s = m.finish().await;
        assert!(s.other_errors.is_empty(), "errors: {:?}", s.other_errors);
        members_greetings.push(s.greetings.clone());
        for id in &s.acked {
            assert!(
                logged.contains(id),
                "acknowledged WebSocket add {id} is not in PostgreSQL"
            );
        }
        acked += s.acked.len();
        reports.push((s.sent.len(), s.acked.len(), s.resent, s.closes.len()));
    }
    let ok: Vec<&HttpWrite> = writes.iter().filter(|w| w.status == 200).collect();
    for w in &ok {
        assert!(
            logged.contains(&w.id),
            "HTTP save {} got 200 but is not in PostgreSQL",
            w.id
        );
    }
    let resumed_after = resumed_after.expect("member 0 rejoined after the crash");
    let greetings = members_greetings[0].clone();
    assert!(
        greetings.len() >= 2 && greetings[1..].iter().all(|g| *g == "recovered"),
        "member 0 rejoined by resuming: {greetings:?}"
    );
    println!(
        "instance crash: killed {holder}; member 0 rejoined through Nginx {:.0} ms later; members (sent, acked, resent, \
         reconnects) {reports:?}; HTTP statuses {:?}; {acked} WebSocket + {} HTTP acknowledged writes, all in \
         PostgreSQL ({} events)",
        resumed_after.as_secs_f64() * 1e3,
        statuses(&writes),
        ok.len(),
        db.1
    );
    assert!(
        reports[0].3 >= 1,
        "member 0 was on the killed instance but never lost its connection"
    );
    assert!(
        ok.len() > 20,
        "too few HTTP writes succeeded: {:?}",
        statuses(&writes)
    );
    // Member 0 may have had an add in flight on its new connection when the
    // replicas matched PostgreSQL above; its commit can land after that, so
    // the survivors are compared with PostgreSQL until both stop moving.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let db = cluster.db_room(key).await.expect("room in PostgreSQL");
        let mut reads = Vec::new();
        for (i, instance) in cluster.instances.iter().enumerate() {
            if i != victim {
                reads.push((i + 1, instance.room(key).await));
            }
        }
        if reads.iter().all(|(_, read)| *read == db) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "GET on the surviving instances {reads:?} differs from PostgreSQL {db:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// 5. Redis restarts under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_converge_after_a_redis_restart() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let key = "redis-restart";
    let stop = CancellationToken::new();
    let urls: Vec<String> = cluster.instances.iter().map(TestServer::ws_url).collect();
    let (plans, _) = member_plans("redis-member-", &urls, key, None, false);
    let members: Vec<Member> = plans
        .into_iter()
        .map(|plan| Member::spawn(plan, stop.clone()))
        .collect();
    for m in &members {
        m.wait_ready().await;
    }
    let refs: Vec<&Member> = members.iter().collect();
    // Saves go to node-1 and node-2 only: node-3's member can learn about them
    // only through Redis, or from the store once Redis is back.
    let writing = CancellationToken::new();
    let writer = spawn_http_writer(
        "redis-http",
        bases(&cluster)[..2].to_vec(),
        key,
        Duration::from_millis(15),
        writing.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for instance in &cluster.instances {
        instance.room(key).await; // every instance has read the room through the cache
    }

    cluster.redis.stop();
    let down_at = Instant::now();
    // Every instance notices and says so, while saves keep succeeding.
    for (i, base) in bases(&cluster).iter().enumerate() {
        let body = eventually(
            Duration::from_secs(10),
            "/health reports Redis down",
            || async {
                let (status, body) = health(base).await;
                (status == 503 && body["checks"]["redis"]["status"] == "down").then_some(body)
            },
        )
        .await;
        assert_eq!(body["status"], "degraded", "node-{}: {body}", i + 1);
        assert_eq!(
            body["checks"]["database"]["status"],
            "up",
            "node-{}: {body}",
            i + 1
        );
    }
    tokio::time::sleep(Duration::from_millis(2000).saturating_sub(down_at.elapsed())).await;
    writing.cancel();
    let mut writes = writer.await.expect("writer");
    let during = writes.iter().filter(|w| w.started > down_at).count();
    let slowest = writes
        .iter()
        .filter(|w| w.started > down_at)
        .map(|w| w.finished - w.started)
        .max();
    let (_, stored) = cluster.db_room(key).await.expect("room");
    tokio::time::sleep(QUIET).await;
    let isolated = members[2].lock().replica.version;
    assert!(
        isolated < stored,
        "node-3's member cannot have heard of the saves made during the outage"
    );

    cluster.redis.start().await;
    let up_at = Instant::now();
    // Members on every instance catch up with what the others wrote meanwhile.
    let db = converge(&cluster, key, &refs, CONVERGE).await;
    let converged_after = up_at.elapsed();
    for base in bases(&cluster) {
        eventually(
            Duration::from_secs(15),
            "/health ok after Redis is back",
            || async { (health(&base).await.0 == 200).then_some(()) },
        )
        .await;
    }
    // The cache serves what PostgreSQL holds, on every instance.
    every_instance_reads(&cluster, key, &db).await;
    // And the bus carries new events again, now to every instance.
    let writing = CancellationToken::new();
    let writer = spawn_http_writer(
        "redis-http-after",
        bases(&cluster),
        key,
        Duration::from_millis(15),
        writing.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    writing.cancel();
    writes.extend(writer.await.expect("writer"));
    let db = converge(&cluster, key, &refs, CONVERGE).await;
    stop.cancel();

    let failed: Vec<&HttpWrite> = writes.iter().filter(|w| w.status != 200).collect();
    assert!(
        failed.is_empty(),
        "saves failed although PostgreSQL was up: {failed:?}"
    );
    assert!(during >= 3, "too few saves during the outage: {during}");
    let logged = logged_ids(&cluster.db_events(key).await);
    for w in &writes {
        assert!(
            logged.contains(&w.id),
            "acknowledged save {} is not in PostgreSQL",
            w.id
        );
    }
    assert_eq!(
        db.1 as usize,
        writes.len(),
        "one event per acknowledged save"
    );
    every_instance_reads(&cluster, key, &db).await;
    let mut reconnects = Vec::new();
    for m in members {
        let s = m.finish().await;
        assert!(s.other_errors.is_empty(), "errors: {:?}", s.other_errors);
        reconnects.push(s.closes.len());
    }
    println!(
        "Redis restart: {} saves, all 200 ({during} during the outage, slowest {:.0} ms); node-3's member was at version \
         {isolated} of {stored} when Redis came back and every member had converged {:.0} ms later; member reconnects \
         {reconnects:?}",
        writes.len(),
        slowest.unwrap_or_default().as_secs_f64() * 1e3,
        converged_after.as_secs_f64() * 1e3
    );
}

/// One instance loses Redis while Redis stays up for the others (a network
/// blip, a proxy, a connection limit): an event it commits meanwhile cannot be
/// published, and the other instances' members must still get it once the
/// instance reconnects — even when nothing else happens in the room afterwards.
/// The same for an instance whose subscriber is cut off while others write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_while_one_instance_lost_redis_reaches_the_others() {
    let cluster = TestCluster::start(3, &[]).await;
    let key = "blip";
    let stop = CancellationToken::new();
    let urls = vec![cluster.instances[1].ws_url(), cluster.instances[2].ws_url()];
    let (plans, _) = member_plans("blip-member-", &urls, key, None, false);
    let members: Vec<Member> = plans
        .into_iter()
        .map(|plan| Member::spawn(plan, stop.clone()))
        .collect();
    for m in &members {
        m.wait_ready().await;
    }
    let refs: Vec<&Member> = members.iter().collect();
    let node1 = &cluster.instances[0];
    let (status, body) = node1
        .post("/api/roulette/save", &json!({"key": key, "number": 1}))
        .await;
    assert_eq!(status, 200, "{body}");
    converge(&cluster, key, &refs, Duration::from_secs(5)).await;

    // Cut node-1's command connection and keep it from reconnecting: Redis
    // refuses new clients while every other connection stays up.
    let mut redis = cluster.redis_admin().await;
    let clients = redis.client_count().await;
    let limit = (clients - 1).to_string();
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "maxclients", &limit])
            .await
            .trim(),
        "+OK"
    );
    assert_eq!(
        redis.kill_links(node1, "normal").await,
        1,
        "node-1 has one command connection"
    );
    let base = node1.url("");
    eventually(
        Duration::from_secs(10),
        "node-1 reports Redis down",
        || async { (health(&base).await.1["checks"]["redis"]["status"] == "down").then_some(()) },
    )
    .await;
    let (status, body) = node1
        .post(
            "/api/roulette/save",
            &json!({"key": key, "number": 2, "id": "while-cut-off"}),
        )
        .await;
    assert_eq!(status, 200, "a save does not need Redis: {body}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let behind: Vec<u64> = members.iter().map(|m| m.lock().replica.version).collect();
    assert_eq!(
        behind,
        [1, 1],
        "the event could not travel while node-1 was cut off"
    );

    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "maxclients", "10000"])
            .await
            .trim(),
        "+OK"
    );
    let back = Instant::now();
    eventually(
        Duration::from_secs(15),
        "node-1 reconnects to Redis",
        || async { (health(&base).await.0 == 200).then_some(()) },
    )
    .await;
    let reconnected = back.elapsed();
    let db = converge(&cluster, key, &refs, Duration::from_secs(10)).await;
    let caught_up = back.elapsed();
    assert_eq!(db, (json!([1, 2]), 2));
    println!(
        "node-1 cut off from Redis: the others caught up {:.0} ms after it reconnected ({:.0} ms after Redis accepted it again)",
        (caught_up - reconnected).as_secs_f64() * 1e3,
        caught_up.as_secs_f64() * 1e3
    );
    // node-1's write-through of version 2 failed too. The other instances must
    // not keep serving version 1 from the cache now that Redis is reachable
    // again — whether or not node-1 itself reads anything (it is asked last).
    for instance in cluster
        .instances
        .iter()
        .skip(1)
        .chain(&cluster.instances[..1])
    {
        eventually(
            Duration::from_secs(5),
            "the cache serves version 2",
            || async { (instance.room(key).await == db).then_some(()) },
        )
        .await;
    }

    // The receiving side: node-2's subscriber is cut off while node-1 writes.
    let clients = redis.client_count().await;
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "maxclients", &(clients - 1).to_string()])
            .await
            .trim(),
        "+OK"
    );
    assert_eq!(
        redis.kill_links(&cluster.instances[1], "pubsub").await,
        1,
        "node-2 has one subscriber connection"
    );
    let (status, body) = node1
        .post(
            "/api/roulette/save",
            &json!({"key": key, "number": 3, "id": "while-deaf"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    eventually(
        Duration::from_secs(5),
        "node-3's member gets the event",
        || async { (members[1].lock().replica.version == 3).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        members[0].lock().replica.version,
        2,
        "node-2 cannot hear the bus"
    );
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "maxclients", "10000"])
            .await
            .trim(),
        "+OK"
    );
    let back = Instant::now();
    let db = converge(&cluster, key, &refs, Duration::from_secs(15)).await;
    assert_eq!(db, (json!([1, 2, 3]), 3));
    println!(
        "node-2's subscriber cut off: its member caught up {:.0} ms after Redis accepted it again",
        back.elapsed().as_secs_f64() * 1e3
    );
    stop.cancel();
    for m in members {
        let s = m.finish().await;
        assert!(
            s.other_errors.is_empty() && s.closes.is_empty(),
            "{:?} {:?}",
            s.other_errors,
            s.closes
        );
    }
}

// ---------------------------------------------------------------------------
// 6. PostgreSQL restarts under load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acknowledged_while_postgres_is_down() {
    let mut cluster = TestCluster::start(3, &[("DB_ACQUIRE_TIMEOUT_MS", "1000")]).await;
    let key = "pg-restart";
    let stop = CancellationToken::new();
    let urls: Vec<String> = cluster.instances.iter().map(TestServer::ws_url).collect();
    let (plans, stop_writing) = member_plans(
        "pg-member-",
        &urls,
        key,
        Some(Duration::from_millis(100)),
        false,
    );
    let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    let members: Vec<Member> = plans
        .into_iter()
        .map(|plan| Member::spawn(plan, stop.clone()))
        .collect();
    for m in &members {
        m.wait_ready().await;
    }
    let writers: Vec<JoinHandle<Vec<HttpWrite>>> = bases(&cluster)
        .into_iter()
        .enumerate()
        .map(|(i, base)| {
            spawn_http_writer(
                &format!("pg-http-{i}"),
                vec![base],
                key,
                Duration::from_millis(50),
                stop_writing.clone(),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    cluster.postgres.stop().await;
    let down_at = Instant::now();
    for (i, base) in bases(&cluster).iter().enumerate() {
        assert_eq!(
            readyz(base).await,
            503,
            "node-{} /readyz while PostgreSQL is down",
            i + 1
        );
        let (status, body) = health(base).await;
        assert_eq!(
            (status, &body["checks"]["database"]["status"]),
            (503, &json!("down")),
            "node-{}: {body}",
            i + 1
        );
    }
    assert_eq!(readyz(&cluster.url("")).await, 503, "/readyz through Nginx");
    tokio::time::sleep(Duration::from_millis(3000).saturating_sub(down_at.elapsed())).await;
    let up_at = Instant::now();
    cluster.postgres.start().await;
    // The instances recover by themselves, without a restart.
    for base in bases(&cluster) {
        eventually(
            Duration::from_secs(15),
            "/readyz 200 after PostgreSQL is back",
            || async { (readyz(&base).await == 200).then_some(()) },
        )
        .await;
    }
    let ready_after = up_at.elapsed();
    eventually(
        Duration::from_secs(15),
        "every WebSocket writer succeeds again",
        || async {
            let done = members.iter().all(|m| {
                let s = m.lock();
                s.sent
                    .iter()
                    .any(|(id, at)| *at > up_at && s.acked.contains(id))
            });
            done.then_some(())
        },
    )
    .await;
    stop_writing.cancel();
    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer"));
    }
    let refs: Vec<&Member> = members.iter().collect();
    // Every add still queued at the server gets its answer before we look.
    eventually(Duration::from_secs(15), "every add answered", || async {
        members
            .iter()
            .all(|m| {
                let s = m.lock();
                s.acked.len() + s.unavailable == s.sent.len() || !s.closes.is_empty()
            })
            .then_some(())
    })
    .await;
    let db = converge(&cluster, key, &refs, CONVERGE).await;
    stop.cancel();
    let logged = logged_ids(&cluster.db_events(key).await);

    // HTTP: a save entirely inside the outage is 503 and not stored; 200 means stored.
    let inside = |w: &HttpWrite| w.started > down_at && w.finished < up_at;
    let outage: Vec<&HttpWrite> = writes.iter().filter(|w| inside(w)).collect();
    assert!(
        outage.len() >= 3,
        "too few saves during the outage: {}",
        outage.len()
    );
    for w in &outage {
        assert_eq!(w.status, 503, "save {} during the outage", w.id);
        assert!(
            !logged.contains(&w.id),
            "save {} was refused with 503 but is stored",
            w.id
        );
    }
    for w in writes.iter().filter(|w| w.status == 200) {
        assert!(
            logged.contains(&w.id),
            "save {} got 200 but is not in PostgreSQL",
            w.id
        );
    }
    let odd: Vec<&HttpWrite> = writes
        .iter()
        .filter(|w| ![200, 503].contains(&w.status))
        .collect();
    assert!(odd.is_empty(), "only 200 or 503 expected: {odd:?}");
    // WebSocket: each add is answered once, by its event or by `unavailable`;
    // what is stored is exactly what was acknowledged.
    let mut ws_figures = Vec::new();
    for (m, name) in members.into_iter().zip(&names) {
        let s = m.finish().await;
        assert!(
            s.other_errors.is_empty(),
            "{name}: errors {:?}",
            s.other_errors
        );
        assert!(s.unavailable > 0, "{name} never got `unavailable`");
        let stored: HashSet<&String> = logged
            .iter()
            .filter(|id| id.starts_with(&format!("{name}-")))
            .collect();
        let acked: HashSet<&String> = s.acked.iter().collect();
        if s.closes.is_empty() {
            assert_eq!(
                stored, acked,
                "{name}: stored adds differ from acknowledged ones"
            );
            assert_eq!(
                s.acked.len() + s.unavailable,
                s.sent.len(),
                "{name}: an add was answered twice or never"
            );
        } else {
            // A member whose room could not fill a gap while the database was
            // down is closed with 1013 to resume (the contract allows it); the
            // answers to its adds in flight then are unknown.
            assert!(
                s.closes.iter().all(|c| *c == Some(1013)),
                "{name}: closed with {:?}",
                s.closes
            );
            assert!(
                acked.is_subset(&stored),
                "{name}: an acknowledged add is not stored"
            );
        }
        ws_figures.push((s.sent.len(), s.acked.len(), s.unavailable, s.closes.len()));
    }
    every_instance_reads(&cluster, key, &db).await;
    let slowest = outage
        .iter()
        .map(|w| w.finished - w.started)
        .max()
        .unwrap_or_default();
    println!(
        "PostgreSQL restart: HTTP statuses {:?} ({} entirely during the outage, all 503, slowest {:.0} ms); WebSocket \
         (sent, acked, unavailable, reconnects) {ws_figures:?}; all instances ready {:.0} ms after PostgreSQL started; {} events stored",
        statuses(&writes),
        outage.len(),
        slowest.as_secs_f64() * 1e3,
        ready_after.as_secs_f64() * 1e3,
        db.1
    );
}

// ---------------------------------------------------------------------------
// 7. The admin API is cluster-wide
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sees_and_disconnects_connections_on_every_instance() {
    let cluster = TestCluster::start(3, &[]).await;
    let key = "adm";
    let (status, _) = cluster.instances[0]
        .put("/api/roulette/adm", &json!({"history": [1, "00"]}))
        .await;
    assert_eq!(status, 200);
    let mut clients = Vec::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let agent = format!("admin-client-{}", i + 1);
        let mut ws = instance
            .ws_with_headers(&[("User-Agent", &agent)])
            .await
            .expect("connect");
        ws.send(json!({"type": "join", "key": key, "version": 0}))
            .await;
        assert_eq!(ws.recv().await["type"], "sync");
        clients.push(ws);
    }

    // Any instance lists all three connections, each with the instance holding it.
    let mut held_by_c = String::new();
    for (i, instance) in cluster.instances.iter().enumerate() {
        let room = eventually(
            Duration::from_secs(5),
            "three connections listed",
            || async {
                let (status, body) = instance.admin_get("/api/admin/sessions").await;
                assert_eq!(status, 200, "{body}");
                let room = body.as_array()?.iter().find(|r| r["key"] == key)?.clone();
                (room["activeConnections"] == 3).then_some(room)
            },
        )
        .await;
        assert_shape(
            &room,
            &json!({
                "key": key, "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "historyLength": 2,
                "activeConnections": 3, "totalConnections": 3, "protected": false,
                "connections": ["<any>", "<any>", "<any>"],
            }),
            &format!("sessions on node-{}", i + 1),
        );
        let mut seen: Vec<(String, String)> = Vec::new();
        for c in room["connections"].as_array().expect("connections") {
            assert_shape(
                c,
                &json!({
                    "id": "<string>", "key": key, "connectedAt": "<rfc3339>", "lastActivity": "<rfc3339>",
                    "status": "connected", "ipAddress": "127.0.0.1", "userAgent": "<string>", "instance": "<string>",
                }),
                "connection",
            );
            let (agent, instance) = (
                c["userAgent"].as_str().unwrap_or_default(),
                c["instance"].as_str().unwrap_or_default(),
            );
            assert_eq!(
                agent.trim_start_matches("admin-client-"),
                instance.trim_start_matches("node-"),
                "{c}"
            );
            if instance == "node-3" {
                held_by_c = c["id"].as_str().unwrap_or_default().to_owned();
            }
            seen.push((agent.to_owned(), instance.to_owned()));
        }
        seen.sort();
        assert_eq!(seen.len(), 3, "{room}");
        let (status, stats) = instance.admin_get("/api/admin/stats").await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(
            (&stats["activeConnections"], &stats["activeSessions"]),
            (&json!(3), &json!(1)),
            "{stats}"
        );
    }

    // A disconnect on node-1 closes the connection node-3 holds, and only it.
    let (status, body) = cluster.instances[0]
        .admin_post("/api/admin/connections/node-3-999/disconnect")
        .await;
    assert_eq!(status, 404, "unknown connection: {body}");
    let (status, body) = cluster.instances[0]
        .admin_post(&format!("/api/admin/connections/{held_by_c}/disconnect"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_shape(
        &body,
        &json!({"status": "success", "message": "<string>"}),
        "disconnect",
    );
    let mut c = clients.pop().expect("client on node-3");
    let code = tokio::time::timeout(Duration::from_secs(5), c.closed())
        .await
        .expect("client on node-3 closed");
    assert_eq!(code, Some(1000), "an admin disconnect closes normally");
    for ws in &mut clients {
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(
            ws.recv().await,
            json!({"type": "pong"}),
            "other connections stay open"
        );
    }
    eventually(
        Duration::from_secs(5),
        "the closed connection leaves the listing",
        || async {
            let (_, body) = cluster.instances[1].admin_get("/api/admin/stats").await;
            (body["activeConnections"] == 2).then_some(())
        },
    )
    .await;
    let (status, body) = cluster.instances[1]
        .admin_post(&format!("/api/admin/connections/{held_by_c}/disconnect"))
        .await;
    assert_eq!(status, 404, "second disconnect: {body}");
}

// ---------------------------------------------------------------------------
// 8. TLS through Nginx
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_wss_through_nginx() {
    let cluster = TestCluster::start(3, &[]).await;
    let https = cluster.https_client();
    let pem = cluster.nginx.certificate_pem();

    let reply = https
        .get(cluster.nginx.https_url("/health"))
        .send()
        .await
        .expect("HTTPS /health");
    assert_eq!(reply.status().as_u16(), 200);
    let body: Value = reply.json().await.expect("JSON");
    assert_eq!(body["status"], "ok", "{body}");

    let mut ws = WsClient::connect_tls(&cluster.nginx.wss_url(), &pem)
        .await
        .expect("wss handshake");
    ws.send(json!({"type": "join", "key": "tls", "version": 0}))
        .await;
    assert_shape(
        &ws.recv().await,
        &json!({"type": "sync", "key": "tls", "history": [], "full": true, "version": 0, "epoch": null}),
        "join over wss",
    );
    ws.send(json!({"type": "add", "number": 17})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "tls", "number": 17, "version": 1})
    );
    let reply = https
        .post(cluster.nginx.https_url("/api/roulette/save"))
        .json(&json!({"key": "tls", "number": "00"}))
        .send()
        .await
        .expect("HTTPS save");
    assert_eq!(reply.status().as_u16(), 200);
    let body: Value = reply.json().await.expect("JSON");
    assert_shape(
        &body,
        &saved("tls", json!([17, "00"]), 2, false),
        "save over HTTPS",
    );
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": "tls", "number": "00", "version": 2})
    );
    let reply = https
        .get(cluster.nginx.https_url("/api/roulette/tls"))
        .send()
        .await
        .expect("HTTPS GET");
    let body: Value = reply.json().await.expect("JSON");
    assert_shape(
        &body,
        &room_reply("tls", json!([17, "00"]), 2),
        "GET over HTTPS",
    );

    // The certificate is what makes these work: without trusting it, both fail.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    assert!(
        untrusting
            .get(cluster.nginx.https_url("/health"))
            .send()
            .await
            .is_err(),
        "an untrusted certificate was accepted"
    );
    assert!(
        tokio_tungstenite::connect_async(cluster.nginx.wss_url())
            .await
            .is_err(),
        "wss with an untrusted certificate was accepted"
    );
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
