//! Starts the real `croupier` binary on a free loopback port with its own data
//! directory, and gives tests HTTP and WebSocket clients for it.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Picks a port the OS considers free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// A running server process.
pub struct TestServer {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    env: Vec<(String, String)>,
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
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut server = TestServer {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data_dir: data_dir.to_path_buf(),
            env,
            _temp: None,
            http: reqwest::Client::builder().no_proxy().build().expect("http client"),
        };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_croupier"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BIND", "127.0.0.1")
            .env("PORT", self.addr.port().to_string())
            .env("DATA_DIR", &self.data_dir)
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .current_dir(&self.data_dir)
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        self.child = Some(command.spawn().expect("start croupier"));
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("croupier exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "croupier did not become ready within 30 s");
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
        let pid = self.pid();
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops the process (SIGTERM, then SIGKILL) and starts it again on the same
    /// data directory and port.
    pub async fn restart(&mut self) {
        if self.terminate(Duration::from_secs(15)).await.is_none() {
            self.kill();
        }
        self.spawn().await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        decode(r).await
    }

    pub async fn get_with_token(&self, path: &str, token: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).bearer_auth(token).send().await.expect("GET");
        decode(r).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.post(self.url(path)).json(body).send().await.expect("POST");
        decode(r).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.http.put(self.url(path)).json(body).send().await.expect("PUT");
        decode(r).await
    }

    /// The room's history and version as `GET /api/roulette/{key}` reports them.
    pub async fn room(&self, key: &str) -> (Value, u64) {
        let (status, body) = self.get(&format!("/api/roulette/{}", encode(key))).await;
        assert_eq!(status, 200, "reading room {key}: {body}");
        (body["history"].clone(), body["version"].as_u64().expect("version"))
    }

    pub async fn token(&self, key: &str, password: &str) -> String {
        let (status, body) =
            self.post("/api/rooms/auth", &serde_json::json!({"key": key, "password": password})).await;
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
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON reply ({status}): {text:?}"));
    (status, value)
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
    pub async fn connect(url: &str) -> WsClient {
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket connect");
        WsClient { stream }
    }

    pub async fn send(&mut self, value: Value) {
        self.stream.send(Message::text(value.to_string())).await.expect("send");
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
                    return WsEvent::Json(serde_json::from_str(&text).expect("server sent non-JSON"));
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
            WsEvent::Closed(code) => panic!("connection closed ({code:?}) while waiting for a frame"),
        }
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(quiet, self.stream.next()).await {
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
