//! Starts the real `croupier` binary on a free loopback port with its own data
//! directory, and gives tests HTTP and WebSocket clients for it.
//!
//! The server binds port 0 and the harness reads the address it got from its
//! `serving` log line: a port probed free and bound later can be taken by
//! another socket in between.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Kept here for the tests that import it from this module.
pub use super::wait::eventually;

/// At least 32 bytes and no placeholder text: the server refuses weaker tokens.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef";

/// Per-client quotas high enough for functional and load tests, which all
/// come from one address (see the README's configuration table).
pub const LOAD_TEST_QUOTAS: &[(&str, &str)] = &[
    ("WRITE_RATE_LIMIT", "1000000"),
    ("WRITE_RATE_BURST", "1000000"),
    ("ROOM_CREATE_LIMIT", "1000000"),
    ("WS_MAX_PER_CLIENT", "20000"),
];

/// How many of a server's last output lines are kept for failure messages.
const LOG_TAIL: usize = 200;
/// How long a starting server may take to bind and then to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a restart keeps trying to bind the port it had before.
const REBIND_TIMEOUT: Duration = Duration::from_secs(15);

/// The last lines a server wrote (stdout and stderr), shared with the threads
/// that drain its pipes.
type LogTail = Arc<Mutex<VecDeque<String>>>;

/// A running server process.
pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
    /// Restart on the same port (e.g. behind Nginx, whose upstream names it)
    /// rather than on whatever port 0 gives.
    keep_port: bool,
    log: LogTail,
    _temp: Option<tempfile::TempDir>,
    pub http: reqwest::Client,
}

impl TestServer {
    /// Embedded mode in a fresh temporary data directory.
    pub async fn start(env: &[(&str, &str)]) -> TestServer {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut server = Self::start_in(&dir, env).await;
        server._temp = Some(temp);
        server
    }

