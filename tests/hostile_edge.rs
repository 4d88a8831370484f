//! Hostile clients at the edge: spoofed client addresses, password-hashing
//! floods, example secrets, unreadable-to-others data files, invisible room
//! keys, metrics exposure and log levels. Every attack runs for real against
//! the real binary (and the repository's Nginx where it matters), bounded in
//! count; each test then checks the refusal, that the store is unchanged, and
//! that the instance still answers promptly.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::app::{TestServer, decode, encode};
use support::nginx::TestNginx;

const AUTH: &str = "/api/rooms/auth";

/// Resident memory of a process, in KiB, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// POSTs `{"key","password"}` to `url`, with extra headers; status, body,
/// `Retry-After`, and how long the answer took.
async fn attempt(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    password: &str,
    headers: &[(&str, String)],
) -> (u16, Value, Option<String>, Duration) {
    let mut request = http
        .post(url)
        .json(&json!({"key": key, "password": password}));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let started = Instant::now();
    let response = request.send().await.expect("auth request");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, body) = decode(response).await;
    (status, body, retry_after, started.elapsed())
}

/// What the store holds, as clients can see it: the room (read with a token)
/// and the number of rooms.
async fn snapshot(s: &TestServer, key: &str, token: &str) -> (Value, Value) {
    let (status, room) = s
        .get_with_token(&format!("/api/roulette/{}", encode(key)), token)
        .await;
    assert_eq!(status, 200, "reading {key}: {room}");
    let (status, list) = s.get("/api/roulette/sessions").await;
    assert_eq!(status, 200, "listing rooms: {list}");
    (room, list["total"].clone())
}

/// The instance answers `/health` and a normal read within a generous bound.
async fn still_healthy(s: &TestServer, key: &str, token: &str) {
    let started = Instant::now();
    let (status, body) = s.get("/health").await;
    assert_eq!(status, 200, "health after the attack: {body}");
    let path = format!("/api/roulette/{}", encode(key));
    let (status, body) = s.get_with_token(&path, token).await;
    assert_eq!(status, 200, "read after the attack: {body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "health and a read took {:?} after the attack",
        started.elapsed()
    );
}

/// A protected room with two numbers; returns its token.
async fn protected_room(s: &TestServer, key: &str, password: &str) -> String {
    let token = s.token(key, password).await;
    for number in [7, 21] {
        let reply = s
            .http
            .post(s.url("/api/roulette/save"))
            .bearer_auth(&token)
            .json(&json!({"key": key, "number": number}))
            .send()
            .await
            .expect("save");
        assert_eq!(reply.status(), 200);
    }
    token
}

#[tokio::test]
async fn spoofed_forwarded_for_through_nginx_is_still_limited() {
    const LIMIT: usize = 5;
    let s = TestServer::start(&[("TRUST_PROXY", "true"), ("AUTH_RATE_LIMIT", "5")]).await;
    let nginx = TestNginx::start(&[s.addr]).await;
    let token = protected_room(&s, "vault", "s3cret").await;
    let before = snapshot(&s, "vault", &token).await;

    // Each guess claims another address; Nginx must not pass the claim on.
    let url = nginx.http_url(AUTH);
    let (mut wrong, mut limited) = (0, 0);
    for n in 0..40u32 {
        let spoofed = vec![("X-Forwarded-For", format!("198.51.100.{n}, 203.0.113.{n}"))];
        let (status, body, _, _) = attempt(&s.http, &url, "vault", "guess", &spoofed).await;
        match status {
            401 => wrong += 1,
            429 => limited += 1,
            _ => panic!("guess {n}: unexpected {status} {body}"),
        }
    }
    // Creating the room took one attempt of the same client (127.0.0.1); one
    // more may have been earned back while the guesses ran.
    assert!(
        wrong <= LIMIT,
        "{wrong} guesses were checked, limit {LIMIT}"
    );
    assert!(
        limited >= 40 - LIMIT,
        "only {limited} of 40 guesses limited"
    );
    assert_eq!(snapshot(&s, "vault", &token).await, before);
    still_healthy(&s, "vault", &token).await;
}

#[tokio::test]
async fn forwarding_headers_from_untrusted_peers_are_ignored() {
    // The test client (127.0.0.1) is not a trusted proxy here.
    let s = TestServer::start(&[
        ("TRUST_PROXY", "true"),
        ("TRUSTED_PROXIES", "10.0.0.0/8"),
        ("AUTH_RATE_LIMIT", "3"),
    ])
    .await;
    let token = protected_room(&s, "vault", "s3cret").await;
    let before = snapshot(&s, "vault", &token).await;
    let url = s.url(AUTH);
    let mut limited = 0;
    for n in 0..20u32 {
        let spoofed = vec![
            ("X-Forwarded-For", format!("198.51.100.{n}")),
            ("X-Real-IP", format!("198.51.100.{n}")),
        ];
        let (status, body, _, _) = attempt(&s.http, &url, "vault", "guess", &spoofed).await;
        assert!(status == 401 || status == 429, "{status} {body}");
        limited += usize::from(status == 429);
    }
    assert!(
        limited >= 20 - 3,
        "only {limited} of 20 spoofed guesses limited"
    );
    assert_eq!(snapshot(&s, "vault", &token).await, before);
    still_healthy(&s, "vault", &token).await;
}

