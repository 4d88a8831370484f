//! Observability against real servers.
//!
//! 1. A real Prometheus scrapes a 3-instance cluster (PostgreSQL, Redis, Nginx)
//!    every second with the repository's alert rules loaded; after scripted
//!    traffic, every PromQL expression of `grafana/dashboards/croupier.json`
//!    must return data and every alert rule of `prometheus/alerts.yml` must
//!    evaluate (and be loaded with health "ok").
//! 2. One instance's `/metrics`, read directly and parsed, must count exactly
//!    what the test did: requests per route template, open sockets, messages
//!    per type, with bounded labels, process metrics and well-formed histograms.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::app::{ADMIN_TOKEN, TestServer, WsClient, eventually};
use support::cluster::TestCluster;
use support::exposition::{self, Scrape};
use support::prometheus::TestPrometheus;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `type` label the server may use for WebSocket messages: the protocol's
/// message types, and `other` for anything unknown.
const KNOWN_MESSAGE_TYPES: &[&str] = &[
    "join",
    "add",
    "remove",
    "update",
    "getHistory",
    "saveNumber",
    "updateHistory",
    "leave",
    "ping",
    "sync",
    "historyUpdate",
    "numberSaved",
    "historyUpdated",
    "pong",
    "recovered",
    "error",
    "authRequired",
    "other",
];

/// Every route template of `src/http/mod.rs`, plus the label of unmatched paths.
const ROUTE_TEMPLATES: &[&str] = &[
    "/api/roulette/sessions",
    "/api/roulette/save",
    "/api/roulette/{key}",
    "/api/rooms/auth",
    "/api/admin/sessions",
    "/api/admin/stats",
    "/api/admin/sessions/{key}/history",
    "/api/admin/connections/{id}/disconnect",
    "/api/admin/migrations",
    "/ws",
    "/health",
    "/livez",
    "/readyz",
    "/metrics",
    "unmatched",
];

// ---------------------------------------------------------------------------
// Small clients
// ---------------------------------------------------------------------------

/// `method url` with an optional bearer token and JSON body → (status, body text).
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = http.request(method, url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let reply = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = reply.status().as_u16();
    (status, reply.text().await.expect("body"))
}

async fn expect_status(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
    want: u16,
) -> String {
    let (status, text) = call(http, method.clone(), url, token, body).await;
    assert_eq!(status, want, "{method} {url} answered {status}: {text}");
    text
}

/// The next frame of type `kind`, skipping others (at most 50 of them).
async fn recv_type(ws: &mut WsClient, kind: &str) -> Value {
    for _ in 0..50 {
        let frame = ws.recv().await;
        if frame["type"] == kind {
            return frame;
        }
    }
    panic!("no {kind:?} frame among the next 50");
}

// ---------------------------------------------------------------------------
// 1. Dashboard and alerts on a real Prometheus
// ---------------------------------------------------------------------------

/// The connection cap of every instance in the Prometheus test: small, so one
/// instance can be driven to refusals (503, the 5xx series of the dashboard).
const WS_CAP: usize = 6;

/// Open sockets the Prometheus test keeps for its queries.
struct LiveTraffic {
    sockets: Vec<WsClient>,
    adds_sent: usize,
}