    /// Embedded mode on an existing data directory (for restart tests).
    pub async fn start_in(data_dir: &Path, env: &[(&str, &str)]) -> TestServer {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut server = TestServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.to_path_buf(),
            env,
            keep_port: false,
            log: LogTail::default(),
            _temp: None,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
        };
        server.spawn().await;
        server
    }

    /// Makes later restarts bind the port this server has now instead of a new
    /// one, for servers that something else (Nginx) reaches by port.
    pub fn keep_port_on_restart(&mut self) {
        self.keep_port = true;
    }

    /// The address a listener bound, from the server's start-up log line
    /// `message` (e.g. `serving /metrics` for a `METRICS_BIND` on port 0).
    pub fn logged_address(&self, message: &str) -> Option<SocketAddr> {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter().find_map(|line| logged_address(line, message))
    }

    /// The last lines the server wrote, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Starts the process: on port 0 the first time (the kernel picks a free
    /// port while binding, so nothing can take it in between) and after a
    /// restart unless `keep_port`; then the port is fixed, and a bind that fails
    /// because the old sockets are still going away is retried.
    async fn spawn(&mut self) {
        let port = if self.keep_port { self.addr.port() } else { 0 };
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match self.spawn_on(port).await {
                Ok(addr) => {
                    self.addr = addr;
                    break;
                }
                Err(_)
                    if port != 0
                        && Instant::now() < deadline
                        && self.log_tail().contains("Address already in use") =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(reason) => panic!("{reason}\nits last output:\n{}", self.log_tail()),
            }
        }
        self.wait_ready().await;
    }

    /// Spawns the binary on `port` and returns the address it reports bound.
    async fn spawn_on(&mut self, port: u16) -> Result<SocketAddr, String> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_croupier"));
        let filter = std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "warn".into());
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("DATA_DIR", &self.data_dir)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            // Every test client shares the loopback address, and most tests
            // write far faster than a person at a table: they run with load-test
            // quotas. The tests of the quotas themselves set their own.
            .envs(LOAD_TEST_QUOTAS.iter().copied())
            .envs(super::process::run_marker())
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        // The bound address is read from the `serving` line, which is INFO:
        // JSON lines, and that one line let through whatever the filter is.
        let filter = self
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "RUST_LOG")
            .map_or(filter, |(_, v)| v.clone());
        command
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", format!("{filter},croupier::startup=info"));
        let mut child = command.spawn().expect("start croupier");
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        drain(stdout, self.log.clone(), Some(bound_tx));
        drain(stderr, self.log.clone(), None);
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(addr) = bound_rx.try_recv() {
                return Ok(addr);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // Let the drain threads take in the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(format!("croupier exited during start-up ({status})"));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("croupier did not bind within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                // Let the drain threads take in the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                panic!(
                    "croupier exited during start-up: {status}\nits last output:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "croupier did not become ready within {START_TIMEOUT:?}\nits last output:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        super::process::signal_process(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops the process (SIGTERM, then SIGKILL) and starts it again on the same
    /// data directory: on a new port, or on the same one after
    /// [`keep_port_on_restart`](Self::keep_port_on_restart).
    pub async fn restart(&mut self) {
        if self.terminate(Duration::from_secs(15)).await.is_none() {
            self.kill();
        }
        self.spawn().await;
    }

    /// SIGKILLs the server's process group (a crash, as far as anyone else can
    /// tell) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::process::signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None, None).await
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, Some(token), None)
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, None, Some(body))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, None, Some(body))
            .await
    }

    /// The room's history and version as `GET /api/roulette/{key}` reports them.
    pub async fn room(&self, key: &str) -> (Value, u64) {
        let (status, body) = self.get(&format!("/api/roulette/{}", encode(key))).await;
        assert_eq!(status, 200, "reading room {key}: {body}");
        (
            body["history"].clone(),
            body["version"].as_u64().expect("version"),
        )
    }

    /// Asserts the instance still serves: `/health` answers 200 and a room
    /// read answers, each within a few seconds.
    pub async fn assert_healthy(&self) {
        let limit = Duration::from_secs(5);
        let health = tokio::time::timeout(limit, self.get("/health"))
            .await
            .expect("/health did not answer within 5 s");
        assert_eq!(health.0, 200, "/health: {}", health.1);
        let read = tokio::time::timeout(limit, self.get("/api/roulette/health-probe"))
            .await
            .expect("a room read did not answer within 5 s");
        assert_eq!(read.0, 200, "room read: {}", read.1);
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    pub async fn token(&self, key: &str, password: &str) -> String {
        let (status, body) = self
            .post(
                "/api/rooms/auth",
                &serde_json::json!({"key": key, "password": password}),
            )
            .await;
        assert_eq!(status, 200, "auth failed: {body}");
        body["token"].as_str().expect("token").to_owned()
    }

    pub async fn ws(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `pipe` line by line until the server closes it, keeping the last
/// [`LOG_TAIL`] lines and echoing each to the test's output. The thread runs for
/// the server's whole life: a pipe nobody reads fills up and blocks the server's
/// next log write. With `bound`, the address of the first `serving` line is sent
/// there.
fn drain(
    pipe: impl Read + Send + 'static,
    log: LogTail,
    bound: Option<std::sync::mpsc::Sender<SocketAddr>>,
) {
    std::thread::spawn(move || {
        let mut bound = bound;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = bound.as_ref().and_then(|_| serving_address(&line)) {
                let _ = bound.take().map(|tx| tx.send(addr));
            }
            eprintln!("{line}");
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() == LOG_TAIL {
                log.pop_front();
            }
            log.push_back(line);
        }
    });
}

/// The `address` of a JSON `serving` log line.
fn serving_address(line: &str) -> Option<SocketAddr> {
    logged_address(line, "serving")
}

/// The `address` field of a JSON log line whose message is `message`.
fn logged_address(line: &str, message: &str) -> Option<SocketAddr> {
    let value: Value = serde_json::from_str(line).ok()?;
    let fields = &value["fields"];
    if fields["message"] != message {
        return None;
    }
    fields["address"].as_str()?.parse().ok()
}

/// Percent-encodes a key for a URL path.
pub fn encode(key: &str) -> String {
    url_escape(key)
}

fn url_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub async fn decode(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("non-JSON reply ({status}): {text:?}"));
    (status, value)
}

