//! The log lines an operator reads: the start-up line says where the data
//! lives, a refused request names its error, latencies are rounded, and every
//! WebSocket that closes leaves one line saying who closed it, why, and what
//! it did. Read from the real binary's JSON log output.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The next JSON log line whose message is `message`, within a few seconds.
fn line(lines: &mpsc::Receiver<Value>, message: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let entry = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line {message:?} within 10 s"));
        if entry["fields"]["message"] == message {
            return entry;
        }
    }
}

#[tokio::test]
async fn an_operator_can_read_the_logs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_croupier"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BIND", "127.0.0.1")
        .env("PORT", "0")
        .env("DATA_DIR", dir.path())
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start croupier");
    let stdout = child.stdout.take().expect("stdout");
    let _child = KillOnDrop(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for text in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(entry) = serde_json::from_str::<Value>(&text)
                && tx.send(entry).is_err()
            {
                break;
            }
        }
    });

    let serving = line(&lines, "serving");
    let fields = &serving["fields"];
    let database = fields["database"].as_str().expect("database field");
    assert!(
        database.ends_with("croupier.db") && database.starts_with(dir.path().to_str().unwrap()),
        "{serving}"
    );
    assert_eq!(fields["redis"], "none");
    let address = fields["address"].as_str().expect("address").to_owned();

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let refused = http
        .post(format!("http://{address}/api/roulette/save"))
        .json(&json!({"key": "log-room", "number": 99}))
        .send()
        .await
        .expect("request");
    assert_eq!(refused.status().as_u16(), 400);
    let request = line(&lines, "request");
    assert_eq!(request["fields"]["status"], 400, "{request}");
    assert_eq!(request["fields"]["error"], "bad_request", "{request}");
    let latency = request["fields"]["latency_ms"]
        .as_str()
        .expect("latency as text");
    let decimals = latency.split('.').nth(1).map_or(0, str::len);
    assert_eq!(decimals, 3, "latency_ms {latency}");

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws"))
        .await
        .expect("WebSocket");
    ws.send(Message::text(
        json!({"type": "join", "key": "log-room", "version": 0}).to_string(),
    ))
    .await
    .unwrap();
    let sync = ws.next().await.expect("sync").expect("frame");
    assert!(sync.to_text().unwrap().contains("\"sync\""));
    ws.close(None).await.unwrap();
    let closed = line(&lines, "websocket closed");
    let fields = &closed["fields"];
    assert_eq!(fields["closed_by"], "client", "{closed}");
    assert_eq!(fields["rooms"], "log-room", "{closed}");
    assert_eq!(fields["messages_in"], 1, "{closed}");
    assert_eq!(fields["frames_out"], 1, "{closed}");
    assert!(
        fields["code"].is_number() && fields["reason"].is_string(),
        "{closed}"
    );
    assert!(fields["duration_s"].is_string(), "{closed}");
    let conn = closed["span"]["conn"]
        .as_str()
        .or(closed["spans"][0]["conn"].as_str());
    assert!(
        conn.is_some_and(|c| c.ends_with("-1")),
        "connection id: {closed}"
    );
}

/// Stops the server however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