/// Scripted traffic: HTTP through Nginx and directly on every instance (saves,
/// reads, a replace, a protected room, 4xx errors), WebSocket members of one
/// room on every instance (joins, adds, a remove, ping, an unknown type, a
/// resume with a foreign epoch → resync), and connection refusals at the cap
/// (503).
async fn run_traffic(cluster: &TestCluster) -> LiveTraffic {
    use reqwest::Method;
    let http = &cluster.instances[0].http;

    // Through Nginx (spread over the instances).
    for i in 0..12u32 {
        let body = json!({"key": format!("obs-room-{}", i % 3), "number": i % 37});
        expect_status(
            http,
            Method::POST,
            &cluster.url("/api/roulette/save"),
            None,
            Some(body),
            200,
        )
        .await;
    }
    for i in 0..3 {
        expect_status(
            http,
            Method::GET,
            &cluster.url(&format!("/api/roulette/obs-room-{i}")),
            None,
            None,
            200,
        )
        .await;
    }
    let replace = json!({"history": [1, 2, 3]});
    expect_status(
        http,
        Method::PUT,
        &cluster.url("/api/roulette/obs-room-1"),
        None,
        Some(replace),
        200,
    )
    .await;
    expect_status(
        http,
        Method::GET,
        &cluster.url("/api/roulette/sessions?include=history"),
        None,
        None,
        200,
    )
    .await;
    let auth = expect_status(
        http,
        Method::POST,
        &cluster.url("/api/rooms/auth"),
        None,
        Some(json!({"key": "obs-locked", "password": "s3cret"})),
        200,
    )
    .await;
    let token: Value = serde_json::from_str(&auth).expect("auth reply");
    let token = token["token"].as_str().expect("token").to_owned();
    let locked = json!({"key": "obs-locked", "number": 7});
    expect_status(
        http,
        Method::POST,
        &cluster.url("/api/roulette/save"),
        Some(&token),
        Some(locked.clone()),
        200,
    )
    .await;
    // A few errors: missing token, bad key, unknown path, admin without token.
    expect_status(
        http,
        Method::POST,
        &cluster.url("/api/roulette/save"),
        None,
        Some(locked),
        401,
    )
    .await;
    expect_status(
        http,
        Method::GET,
        &cluster.url("/api/roulette/%20padded"),
        None,
        None,
        400,
    )
    .await;
    expect_status(
        http,
        Method::GET,
        &cluster.url("/api/no/such/route"),
        None,
        None,
        404,
    )
    .await;
    expect_status(
        http,
        Method::GET,
        &cluster.url("/api/admin/stats"),
        None,
        None,
        401,
    )
    .await;
    expect_status(
        http,
        Method::GET,
        &cluster.url("/api/admin/stats"),
        Some(ADMIN_TOKEN),
        None,
        200,
    )
    .await;

    // Directly on every instance, so each has API, database and cache series.
    for server in &cluster.instances {
        let body = json!({"key": "obs-room-0", "number": 5});
        expect_status(
            &server.http,
            Method::POST,
            &server.url("/api/roulette/save"),
            None,
            Some(body),
            200,
        )
        .await;
        expect_status(
            &server.http,
            Method::GET,
            &server.url("/api/roulette/obs-room-2"),
            None,
            None,
            200,
        )
        .await;
        expect_status(
            &server.http,
            Method::GET,
            &server.url("/api/admin/sessions"),
            Some(ADMIN_TOKEN),
            None,
            200,
        )
        .await;
        expect_status(
            &server.http,
            Method::GET,
            &server.url("/health"),
            None,
            None,
            200,
        )
        .await;
    }

    // Two members of one room on every instance; every add reaches all six
    // (across instances through Redis).
    let mut sockets = Vec::new();
    for server in &cluster.instances {
        for _ in 0..2 {
            let mut ws = server.ws().await;
            ws.send(json!({"type": "join", "key": "obs-live", "version": 0}))
                .await;
            recv_type(&mut ws, "sync").await;
            sockets.push(ws);
        }
    }
    let mut adds_sent = 0;
    for i in 0..3 {
        sockets[2 * i]
            .send(json!({"type": "add", "number": 10 + i}))
            .await;
        adds_sent += 1;
        for ws in sockets.iter_mut() {
            let frame = recv_type(ws, "add").await;
            assert_eq!(frame["number"], 10 + i, "add {i} as delivered: {frame}");
        }
    }
    sockets[1].send(json!({"type": "remove", "index": 0})).await;
    for ws in sockets.iter_mut() {
        recv_type(ws, "remove").await;
    }
    sockets[3].send(json!({"type": "ping"})).await;
    recv_type(&mut sockets[3], "pong").await;
    sockets[5].send(json!({"type": "dance"})).await;
    let error = recv_type(&mut sockets[5], "error").await;
    assert_eq!(error["code"], "unknown_type", "{error}");

    // A resume with an epoch the room never had: a full resync.
    let mut resumer = cluster.instances[1].ws().await;
    resumer
        .send(json!({"type": "join", "key": "obs-live", "version": 1, "epoch": "not-this-room"}))
        .await;
    let sync = recv_type(&mut resumer, "sync").await;
    assert_eq!(sync["full"], true, "{sync}");
    resumer.close().await;

    // Fill instance 3 up to its cap; the next upgrade is refused with 503.
    let node3 = &cluster.instances[2];
    let mut extra = Vec::new();
    for _ in 0..WS_CAP - 2 {
        extra.push(node3.ws().await);
    }
    let refused = eventually(
        Duration::from_secs(5),
        "a WebSocket refused at the cap",
        || async move {
            match node3.ws_with_headers(&[]).await {
                Err(refusal) => Some(refusal),
                Ok(ws) => {
                    // A slot was still being released; give it back and retry.
                    ws.close().await;
                    None
                }
            }
        },
    )
    .await;
    assert_eq!(refused.status, Some(503), "refusal at the cap: {refused:?}");
    for ws in extra {
        ws.close().await;
    }
    LiveTraffic { sockets, adds_sent }
}