/// A process's resident memory (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("VmRSS in /proc status")
}

/// A WebSocket client speaking JSON text frames.
pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What `next` saw.
#[derive(Debug)]
pub enum WsEvent {
    Json(Value),
    Closed(Option<u16>),
}

impl WsClient {
    /// Connects from a chosen loopback source address (per-address limits).
    pub async fn connect_from(
        url: &str,
        source: std::net::IpAddr,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let target: SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("a ws://ip:port/ URL");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source, 0))
            .expect("bind the source address");
        let tcp = socket.connect(target).await.expect("TCP connect");
        let (stream, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(tcp)).await?;
        Ok(WsClient { stream })
    }

    pub async fn connect(url: &str) -> WsClient {
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connect");
        WsClient { stream }
    }

    pub async fn send(&mut self, value: Value) {
        self.stream
            .send(Message::text(value.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next JSON frame or close, skipping pings; panics after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> WsEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("timed out waiting for a WebSocket frame");
            match message {
                Some(Ok(Message::Text(text))) => {
                    return WsEvent::Json(
                        serde_json::from_str(&text).expect("server sent non-JSON"),
                    );
                }
                Some(Ok(Message::Close(frame))) => {
                    return WsEvent::Closed(frame.map(|f: CloseFrame| u16::from(f.code)));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return WsEvent::Closed(None),
            }
        }
    }

    /// The next JSON frame; panics on close or after 10 s.
    pub async fn recv(&mut self) -> Value {
        match self.next_within(Duration::from_secs(10)).await {
            WsEvent::Json(v) => v,
            WsEvent::Closed(code) => {
                panic!("connection closed ({code:?}) while waiting for a frame")
            }
        }
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(quiet, self.stream.next()).await
        {
            panic!("expected no frame, got {text}");
        }
    }

    /// Waits for the close code (None if the stream ended without one).
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.next_within(Duration::from_secs(15)).await {
                WsEvent::Closed(code) => return code,
                WsEvent::Json(_) => continue,
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

// ---------------------------------------------------------------------------
// Helpers for the conformance and bad-input suites.
// ---------------------------------------------------------------------------

/// An HTTP reply kept whole: status, headers and body text.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl RawReply {
    /// The body as JSON; panics (naming status and body) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("non-JSON reply ({}): {:?}", self.status, self.text))
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

/// Why a WebSocket handshake did not produce a connection.
#[derive(Debug)]
pub struct WsRefused {
    /// The HTTP status of the refusal (`None` for a transport error).
    pub status: Option<u16>,
    /// The refusal's body, if any.
    pub body: String,
}

impl TestServer {
    /// Sends any request built on `self.http` and keeps the whole reply.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> RawReply {
        let r = request.send().await.expect("HTTP request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        RawReply {
            status,
            headers,
            text,
        }
    }

    /// `method path` with an optional bearer token and JSON body; the reply must be JSON.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let mut request = self.http.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let reply = self.send(request).await;
        (reply.status, reply.json())
    }

    /// `GET` on the admin API with the harness's admin token.
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.get_with_token(path, ADMIN_TOKEN).await
    }

    /// `POST` on the admin API with the harness's admin token and no body.
    pub async fn admin_post(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(ADMIN_TOKEN), None)
            .await
    }

    /// A WebSocket handshake with extra request headers (e.g. `Origin`).
    pub async fn ws_with_headers(&self, headers: &[(&str, &str)]) -> Result<WsClient, WsRefused> {
        WsClient::connect_with_headers(&self.ws_url(), headers).await
    }

    /// The embedded-mode token secret (`<data_dir>/jwt_secret`).
    pub fn jwt_secret(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("jwt_secret"))
            .expect("reading jwt_secret")
            .trim()
            .to_owned()
    }
}