#[tokio::test]
async fn a_burst_beyond_the_auth_queue_is_refused_at_once() {
    let s = TestServer::start(&[
        ("TRUST_PROXY", "true"),
        ("AUTH_RATE_LIMIT", "1000"),
        ("AUTH_QUEUE", "4"),
    ])
    .await;
    let nginx = TestNginx::start(&[s.addr]).await;
    let token = protected_room(&s, "vault", "s3cret").await;
    let before = snapshot(&s, "vault", &token).await;

    let url = nginx.http_url(AUTH);
    let replies: Vec<_> = futures_util::future::join_all((0..40).map(|n| {
        let password = if n % 2 == 0 { "s3cret" } else { "guess" };
        let (http, url) = (s.http.clone(), url.clone());
        async move {
            let reply = attempt(&http, &url, "vault", password, &[]).await;
            (password, reply)
        }
    }))
    .await;

    let mut refusals = Vec::new();
    for (password, (status, body, retry_after, took)) in &replies {
        match (*password, *status) {
            ("s3cret", 200) => assert_eq!(body["protected"], true, "{body}"),
            ("guess", 401) => {}
            (_, 503) => {
                assert_eq!(retry_after.as_deref(), Some("1"), "503 without Retry-After");
                assert_eq!(body["success"], false, "{body}");
                refusals.push(*took);
            }
            _ => panic!("{password:?}: unexpected {status} {body}"),
        }
    }
    // Two threads hash and four checks may wait: of 40 at once, most must be
    // turned away, and without waiting for the hashing.
    let slowest = refusals.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} of 40 refused; slowest refusal {slowest:?}",
        refusals.len()
    );
    assert!(refusals.len() >= 20, "only {} refusals", refusals.len());
    assert!(
        slowest < Duration::from_secs(2),
        "a refusal took {slowest:?}"
    );
    assert_eq!(snapshot(&s, "vault", &token).await, before);
    still_healthy(&s, "vault", &token).await;
}