/// Every `expr` of the dashboard's panels (rows included), with its panel title.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file("grafana/dashboards/croupier.json"))
        .expect("reading the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let ref_id = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("{title} [{ref_id}]"), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// What Grafana would send for the dashboard's variables, with "All" instances.
fn substitute_grafana_variables(expr: &str) -> String {
    let expr = [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "15s"),
        ("${__interval}", "15s"),
        ("$__range", "5m"),
        ("${__range}", "5m"),
        ("${instance}", ".*"),
        ("$instance", ".*"),
    ]
    .iter()
    .fold(expr.to_owned(), |e, (from, to)| e.replace(from, to));
    assert!(
        !expr.contains('$'),
        "unsubstituted Grafana variable in {expr}"
    );
    expr
}

/// Light steady traffic through Nginx while Prometheus is queried, so that
/// every rate has something to measure: a save into the room the WebSocket
/// members watch (fan-out on every instance) and two reads, every 100 ms, for
/// at most 40 s. Reads of an existing room are soon answered from the
/// instance's snapshot; reads of a room nobody created always go to the store
/// (and its Redis cache).
fn spawn_trickle(http: reqwest::Client, base: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..400u32 {
            let save = json!({"key": "obs-live", "number": i % 37});
            let _ = http
                .post(format!("{base}/api/roulette/save"))
                .json(&save)
                .send()
                .await;
            for room in ["obs-room-0", "obs-nobody"] {
                let _ = http.get(format!("{base}/api/roulette/{room}")).send().await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// `None` when the query succeeded with data; otherwise why not.
fn query_problem(reply: &Value, allow_empty: bool) -> Option<String> {
    if reply["status"] != "success" {
        return Some(format!(
            "status {}: {} {}",
            reply["status"], reply["errorType"], reply["error"]
        ));
    }
    let data = &reply["data"];
    let empty = match data["resultType"].as_str() {
        Some("vector" | "matrix") => data["result"].as_array().is_none_or(Vec::is_empty),
        Some("scalar" | "string") => data["result"].is_null(),
        other => return Some(format!("unexpected resultType {other:?}")),
    };
    (empty && !allow_empty).then(|| "empty result".to_owned())
}

/// The sample values of a vector (or scalar) result.
fn vector_values(reply: &Value) -> Vec<f64> {
    let result = &reply["data"]["result"];
    if reply["data"]["resultType"] == "scalar" {
        return result[1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .into_iter()
            .collect();
    }
    result
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["value"][1].as_str()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alert_expressions_evaluate_on_real_prometheus() {
    let started = Instant::now();
    let cap = WS_CAP.to_string();
    let cluster = TestCluster::start(3, &[("WS_MAX_CONNECTIONS", &cap)]).await;
    let targets: Vec<SocketAddr> = cluster.instances.iter().map(|s| s.addr).collect();
    let prometheus = TestPrometheus::start(
        "croupier",
        &targets,
        Duration::from_secs(1),
        &[repo_file("prometheus/alerts.yml")],
    )
    .await;
    let setup = started.elapsed();

    let traffic_started = Instant::now();
    let mut live = run_traffic(&cluster).await;
    let traffic_time = traffic_started.elapsed();
    let trickle = spawn_trickle(cluster.instances[0].http.clone(), cluster.url(""));

    // All three targets scraped, labelled like prometheus/prometheus.yml
    // labels them: job "croupier", instance = the scraped host:port.
    let wanted: BTreeSet<String> = targets.iter().map(SocketAddr::to_string).collect();
    let (prom, wanted) = (&prometheus, &wanted);
    eventually(
        Duration::from_secs(15),
        "all croupier targets up",
        || async move {
            let reply = prom.query("up{job=\"croupier\"} == 1").await;
            let up: BTreeSet<String> = reply["data"]["result"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["metric"]["instance"].as_str().map(str::to_owned))
                .collect();
            (up == *wanted).then_some(())
        },
    )
    .await;

    // The traffic is visible through the whole pipeline: every add counted once.
    let adds = live.adds_sent as f64;
    eventually(Duration::from_secs(10), "the adds scraped", || async move {
        let reply = prom
            .query("sum(croupier_ws_messages_received_total{job=\"croupier\", type=\"add\"})")
            .await;
        (vector_values(&reply) == [adds]).then_some(())
    })
    .await;

    // Every dashboard expression returns data, and under the steady traffic
    // at least one number (a rate over fewer than two scrapes, or 0/0, is NaN:
    // Grafana draws nothing). Rates need two scrapes of a series, so retry for
    // a while before judging.
    let expressions = dashboard_expressions();
    assert!(
        expressions.len() >= 20,
        "only {} dashboard expressions found",
        expressions.len()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rounds = 0;
    let (problems, nan) = loop {
        rounds += 1;
        let mut problems = Vec::new();
        let mut nan = Vec::new();
        for (panel, expr) in &expressions {
            let query = substitute_grafana_variables(expr);
            let reply = prometheus.query(&query).await;
            let values = vector_values(&reply);
            if let Some(problem) = query_problem(&reply, false) {
                problems.push(format!("{panel}: {problem}\n    {query}"));
            } else if values.iter().all(|v| v.is_nan()) {
                problems.push(format!("{panel}: only NaN values {values:?}\n    {query}"));
            } else if values.iter().any(|v| v.is_nan()) {
                nan.push(panel.clone());
            }
        }
        if problems.is_empty() || Instant::now() > deadline {
            break (problems, nan);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        problems.is_empty(),
        "{} of {} dashboard expressions failed after {rounds} rounds:\n{}\nPrometheus log:\n{}",
        problems.len(),
        expressions.len(),
        problems.join("\n"),
        prometheus.log()
    );
    let dashboard_time = traffic_started.elapsed();

    // Every alert rule is loaded, healthy, and evaluates.
    let alert_file =
        std::fs::read_to_string(repo_file("prometheus/alerts.yml")).expect("reading alerts.yml");
    let declared: BTreeSet<String> = alert_file
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(
        !declared.is_empty(),
        "no alerts found in prometheus/alerts.yml"
    );
    let declared = &declared;
    let rules: Vec<Value> = eventually(
        Duration::from_secs(15),
        "every alert rule evaluated with health ok",
        || async move {
            let reply = prom.rules().await;
            let rules: Vec<Value> = reply["data"]["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let loaded: BTreeSet<String> = rules
                .iter()
                .filter_map(|r| r["name"].as_str().map(str::to_owned))
                .collect();
            (loaded == *declared
                && rules
                    .iter()
                    .all(|r| r["health"] == "ok" && r["type"] == "alerting"))
            .then_some(rules)
        },
    )
    .await;
    let mut alert_problems = Vec::new();
    let mut availability_checked = 0;
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let query = rule["query"].as_str().expect("rule query");
        let reply = prometheus.query(query).await;
        if let Some(problem) = query_problem(&reply, true) {
            alert_problems.push(format!("{name}: {problem}\n    {query}"));
            continue;
        }
        // "X == 0" availability alerts: X exists for every instance, and the
        // healthy cluster does not match.
        if let Some(selector) = query.trim().strip_suffix("== 0") {
            availability_checked += 1;
            let series = prometheus.query(selector).await;
            let values = vector_values(&series);
            if values.len() != targets.len() || values.iter().any(|v| *v != 1.0) {
                alert_problems.push(format!(
                    "{name}: {selector} gave {values:?}, expected 1 per instance"
                ));
            }
            if !vector_values(&reply).is_empty() {
                alert_problems.push(format!("{name}: matches a healthy cluster: {reply}"));
            }
        }
    }
    assert!(
        alert_problems.is_empty(),
        "alert rules:\n{}",
        alert_problems.join("\n")
    );

    // The open sockets are what the gauge says, summed over the instances.
    let open = live.sockets.len() as f64;
    trickle.abort();
    eventually(
        Duration::from_secs(10),
        "croupier_ws_connections scraped",
        || async move {
            let reply = prom
                .query("sum(croupier_ws_connections{job=\"croupier\"})")
                .await;
            (vector_values(&reply) == [open]).then_some(())
        },
    )
    .await;

    eprintln!(
        "observability: setup {setup:.1?}, traffic {traffic_time:.1?}, dashboard green after {dashboard_time:.1?} \
         ({rounds} rounds, {} expressions, some series NaN: {nan:?}), {} alert rules ok \
         ({availability_checked} availability rules silent on a healthy cluster); total {:.1?}",
        expressions.len(),
        rules.len(),
        started.elapsed()
    );
    for ws in live.sockets.drain(..) {
        ws.close().await;
    }
}

// ---------------------------------------------------------------------------
// 2. One instance's /metrics, counted exactly
// ---------------------------------------------------------------------------

/// `after - before` for one exact series (absent = 0).
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.exact(name, labels).unwrap_or(0.0) - before.exact(name, labels).unwrap_or(0.0)
}

/// Polls the instance until `croupier_ws_connections` is `expected`.
async fn wait_for_gauge(server: &TestServer, expected: f64) {
    let mut last = f64::NAN;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = exposition::scrape(server)
            .await
            .exact("croupier_ws_connections", &[])
            .unwrap_or(f64::NAN);
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("croupier_ws_connections is {last}, expected {expected}");
}

/// The metric names scripts/check-deploy.sh lists as exported by the app.
fn known_metrics() -> Vec<String> {
    let script = std::fs::read_to_string(repo_file("scripts/check-deploy.sh"))
        .expect("reading check-deploy.sh");
    let start = script
        .find("KNOWN_METRICS=(")
        .expect("KNOWN_METRICS in check-deploy.sh")
        + "KNOWN_METRICS=(".len();
    let end = start + script[start..].find(')').expect("end of KNOWN_METRICS");
    script[start..end]
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

fn proc_status_kib(pid: u32, field: &str) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} not in /proc/{pid}/status"))
}

/// utime + stime of a process in seconds (Linux clock ticks are 1/100 s).
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc stat");
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<f64> = after_name
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("tick count"))
        .collect();
    (fields[0] + fields[1]) / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_counts_exactly_what_happened() {
    use reqwest::Method;
    let started = Instant::now();
    let cluster = TestCluster::start(1, &[]).await;
    let server = &cluster.instances[0];
    let http = &server.http;
    let before = exposition::scrape(server).await;

    // K reads of one route template with K different raw keys, some 400s on the
    // same template, N saves, unknown paths.
    const K: usize = 7;
    for i in 0..K {
        expect_status(
            http,
            Method::GET,
            &server.url(&format!("/api/roulette/raw-key-{i}")),
            None,
            None,
            200,
        )
        .await;
    }
    for _ in 0..3 {
        expect_status(
            http,
            Method::GET,
            &server.url("/api/roulette/%20raw-bad-key"),
            None,
            None,
            400,
        )
        .await;
    }
    for i in 0..4 {
        let body = json!({"key": "raw-key-saved", "number": i});
        expect_status(
            http,
            Method::POST,
            &server.url("/api/roulette/save"),
            None,
            Some(body),
            200,
        )
        .await;
    }
    for _ in 0..2 {
        expect_status(
            http,
            Method::GET,
            &server.url("/raw-unknown/path-123"),
            None,
            None,
            404,
        )
        .await;
    }
    let after = exposition::scrape(server).await;

    let key_route = [("method", "GET"), ("route", "/api/roulette/{key}")];
    let requests = "croupier_http_requests_total";
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[key_route[0], key_route[1], ("status", "200")]
        ),
        K as f64
    );
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[key_route[0], key_route[1], ("status", "400")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[
                ("method", "POST"),
                ("route", "/api/roulette/save"),
                ("status", "200")
            ]
        ),
        4.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "croupier_http_request_duration_seconds_count",
            &key_route
        ),
        (K + 3) as f64,
        "the duration histogram counts every request of the route, whatever its status"
    );
    // Unknown paths share one label; raw paths and keys never become labels.
    assert_eq!(
        delta(
            &before,
            &after,
            requests,
            &[("method", "GET"), ("route", "unmatched"), ("status", "404")]
        ),
        2.0
    );
    for family in [requests, "croupier_http_request_duration_seconds_bucket"] {
        let routes = after.label_values(family, "route");
        let unknown: Vec<&String> = routes
            .iter()
            .filter(|r| !ROUTE_TEMPLATES.contains(&r.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{family} has route labels that are not templates: {unknown:?}"
        );
        assert!(
            routes.contains("/api/roulette/{key}"),
            "{family} routes: {routes:?}"
        );
    }
    let raw = after
        .samples
        .iter()
        .find(|s| s.labels.values().any(|v| v.contains("raw-")));
    assert!(
        raw.is_none(),
        "a raw key or path became a label value: {raw:?}"
    );

    // Open sockets: the gauge follows them up and down.
    wait_for_gauge(server, 0.0).await;
    const M: usize = 5;
    let mut sockets = Vec::new();
    for _ in 0..M {
        sockets.push(server.ws().await);
    }
    wait_for_gauge(server, M as f64).await;
    for ws in sockets.drain(..2) {
        ws.close().await;
    }
    wait_for_gauge(server, (M - 2) as f64).await;

    // Messages by type: joins, adds, and unknown types folded into "other".
    let before = exposition::scrape(server).await;
    let (mut v2, mut v1, mut stranger) = {
        let mut it = sockets.drain(..);
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    v2.send(json!({"type": "join", "key": "raw-key-live", "version": 0}))
        .await;
    recv_type(&mut v2, "sync").await;
    v1.send(json!({"type": "join", "key": "raw-key-live"}))
        .await;
    recv_type(&mut v1, "sync").await;
    const ADDS: usize = 6;
    for i in 0..ADDS {
        v2.send(json!({"type": "add", "number": i})).await;
    }
    for i in 0..ADDS {
        let frame = recv_type(&mut v2, "add").await;
        assert_eq!(frame["number"], i, "{frame}");
        let frame = recv_type(&mut v1, "sync").await;
        assert_eq!(
            frame["history"].as_array().map(Vec::len),
            Some(i + 1),
            "{frame}"
        );
    }
    let unknown = [
        json!({"type": "dance"}).to_string(),
        json!({"type": "ADD", "number": 1}).to_string(),
        json!({"type": "raw-type-xyz"}).to_string(),
        "not json at all".to_owned(),
    ];
    for text in &unknown {
        stranger.send_text(text).await;
        recv_type(&mut stranger, "error").await;
    }
    let after = exposition::scrape(server).await;
    let received = "croupier_ws_messages_received_total";
    assert_eq!(
        delta(&before, &after, received, &[("type", "add")]),
        ADDS as f64
    );
    assert_eq!(delta(&before, &after, received, &[("type", "join")]), 2.0);
    assert_eq!(
        delta(&before, &after, received, &[("type", "other")]),
        unknown.len() as f64
    );
    let sent = "croupier_ws_messages_sent_total";
    assert_eq!(
        delta(&before, &after, sent, &[("type", "add")]),
        ADDS as f64,
        "add events to the v2 member"
    );
    assert_eq!(
        delta(&before, &after, sent, &[("type", "error")]),
        unknown.len() as f64
    );
    for family in [received, sent] {
        let types = after.label_values(family, "type");
        let unknown: Vec<&String> = types
            .iter()
            .filter(|t| !KNOWN_MESSAGE_TYPES.contains(&t.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{family} has unbounded type labels: {unknown:?}"
        );
    }
    let rooms_active = after
        .exact("croupier_rooms_active", &[])
        .expect("croupier_rooms_active");
    assert!(
        rooms_active >= 1.0,
        "a room with members is active: {rooms_active}"
    );
    for ws in [v2, v1, stranger] {
        ws.close().await;
    }
    wait_for_gauge(server, 0.0).await;

    // Process metrics, compared with what /proc says about the same process.
    let scrape = exposition::scrape(server).await;
    let pid = server.pid();
    let fds = count_entries(&format!("/proc/{pid}/fd")) as f64;
    let rss = proc_status_kib(pid, "VmRSS:") * 1024.0;
    let open_fds = scrape
        .exact("process_open_fds", &[])
        .expect("process_open_fds");
    let resident = scrape
        .exact("process_resident_memory_bytes", &[])
        .expect("process_resident_memory_bytes");
    let cpu = scrape
        .exact("process_cpu_seconds_total", &[])
        .expect("process_cpu_seconds_total");
    assert!(
        (open_fds - fds).abs() <= 16.0,
        "process_open_fds {open_fds}, /proc says {fds}"
    );
    assert!(
        resident > rss / 2.0 && resident < rss * 2.0,
        "process_resident_memory_bytes {resident}, VmRSS {rss}"
    );
    let proc_cpu = proc_cpu_seconds(pid);
    assert!(
        cpu > 0.0 && cpu <= proc_cpu + 0.011 && proc_cpu - cpu < 0.5,
        "process_cpu_seconds_total {cpu}, /proc says {proc_cpu}"
    );

    // Every family the deployment files may use is exported (`up` is Prometheus').
    let missing: Vec<String> = known_metrics()
        .into_iter()
        .filter(|name| name != "up" && !scrape.has(name))
        .collect();
    assert!(
        missing.is_empty(),
        "families missing from /metrics: {missing:?}"
    );

    // Types: histograms are real histograms (bucket lines, not summaries),
    // `_total` families are counters, gauges are gauges.
    let histograms: Vec<&String> = scrape
        .types
        .iter()
        .filter(|(_, t)| *t == "histogram")
        .map(|(n, _)| n)
        .collect();
    for family in [
        "croupier_http_request_duration_seconds",
        "croupier_db_query_duration_seconds",
        "croupier_fanout_latency_seconds",
    ] {
        assert!(
            histograms.iter().any(|h| *h == family),
            "{family} is not a histogram; histograms: {histograms:?}"
        );
    }
    let mut checked = BTreeMap::new();
    for family in &histograms {
        let series = scrape
            .check_histogram(family)
            .unwrap_or_else(|e| panic!("{e}"));
        checked.insert(family.to_string(), series);
    }
    for sample in &scrape.samples {
        let family = scrape.family_of(&sample.name);
        let kind = scrape.types.get(family).map(String::as_str);
        assert!(kind.is_some(), "{} has no TYPE line", sample.name);
        if family.ends_with("_total") {
            assert_eq!(kind, Some("counter"), "{family}");
            assert!(sample.value >= 0.0, "negative counter {sample:?}");
        }
    }
    for gauge in [
        "croupier_ws_connections",
        "croupier_rooms_active",
        "croupier_dependency_up",
        "process_open_fds",
    ] {
        assert_eq!(
            scrape.types.get(gauge).map(String::as_str),
            Some("gauge"),
            "{gauge}"
        );
    }
    eprintln!(
        "metrics: {} samples, {} families, histograms {checked:?}; rss {:.1} MiB, {open_fds} fds, cpu {cpu:.2} s; {:.1?}",
        scrape.samples.len(),
        scrape.types.len(),
        resident / 1048576.0,
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// The exposition parser itself
// ---------------------------------------------------------------------------

#[test]
fn exposition_parser_reads_labels_escapes_and_special_values() {
    let text = "# HELP a_total help text\n# TYPE a_total counter\n\
                a_total{x=\"1\",y=\"q\\\"uote\\\\ \\n\"} 3\n\
                b 4.5e1 1700000000000\n\
                c{} NaN\n\
                d{le=\"+Inf\",} +Inf\n";
    let s = Scrape::parse(text).expect("valid exposition");
    assert_eq!(s.types["a_total"], "counter");
    assert_eq!(
        s.exact("a_total", &[("x", "1"), ("y", "q\"uote\\ \n")]),
        Some(3.0)
    );
    assert_eq!(s.exact("b", &[]), Some(45.0));
    assert!(s.exact("c", &[]).expect("c").is_nan());
    assert_eq!(s.exact("d", &[("le", "+Inf")]), Some(f64::INFINITY));
    for bad in [
        "a{x=1} 2",
        "a{x=\"1} 2",
        "a 2 3 4",
        "1a 2",
        "a{x=\"1\",x=\"2\"} 1",
        "a",
        "a{x=\"1\"}2",
        "# TYPE a wrong",
    ] {
        assert!(Scrape::parse(bad).is_err(), "accepted {bad:?}");
    }
    let good = "# TYPE h histogram\nh_bucket{le=\"0.1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.3\nh_count 2\n";
    assert_eq!(
        Scrape::parse(good).expect("histogram").check_histogram("h"),
        Ok(1)
    );
    let decreasing = good.replace("h_bucket{le=\"0.1\"} 1", "h_bucket{le=\"0.1\"} 3");
    assert!(
        Scrape::parse(&decreasing)
            .expect("histogram")
            .check_histogram("h")
            .is_err()
    );
    let summary = good.replace("histogram", "summary");
    assert!(
        Scrape::parse(&summary)
            .expect("summary")
            .check_histogram("h")
            .is_err()
    );
}

// ---------------------------------------------------------------------------
// Sent frames by type
// ---------------------------------------------------------------------------

/// Every frame a client receives is counted once in
/// `croupier_ws_messages_sent_total` under its type — greetings included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_sent_is_counted_by_type() {
    let server = TestServer::start(&[]).await;
    let before = exposition::scrape(&server).await;
    let mut received: BTreeMap<String, f64> = BTreeMap::new();
    let mut note = |frame: &Value| {
        *received
            .entry(frame["type"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1.0
    };

    let mut v2 = server.ws().await;
    v2.send(json!({"type": "join", "key": "counted", "version": 0}))
        .await;
    note(&recv_type(&mut v2, "sync").await);
    let mut v1 = server.ws().await;
    v1.send(json!({"type": "join", "key": "counted"})).await;
    note(&recv_type(&mut v1, "sync").await);
    let mut seed = server.ws().await;
    seed.send(json!({"type": "getHistory", "key": "counted"}))
        .await;
    note(&recv_type(&mut seed, "historyUpdate").await);
    v2.send(json!({"type": "add", "number": 3})).await;
    note(&recv_type(&mut v2, "add").await);
    note(&recv_type(&mut v1, "sync").await);
    note(&recv_type(&mut seed, "numberSaved").await);
    v2.send(json!({"type": "ping"})).await;
    note(&recv_type(&mut v2, "pong").await);
    // A resume one version behind: the missed add, then "recovered".
    let (status, room) = server.get("/api/roulette/counted").await;
    assert_eq!(status, 200, "{room}");
    let mut resumer = server.ws().await;
    resumer
        .send(json!({"type": "join", "key": "counted", "version": 0, "epoch": room["epoch"]}))
        .await;
    resumer
        .send(json!({"type": "join", "key": "counted", "version": 1, "epoch": room["epoch"]}))
        .await;
    note(&recv_type(&mut resumer, "sync").await);
    note(&recv_type(&mut resumer, "recovered").await);

    let after = exposition::scrape(&server).await;
    let sent: BTreeMap<String, f64> = after
        .label_values("croupier_ws_messages_sent_total", "type")
        .into_iter()
        .map(|t| {
            let d = delta(
                &before,
                &after,
                "croupier_ws_messages_sent_total",
                &[("type", &t)],
            );
            (t, d)
        })
        .filter(|(_, d)| *d != 0.0)
        .collect();
    assert_eq!(
        sent, received,
        "croupier_ws_messages_sent_total increments (left) vs frames the clients received (right)"
    );
    for ws in [v2, v1, seed, resumer] {
        ws.close().await;
    }
}