impl WsClient {
    /// Connects with extra handshake headers; a refused handshake is an `Err`.
    pub async fn connect_with_headers(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, WsRefused> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut request = url.into_client_request().expect("WebSocket URL");
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request
                .headers_mut()
                .insert(name, HeaderValue::from_str(value).expect("header value"));
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((stream, _)) => Ok(WsClient { stream }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(WsRefused {
                status: Some(response.status().as_u16()),
                body: response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            }),
            Err(other) => Err(WsRefused {
                status: None,
                body: other.to_string(),
            }),
        }
    }

    /// Connects or returns the refusal (no extra headers).
    pub async fn try_connect(url: &str) -> Result<WsClient, WsRefused> {
        Self::connect_with_headers(url, &[]).await
    }

    /// Sends a raw text frame (not necessarily JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.send_raw(Message::text(text.to_owned())).await;
    }

    /// Closes with a specific code (e.g. the frontend's 4000).
    pub async fn close_with(mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code: code.into(),
            reason: reason.to_owned().into(),
        };
        let _ = self.stream.close(Some(frame)).await;
    }
}

/// Compares a JSON value with a template. Objects must have exactly the template's
/// keys, arrays exactly its length; every other value must be equal, except these
/// placeholder strings, which match by shape:
/// `"<int>"` (integer), `"<uint>"` (non-negative integer), `"<number>"`,
/// `"<string>"` (non-empty string), `"<string|null>"`, `"<bool>"`,
/// `"<rfc3339>"` (an RFC 3339 timestamp string), `"<array>"`, `"<any>"`.
pub fn shape_mismatch(actual: &Value, template: &Value) -> Option<String> {
    fn walk(path: &str, actual: &Value, template: &Value) -> Option<String> {
        if let Value::String(t) = template
            && t.starts_with('<')
            && t.ends_with('>')
        {
            let ok = match t.as_str() {
                "<int>" => actual.is_i64() || actual.is_u64(),
                "<uint>" => actual.is_u64(),
                "<number>" => actual.is_number(),
                "<string>" => actual.as_str().is_some_and(|s| !s.is_empty()),
                "<string|null>" => {
                    actual.is_null() || actual.as_str().is_some_and(|s| !s.is_empty())
                }
                "<bool>" => actual.is_boolean(),
                "<rfc3339>" => actual
                    .as_str()
                    .is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
                "<array>" => actual.is_array(),
                "<any>" => true,
                other => return Some(format!("{path}: unknown placeholder {other}")),
            };
            return (!ok).then(|| format!("{path}: expected {t}, got {actual}"));
        }
        match (actual, template) {
            (Value::Object(a), Value::Object(t)) => {
                for key in t.keys() {
                    if !a.contains_key(key) {
                        return Some(format!("{path}: missing field {key:?}"));
                    }
                }
                for key in a.keys() {
                    if !t.contains_key(key) {
                        return Some(format!("{path}: unexpected field {key:?} = {}", a[key]));
                    }
                }
                t.iter()
                    .find_map(|(k, tv)| walk(&format!("{path}.{k}"), &a[k], tv))
            }
            (Value::Array(a), Value::Array(t)) => {
                if a.len() != t.len() {
                    return Some(format!(
                        "{path}: expected {} elements, got {}",
                        t.len(),
                        a.len()
                    ));
                }
                a.iter()
                    .zip(t)
                    .enumerate()
                    .find_map(|(i, (av, tv))| walk(&format!("{path}[{i}]"), av, tv))
            }
            _ if actual == template => None,
            _ => Some(format!("{path}: expected {template}, got {actual}")),
        }
    }
    walk("$", actual, template)
}