#[tokio::test]
async fn a_password_burst_leaves_memory_bounded() {
    let s = TestServer::start(&[("AUTH_RATE_LIMIT", "1000")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(s.pid());
    let token = protected_room(&s, "vault", "s3cret").await;
    let before = snapshot(&s, "vault", &token).await;

    let url = s.url(AUTH);
    let started = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..120)
        .map(|n| {
            let password = if n % 3 == 0 { "guess" } else { "s3cret" };
            let (http, url) = (s.http.clone(), url.clone());
            async move { (password, attempt(&http, &url, "vault", password, &[]).await) }
        })
        .buffer_unordered(24)
        .collect()
        .await;
    let took = started.elapsed();
    for (password, (status, body, _, _)) in &results {
        let expected = if *password == "s3cret" { 200 } else { 401 };
        assert_eq!(*status, expected, "{password:?}: {body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(s.pid());
    eprintln!(
        "RSS idle {} KiB, after 120 checks (24 at a time, {took:?}) {} KiB (+{} KiB)",
        idle,
        after,
        after.saturating_sub(idle)
    );
    assert!(
        after <= idle + 64 * 1024,
        "RSS grew from {idle} KiB to {after} KiB"
    );
    assert_eq!(snapshot(&s, "vault", &token).await, before);
    still_healthy(&s, "vault", &token).await;
}

/// Runs the binary with `env` in an empty directory; its exit status and
/// standard error, or a panic if it is still running after 20 s.
fn run_to_exit(env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_croupier"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", dir.path())
        .envs(env.iter().copied())
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start croupier");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("croupier kept running with {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("reading stderr");
    }
    (status, stderr)
}

/// `NAME: value` / `NAME=value` lines of the shipped example files.
fn shipped_values(name: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut values = Vec::new();
    for file in [".env.example", "k8s/secret.example.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).expect("reading example");
        for line in text.lines().map(str::trim) {
            let value = line
                .strip_prefix(&format!("{name}="))
                .or_else(|| line.strip_prefix(&format!("{name}:")));
            if let Some(value) = value.map(|v| v.trim().trim_matches('"')) {
                values.push(value.to_owned());
            }
        }
    }
    values
}

#[test]
fn example_and_weak_secrets_stop_start_up() {
    let strong = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    for name in ["JWT_SECRET", "ADMIN_TOKEN"] {
        let mut bad = shipped_values(name);
        assert!(!bad.is_empty(), "no {name} in the example files");
        bad.push("short-but-random-1234".into());
        for value in bad {
            let (status, stderr) = run_to_exit(&[(name, &value)]);
            assert!(!status.success(), "{name}={value:?} was accepted");
            let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{name}={value:?}: {stderr}");
            assert!(lines[0].contains(name), "{name}={value:?}: {stderr}");
        }
    }
    // A strong value gets past configuration (this one then fails on the port
    // being taken, which proves it got as far as binding).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let (status, stderr) = run_to_exit(&[("JWT_SECRET", strong), ("PORT", &port)]);
    assert!(!status.success());
    assert!(stderr.contains("binding"), "{stderr}");
}

#[test]
fn rust_log_debug_prints_debug_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_croupier"))
        .env_clear()
        .env("BIND", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", dir.path())
        .env("RUST_LOG", "debug")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start croupier");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match seen.recv_timeout(left) {
            Ok(line) if line.contains(" DEBUG ") => {
                found = Some(line);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        found.is_some(),
        "no DEBUG line within 30 s with RUST_LOG=debug"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn the_data_directory_and_database_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;

    let temp = tempfile::tempdir().expect("temp dir");
    let data = temp.path().join("nested/data");
    let data_str = data.to_str().expect("utf-8 path").to_owned();
    let mut s = TestServer::start_in(temp.path(), &[("DATA_DIR", &data_str)]).await;
    let token = protected_room(&s, "vault", "s3cret").await;
    let db = data.join("croupier.db");
    assert_eq!(mode(&data), 0o700, "data directory");
    assert_eq!(mode(&temp.path().join("nested")), 0o700, "created parent");
    assert_eq!(mode(&db), 0o600, "database");
    assert_eq!(mode(&data.join("jwt_secret")), 0o600, "token secret");
    let wal = data.join("croupier.db-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600, "write-ahead log");
    }

    // A database left readable by an older version is tightened at start.
    s.kill();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    s.start_again().await;
    assert_eq!(mode(&db), 0o600, "existing database after restart");
    let (room, _) = snapshot(&s, "vault", &token).await;
    assert_eq!(room["history"], json!([7, 21]), "data survived");
    still_healthy(&s, "vault", &token).await;
}

#[tokio::test]
async fn invisible_and_reordering_keys_are_refused() {
    let s = TestServer::start(&[]).await;
    let token = s.token("visible", "").await;
    let cases = [
        ("zero-width space", "\u{200B}"),
        ("word joiner", "\u{2060}\u{2060}"),
        ("byte order mark", "\u{FEFF}"),
        ("soft hyphen", "\u{00AD}"),
        ("right-to-left override", "abc\u{202E}fdp.exe"),
        ("first-strong isolate", "room\u{2068}1\u{2069}"),
    ];
    for (what, key) in cases {
        let save = json!({"key": key, "number": 1});
        let (status, body) = s.post("/api/roulette/save", &save).await;
        assert_eq!(status, 400, "{what} via save: {body}");
        let path = format!("/api/roulette/{}", encode(key));
        let (status, body) = s.put(&path, &json!({"history": [1]})).await;
        assert_eq!(status, 400, "{what} via PUT: {body}");
        let (status, body) = s.post(AUTH, &json!({"key": key, "password": "x"})).await;
        assert_eq!(status, 400, "{what} via auth: {body}");
    }
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": "\u{202E}x"})).await;
    let reply = ws.recv().await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "invalid_key", "{reply}");

    let (_, list) = s.get("/api/roulette/sessions").await;
    assert_eq!(list["total"], 1, "only the visible room exists: {list}");
    still_healthy(&s, "visible", &token).await;
}

#[tokio::test]
async fn metrics_bind_moves_metrics_off_the_public_port() {
    let s = TestServer::start(&[("METRICS_BIND", "127.0.0.1:0")]).await;
    let bind = s
        .logged_address("serving /metrics")
        .expect("the metrics listener logs its address");
    let (status, _) = s.get("/metrics").await;
    assert_eq!(status, 404, "/metrics on the main port");
    let reply = s
        .http
        .get(format!("http://{bind}/metrics"))
        .send()
        .await
        .expect("metrics listener");
    assert_eq!(reply.status(), 200);
    let text = reply.text().await.expect("metrics text");
    assert!(text.contains("croupier_http_requests_total"), "{text:.200}");
    let other = s.http.get(format!("http://{bind}/health")).send().await;
    assert_eq!(other.expect("metrics listener").status(), 404);

    // Without METRICS_BIND it stays where Prometheus has always found it, and
    // the public Nginx never routes it.
    let plain = TestServer::start(&[]).await;
    let nginx = TestNginx::start(&[plain.addr]).await;
    let direct = plain.http.get(plain.url("/metrics")).send().await;
    assert_eq!(direct.expect("instance").status(), 200);
    let proxied = plain.http.get(nginx.http_url("/metrics")).send().await;
    assert_eq!(proxied.expect("nginx").status(), 404);
}
