//! The wire contract (`PROTOCOL.md`) as tables, shared by the suites that check
//! it: templates of the replies, HTTP rows run in order, and the dialect table,
//! where each row is one mutation sent by a client of one backend generation
//! (or over HTTP) and the frame a member of each generation must then receive.
//! `tests/conformance.rs` runs the tables against one embedded instance,
//! `tests/cluster_contract.rs` through Nginx in front of a cluster.
//!
//! Replies are compared as whole JSON values; volatile fields are compared by
//! shape through the placeholders of [`assert_shape`].

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use super::app::{TestServer, WsClient, assert_shape, encode};

/// How long a member must stay silent after the last frame it was owed.
pub const QUIET: Duration = Duration::from_millis(300);

/// The Session object: all eight fields, never a password or hash.
pub fn session(key: &str, history: Value, version: u64, protected: bool) -> Value {
    json!({
        "id": "<int>", "key": key, "history": history,
        "created_at": "<rfc3339>", "updated_at": "<rfc3339>",
        "version": version, "epoch": "<string>", "protected": protected,
    })
}

/// `{"success": true, "data": Session}`.
pub fn saved(key: &str, history: Value, version: u64, protected: bool) -> Value {
    json!({"success": true, "data": session(key, history, version, protected)})
}

/// The one error body of the HTTP API.
pub fn error_body() -> Value {
    json!({"success": false, "error": "<string>"})
}

/// `GET /api/roulette/{key}` of an existing room.
pub fn room_reply(key: &str, history: Value, version: u64) -> Value {
    json!({"key": key, "history": history, "version": version, "epoch": "<string>"})
}

/// `GET /api/roulette/{key}` of a room that was never created.
pub fn unknown_room(key: &str) -> Value {
    json!({"key": key, "history": [], "version": 0})
}

/// `/api/roulette/{key}`, the key percent-encoded.
pub fn room_path(key: &str) -> String {
    format!("/api/roulette/{}", encode(key))
}

/// Receives one frame and compares it with `template`.
pub async fn expect_frame(ws: &mut WsClient, template: &Value, context: &str) -> Value {
    let frame = ws.recv().await;
    assert_shape(&frame, template, context);
    frame
}

/// One HTTP exchange of a table: request, status and whole reply.
pub struct HttpRow {
    pub what: &'static str,
    pub method: Method,
    pub path: String,
    pub token: Option<String>,
    pub body: Option<Value>,
    pub status: u16,
    pub reply: Value,
}

/// A row without a token; see [`HttpRow::with_token`].
pub fn row(
    what: &'static str,
    method: Method,
    path: &str,
    body: Option<Value>,
    status: u16,
    reply: Value,
) -> HttpRow {
    HttpRow {
        what,
        method,
        path: path.to_owned(),
        token: None,
        body,
        status,
        reply,
    }
}

impl HttpRow {
    /// The same request with a bearer token.
    pub fn with_token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }
}

/// Runs the rows in order on one server; returns every reply.
pub async fn run_rows(s: &TestServer, rows: Vec<HttpRow>) -> Vec<Value> {
    let mut replies = Vec::new();
    for r in rows {
        let (status, body) = s
            .call(
                r.method.clone(),
                &r.path,
                r.token.as_deref(),
                r.body.as_ref(),
            )
            .await;
        let context = format!("{} ({} {} {:?})", r.what, r.method, r.path, r.body);
        assert_eq!(status, r.status, "{context}: status; body {body}");
        assert_shape(&body, &r.reply, &context);
        replies.push(body);
    }
    replies
}

/// Who sends a dialect row's mutation.
#[derive(Debug, Clone, Copy)]
pub enum Sender {
    /// The v2 member (`join` with a version).
    V2,
    /// The v1 member (`join` without one).
    V1,
    /// The seed subscriber (`getHistory`).
    Seed,
    /// `POST /api/roulette/save` with the row's message as body.
    HttpSave,
    /// `PUT /api/roulette/{key}` with the row's message as body.
    HttpPut,
}

/// One row of the dialect table: who sends which message, then what the v2,
/// the v1 and the seed member each receive.
pub type DialectRow = (Sender, Value, Value, Value, Value);

/// One member of a room in each dialect, all joined to the same room.
pub struct Dialects {
    key: String,
    pub v2: WsClient,
    pub v1: WsClient,
    pub seed: WsClient,
}

impl Dialects {
    /// Joins the empty room `key` at `s` once in each dialect; the room exists
    /// at version 1 with `epoch`, which the v2 greeting must name.
    pub async fn join(s: &TestServer, key: &str, epoch: &Value) -> Dialects {
        let mut v2 = s.ws().await;
        v2.send(json!({"type": "join", "key": key, "version": 0}))
            .await;
        expect_frame(
            &mut v2,
            &json!({"type": "sync", "key": key, "history": [], "full": true, "version": 1, "epoch": epoch}),
            "v2 join",
        )
        .await;
        let mut v1 = s.ws().await;
        v1.send(json!({"type": "join", "key": key})).await;
        expect_frame(
            &mut v1,
            &json!({"type": "sync", "key": key, "history": []}),
            "v1 join",
        )
        .await;
        let mut seed = s.ws().await;
        seed.send(json!({"type": "getHistory", "key": key})).await;
        expect_frame(
            &mut seed,
            &json!({"type": "historyUpdate", "key": key, "history": []}),
            "seed getHistory",
        )
        .await;
        Dialects {
            key: key.to_owned(),
            v2,
            v1,
            seed,
        }
    }

    /// Runs the table in order: each row's message from its sender (HTTP to
    /// `s`), then the frame each member must receive; at the end every member
    /// must stay silent for [`QUIET`].
    pub async fn run(&mut self, s: &TestServer, table: Vec<DialectRow>) {
        for (step, (sender, message, want_v2, want_v1, want_seed)) in table.into_iter().enumerate()
        {
            let context = |who: &str| format!("step {step} ({sender:?} sends {message}): {who}");
            match sender {
                Sender::V2 => self.v2.send(message.clone()).await,
                Sender::V1 => self.v1.send(message.clone()).await,
                Sender::Seed => self.seed.send(message.clone()).await,
                Sender::HttpSave => {
                    let (status, body) = s.post("/api/roulette/save", &message).await;
                    assert_eq!(status, 200, "{}: {body}", context("http"));
                }
                Sender::HttpPut => {
                    let (status, body) = s.put(&room_path(&self.key), &message).await;
                    assert_eq!(status, 200, "{}: {body}", context("http"));
                }
            }
            expect_frame(&mut self.v2, &want_v2, &context("v2 member")).await;
            expect_frame(&mut self.v1, &want_v1, &context("v1 member")).await;
            expect_frame(&mut self.seed, &want_seed, &context("seed member")).await;
        }
        for ws in [&mut self.v2, &mut self.v1, &mut self.seed] {
            ws.expect_silence(QUIET).await;
        }
    }
}