/// Panics unless `actual` matches `template` (see [`shape_mismatch`]).
#[track_caller]
pub fn assert_shape(actual: &Value, template: &Value, context: &str) {
    if let Some(problem) = shape_mismatch(actual, template) {
        panic!("{context}: {problem}\n  actual:   {actual}\n  template: {template}");
    }
}

/// Additions for drain and restart tests: signal without waiting, watch the
/// exit, start the same server again.
impl TestServer {
    /// Sends SIGTERM and returns at once, so the caller can watch the drain.
    pub fn signal_term(&self) {
        super::process::signal_process(self.pid(), libc::SIGTERM);
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the process again on the same data directory (and port, after
    /// [`keep_port_on_restart`](Self::keep_port_on_restart)) after it stopped (`terminate` / `wait_exit`); stops it first if it still runs.
    pub async fn start_again(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// A fresh HTTP client, so a request never reuses a pooled connection.
    pub fn fresh_http() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client")
    }
}

impl WsClient {
    /// Connects with a small socket receive buffer, so a client that stops
    /// reading pushes back on the server after little data.
    pub async fn connect_with_recv_buffer(addr: SocketAddr, bytes: u32) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let tcp = socket.connect(addr).await.expect("TCP connect");
        let (stream, _) =
            tokio_tungstenite::client_async(format!("ws://{addr}/ws"), MaybeTlsStream::Plain(tcp))
                .await
                .expect("WebSocket handshake");
        WsClient { stream }
    }

    /// The underlying stream, for tests that read and write concurrently.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.stream
    }
}

/// Handles for servers a test reaches but did not start (Nginx in front of a
/// cluster), and TLS clients for Nginx's HTTPS port.
impl TestServer {
    /// A handle on a server at `addr` that this test does not own, e.g. Nginx in
    /// front of a cluster: the same HTTP and WebSocket helpers, but no process —
    /// `kill` does nothing, and `restart`/`pid`/`jwt_secret` must not be used.
    pub fn remote(addr: SocketAddr) -> TestServer {
        TestServer {
            child: None,
            addr,
            data_dir: PathBuf::new(),
            env: Vec::new(),
            keep_port: false,
            log: LogTail::default(),
            _temp: None,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
        }
    }
}

/// A rustls client configuration that accepts exactly the server certificate in
/// `pem` (pinned) and nothing else, with the ring provider chosen explicitly so
/// that the result does not depend on which rustls features other crates enable.
///
/// Pinning rather than a root store: the test certificates are self-signed with
/// `CA:TRUE`, which webpki refuses as a server's own certificate
/// (`CaUsedAsEndEntity`) even when it is a trusted root. The handshake
/// signature is still verified against the pinned certificate's key.
pub fn tls_pinned(pem: &[u8]) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pinned = CertificateDer::from_pem_slice(pem)
        .expect("PEM certificate")
        .into_owned();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCertificate {
        pinned,
        provider: provider.clone(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(verifier))
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Accepts the one pinned certificate; see [`tls_pinned`].
#[derive(Debug)]
struct PinnedCertificate {
    pinned: rustls::pki_types::CertificateDer<'static>,
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl WsClient {
    /// Connects to a `wss://` URL accepting only the server certificate in `pem`;
    /// a failed handshake (e.g. another certificate) is an `Err`.
    pub async fn connect_tls(url: &str, pem: &[u8]) -> Result<WsClient, String> {
        let connector = tokio_tungstenite::Connector::Rustls(tls_pinned(pem));
        tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
            .await
            .map(|(stream, _)| WsClient { stream })
            .map_err(|e| e.to_string())
    }
}

/// Runs `croupier migrate` (with `contract`: `--contract` too) against
/// `database_url`, as an operator would before starting instances.
pub fn migrate(database_url: &str, contract: bool) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_croupier"));
    command.arg("migrate");
    if contract {
        command.arg("--contract");
    }
    let status = command
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running croupier migrate");
    assert!(
        status.success(),
        "croupier migrate failed on {database_url}"
    );
}
