//! The bad-input table: every row sends something a client must not send (or
//! may not be allowed to send) and asserts the exact HTTP status or WebSocket
//! error code, a JSON error body, and that the room's history and version are
//! unchanged afterwards. No row may produce a 500 or a non-JSON body (the
//! harness's `decode` and [`RawReply::json`] panic on non-JSON).
//!
//! Each test starts its own real `croupier` process in embedded (SQLite) mode.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::app::{ADMIN_TOKEN, RawReply, TestServer, WsClient, assert_shape, encode, eventually};
use tokio_tungstenite::tungstenite::Message;

/// The number examples PROTOCOL.md says must be rejected.
fn rejected_numbers() -> Vec<Value> {
    vec![
        json!(37),
        json!(-1),
        json!(1.5),
        json!("15"),
        json!("0"),
        json!(null),
        json!(true),
        json!([]),
    ]
}

/// The key examples PROTOCOL.md says must be rejected, plus the reserved route names.
fn rejected_keys() -> Vec<String> {
    vec![
        String::new(),
        "a/b".into(),
        " x".into(),
        "k".repeat(101),
        "я".repeat(101),
        "sessions".into(),
        "save".into(),
    ]
}

fn error_body() -> Value {
    json!({"success": false, "error": "<string>"})
}

fn ws_error(code: &str) -> Value {
    json!({"type": "error", "error": "<string>", "code": code})
}

/// The room every table row must leave alone.
const ROOM: &str = "r";

/// Creates [`ROOM`] with history `[1, 2, 3]` at version 1.
async fn baseline(s: &TestServer) {
    let (status, body) = s
        .put("/api/roulette/r", &json!({"history": [1, 2, 3]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_unchanged(s, "baseline").await;
}

#[track_caller]
fn check_error_reply(reply: &RawReply, status: u16, what: &str) {
    assert_eq!(
        reply.status, status,
        "{what}: status; body {:?}",
        reply.text
    );
    assert_shape(&reply.json(), &error_body(), what);
}

async fn assert_unchanged(s: &TestServer, what: &str) {
    assert_eq!(
        s.room(ROOM).await,
        (json!([1, 2, 3]), 1),
        "room changed after: {what}"
    );
}

/// The room count, to show no bad request created a room.
async fn total_rooms(s: &TestServer) -> u64 {
    let (status, body) = s.get("/api/roulette/sessions").await;
    assert_eq!(status, 200, "{body}");
    body["total"].as_u64().expect("total")
}

/// One HTTP request with a raw body and content type.
struct Raw {
    what: String,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
}

fn raw(
    what: impl Into<String>,
    method: Method,
    path: &str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
) -> Raw {
    Raw {
        what: what.into(),
        method,
        path: path.to_owned(),
        content_type,
        body: body.into(),
        status,
    }
}

fn json_row(what: impl Into<String>, method: Method, path: &str, body: Value, status: u16) -> Raw {
    raw(
        what,
        method,
        path,
        Some("application/json"),
        body.to_string(),
        status,
    )
}

async fn run_raw(s: &TestServer, rows: Vec<Raw>) {
    for r in rows {
        let mut request = s
            .http
            .request(r.method.clone(), s.url(&r.path))
            .body(r.body.clone());
        if let Some(ct) = r.content_type {
            request = request.header("Content-Type", ct);
        }
        let reply = s.send(request).await;
        let what = format!("{} ({} {})", r.what, r.method, r.path);
        check_error_reply(&reply, r.status, &what);
        assert_unchanged(s, &what).await;
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_bodies_and_fields() {
    // A generous auth limit: this table is about bodies, not about the limiter.
    let s = TestServer::start(&[("AUTH_RATE_LIMIT", "1000")]).await;
    baseline(&s).await;
    let save = "/api/roulette/save";
    let put = "/api/roulette/r";
    let auth = "/api/rooms/auth";
    let over_limit = format!(
        r#"{{"key":"r","number":1,"pad":"{}"}}"#,
        "x".repeat(1024 * 1024)
    );
    let over_limit_put = format!(r#"{{"history":[1],"pad":"{}"}}"#, "x".repeat(1024 * 1024));
    let json_ct = Some("application/json");
    #[rustfmt::skip]
    let mut rows = vec![
        raw("invalid JSON", Method::POST, save, json_ct, r#"{"key":"r","number":"#, 400),
        raw("not JSON at all", Method::POST, save, json_ct, "number=1", 400),
        raw("empty body", Method::POST, save, json_ct, "", 400),
        raw("invalid JSON on PUT", Method::PUT, put, json_ct, r#"{"history":[1,2"#, 400),
        raw("invalid JSON on auth", Method::POST, auth, json_ct, "{", 400),
        raw("wrong content type", Method::POST, save, Some("text/plain"), r#"{"key":"r","number":1}"#, 415),
        raw("no content type", Method::POST, save, None, r#"{"key":"r","number":1}"#, 415),
        raw("form content type", Method::POST, save, Some("application/x-www-form-urlencoded"), "key=r&number=1", 415),
        raw("wrong content type on PUT", Method::PUT, put, Some("text/plain"), r#"{"history":[]}"#, 415),
        raw("wrong content type on auth", Method::POST, auth, Some("text/plain"), r#"{"key":"r","password":""}"#, 415),
        raw("body over 1 MiB", Method::POST, save, json_ct, over_limit, 413),
        raw("body over 1 MiB on PUT", Method::PUT, put, json_ct, over_limit_put, 413),
        json_row("body is an array", Method::POST, save, json!([{"key": "r", "number": 1}]), 400),
        json_row("body is a string", Method::POST, save, json!("r"), 400),
        json_row("body is null", Method::PUT, put, json!(null), 400),
        json_row("key is a number", Method::POST, save, json!({"key": 5, "number": 1}), 400),
        json_row("key is null", Method::POST, save, json!({"key": null, "number": 1}), 400),
        json_row("key is an array", Method::POST, save, json!({"key": ["r"], "number": 1}), 400),
        json_row("key missing", Method::POST, save, json!({"number": 1}), 400),
        json_row("number missing", Method::POST, save, json!({"key": "r"}), 400),
        json_row("number is an object", Method::POST, save, json!({"key": "r", "number": {"n": 1}}), 400),
        json_row("id is a number", Method::POST, save, json!({"key": "r", "number": 1, "id": 5}), 400),
        json_row("id is empty", Method::POST, save, json!({"key": "r", "number": 1, "id": ""}), 400),
        json_row("id over 64 characters", Method::POST, save, json!({"key": "r", "number": 1, "id": "i".repeat(65)}), 400),
        json_row("history is a string", Method::PUT, put, json!({"history": "1,2,3"}), 400),
        json_row("history is an object", Method::PUT, put, json!({"history": {"0": 1}}), 400),
        json_row("history is null", Method::PUT, put, json!({"history": null}), 400),
        json_row("history missing", Method::PUT, put, json!({"key": "r"}), 400),
        json_row("history of arrays", Method::PUT, put, json!({"history": [[1]]}), 400),
        json_row("PUT id is a number", Method::PUT, put, json!({"history": [], "id": 7}), 400),
        json_row("password is a number", Method::POST, auth, json!({"key": "r", "password": 5}), 400),
        json_row("password over 256 bytes", Method::POST, auth, json!({"key": "r", "password": "p".repeat(257)}), 400),
        json_row("auth key missing", Method::POST, auth, json!({"password": ""}), 400),
        raw("limit is not a number", Method::GET, "/api/roulette/sessions?limit=ten", None, "", 400),
        raw("limit is zero", Method::GET, "/api/roulette/sessions?limit=0", None, "", 400),
        raw("offset is negative", Method::GET, "/api/roulette/sessions?offset=-1", None, "", 400),
        raw("include is unknown", Method::GET, "/api/roulette/sessions?include=passwords", None, "", 400),
        raw("query parameter given twice", Method::GET, "/api/roulette/sessions?limit=1&limit=2", None, "", 400),
        raw("path key that is not UTF-8", Method::GET, "/api/roulette/%FF", None, "", 400),
        raw("PUT path key that is not UTF-8", Method::PUT, "/api/roulette/%FF%FE", json_ct, r#"{"history":[]}"#, 400),
        raw("path key with a control character", Method::GET, "/api/roulette/a%00b", None, "", 400),
        raw("PUT on the reserved name save", Method::PUT, save, json_ct, r#"{"history":[]}"#, 405),
        raw("PUT on the reserved name sessions", Method::PUT, "/api/roulette/sessions", json_ct, r#"{"history":[]}"#, 405),
    ];
    for n in rejected_numbers() {
        rows.push(json_row(
            format!("save number {n}"),
            Method::POST,
            save,
            json!({"key": "r", "number": n}),
            400,
        ));
        rows.push(json_row(
            format!("history containing {n}"),
            Method::PUT,
            put,
            json!({"history": [1, n, 3]}),
            400,
        ));
    }
    for key in rejected_keys() {
        rows.push(json_row(
            format!("save to key {key:?}"),
            Method::POST,
            save,
            json!({"key": key, "number": 1}),
            400,
        ));
        rows.push(json_row(
            format!("auth for key {key:?}"),
            Method::POST,
            auth,
            json!({"key": key, "password": "pw"}),
            400,
        ));
        if !key.is_empty() && key != "sessions" && key != "save" {
            let path = format!("/api/roulette/{}", encode(&key));
            rows.push(raw(
                format!("GET key {key:?}"),
                Method::GET,
                &path,
                None,
                "",
                400,
            ));
            rows.push(json_row(
                format!("PUT key {key:?}"),
                Method::PUT,
                &path,
                json!({"history": [1]}),
                400,
            ));
        }
    }
    for key in ["x ", "a\nb", "   ", "tab\tkey"] {
        rows.push(json_row(
            format!("save to key {key:?}"),
            Method::POST,
            save,
            json!({"key": key, "number": 1}),
            400,
        ));
    }
    run_raw(&s, rows).await;
    for (method, path) in [
        (Method::GET, "/api/admin/sessions/%FF/history"),
        (Method::GET, "/api/admin/sessions/a%2Fb/history"),
        (Method::POST, "/api/admin/connections/%FF/disconnect"),
    ] {
        let reply = s
            .send(
                s.http
                    .request(method.clone(), s.url(path))
                    .bearer_auth(ADMIN_TOKEN),
            )
            .await;
        check_error_reply(&reply, 400, &format!("admin {method} {path}"));
    }
    assert_eq!(
        total_rooms(&s).await,
        1,
        "a rejected request created a room"
    );
}

/// PROTOCOL.md: every error is JSON, never plain text.
#[tokio::test]
async fn plain_http_on_the_websocket_route_is_a_json_error() {
    let s = TestServer::start(&[]).await;
    let plain = s.send(s.http.get(s.url("/ws"))).await;
    check_error_reply(&plain, 400, "GET /ws without an upgrade");
    let old_version = s
        .send(
            s.http
                .get(s.url("/ws"))
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .header("Sec-WebSocket-Version", "12")
                .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        )
        .await;
    assert!(
        old_version.status >= 400 && old_version.status < 500,
        "{old_version:?}"
    );
    assert_shape(
        &old_version.json(),
        &error_body(),
        "unsupported WebSocket version",
    );
}

#[tokio::test]
async fn history_longer_than_max_history() {
    let s = TestServer::start(&[("MAX_HISTORY", "5")]).await;
    baseline(&s).await;
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    ws.recv().await;

    let six = json!([1, 2, 3, 4, 5, 6]);
    let (status, body) = s.put("/api/roulette/r", &json!({"history": six})).await;
    assert_eq!(status, 400, "PUT of 6 numbers: {body}");
    assert_shape(&body, &error_body(), "PUT over MAX_HISTORY");
    assert_unchanged(&s, "PUT over MAX_HISTORY").await;
    for message in [
        json!({"type": "update", "history": six}),
        json!({"type": "updateHistory", "key": ROOM, "history": six}),
    ] {
        ws.send(message.clone()).await;
        assert_shape(
            &ws.recv().await,
            &ws_error("history_too_long"),
            &message.to_string(),
        );
        assert_unchanged(&s, &message.to_string()).await;
    }
    let (status, body) = s.put("/api/roulette/new", &json!({"history": six})).await;
    assert_eq!(status, 400, "PUT of 6 numbers to a new room: {body}");
    assert_eq!(
        s.get("/api/roulette/new").await,
        (200, json!({"key": "new", "history": [], "version": 0}))
    );

    // A full room refuses to grow.
    let (status, body) = s
        .put("/api/roulette/full", &json!({"history": [1, 2, 3, 4, 5]}))
        .await;
    assert_eq!(status, 200, "exactly MAX_HISTORY is fine: {body}");
    let (status, body) = s
        .post("/api/roulette/save", &json!({"key": "full", "number": 6}))
        .await;
    assert_eq!(status, 400, "save to a full room: {body}");
    assert_shape(&body, &error_body(), "save to a full room");
    let mut full = s.ws().await;
    full.send(json!({"type": "join", "key": "full", "version": 0}))
        .await;
    full.recv().await;
    for message in [
        json!({"type": "add", "number": 6}),
        json!({"type": "saveNumber", "key": "full", "number": 6}),
    ] {
        full.send(message.clone()).await;
        assert_shape(
            &full.recv().await,
            &ws_error("history_too_long"),
            &message.to_string(),
        );
    }
    assert_eq!(s.room("full").await, (json!([1, 2, 3, 4, 5]), 1));
    ws.expect_silence(Duration::from_millis(200)).await;
    assert_unchanged(&s, "all of the above").await;
}

// ---------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------

/// A frame a client sends: JSON value, raw text, or binary.
enum Frame {
    Json(Value),
    Text(&'static str),
    Binary(Vec<u8>),
}

#[tokio::test]
async fn websocket_bad_messages_keep_the_connection_open() {
    let s = TestServer::start(&[]).await;
    baseline(&s).await;
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    ws.recv().await;
    let mut observer = s.ws().await;
    observer.send(json!({"type": "join", "key": ROOM})).await;
    observer.recv().await;

    #[rustfmt::skip]
    let mut rows: Vec<(String, Frame, &str)> = vec![
        ("not JSON".into(), Frame::Text("not json"), "invalid_json"),
        ("truncated JSON".into(), Frame::Text(r#"{"type":"add","number":"#), "invalid_json"),
        ("JSON array".into(), Frame::Text("[1,2]"), "invalid_json"),
        ("JSON number".into(), Frame::Text("42"), "invalid_json"),
        ("empty text frame".into(), Frame::Text(""), "invalid_json"),
        ("binary frame".into(), Frame::Binary(br#"{"type":"add","number":1}"#.to_vec()), "invalid_json"),
        ("no type".into(), Frame::Json(json!({"number": 1})), "unknown_type"),
        ("unknown type".into(), Frame::Json(json!({"type": "dance"})), "unknown_type"),
        ("type is a number".into(), Frame::Json(json!({"type": 7})), "unknown_type"),
        ("type in the wrong case".into(), Frame::Json(json!({"type": "ADD", "number": 1})), "unknown_type"),
        ("add without number".into(), Frame::Json(json!({"type": "add"})), "invalid_number"),
        ("add with an invalid key".into(), Frame::Json(json!({"type": "add", "key": "a/b", "number": 1})), "invalid_key"),
        ("add with key of the wrong type".into(), Frame::Json(json!({"type": "add", "key": 5, "number": 1})), "invalid_key"),
        ("join without key".into(), Frame::Json(json!({"type": "join"})), "invalid_key"),
        ("join with key of the wrong type".into(), Frame::Json(json!({"type": "join", "key": 5})), "invalid_key"),
        ("join with a token of the wrong type".into(), Frame::Json(json!({"type": "join", "key": ROOM, "token": 5})), "invalid_token"),
        ("join with a negative version".into(), Frame::Json(json!({"type": "join", "key": ROOM, "version": -1})), "invalid_version"),
        ("join with a string version".into(), Frame::Json(json!({"type": "join", "key": ROOM, "version": "1"})), "invalid_version"),
        ("remove out of range".into(), Frame::Json(json!({"type": "remove", "index": 3})), "index_out_of_range"),
        ("remove far out of range".into(), Frame::Json(json!({"type": "remove", "key": ROOM, "index": 1000})), "index_out_of_range"),
        ("remove with a negative index".into(), Frame::Json(json!({"type": "remove", "index": -1})), "invalid_index"),
        ("remove with a string index".into(), Frame::Json(json!({"type": "remove", "index": "0"})), "invalid_index"),
        ("remove with a fractional index".into(), Frame::Json(json!({"type": "remove", "index": 1.5})), "invalid_index"),
        ("remove without index".into(), Frame::Json(json!({"type": "remove"})), "invalid_index"),
        ("update with an invalid element".into(), Frame::Json(json!({"type": "update", "history": [1, 37]})), "invalid_number"),
        ("update with a string history".into(), Frame::Json(json!({"type": "update", "history": "1,2"})), "invalid_history"),
        ("update without history".into(), Frame::Json(json!({"type": "update"})), "invalid_history"),
        ("updateHistory with null in it".into(), Frame::Json(json!({"type": "updateHistory", "key": ROOM, "history": [null]})), "invalid_number"),
        ("add with an id over 64 characters".into(), Frame::Json(json!({"type": "add", "number": 1, "id": "i".repeat(65)})), "invalid_id"),
        ("add with a numeric id".into(), Frame::Json(json!({"type": "add", "number": 1, "id": 5})), "invalid_id"),
    ];
    for n in rejected_numbers() {
        rows.push((
            format!("add {n}"),
            Frame::Json(json!({"type": "add", "number": n})),
            "invalid_number",
        ));
        rows.push((
            format!("saveNumber {n}"),
            Frame::Json(json!({"type": "saveNumber", "key": ROOM, "number": n})),
            "invalid_number",
        ));
        rows.push((
            format!("update containing {n}"),
            Frame::Json(json!({"type": "update", "history": [1, n]})),
            "invalid_number",
        ));
    }
    for key in rejected_keys() {
        rows.push((
            format!("join {key:?}"),
            Frame::Json(json!({"type": "join", "key": key, "version": 0})),
            "invalid_key",
        ));
        rows.push((
            format!("getHistory {key:?}"),
            Frame::Json(json!({"type": "getHistory", "key": key})),
            "invalid_key",
        ));
        rows.push((
            format!("saveNumber to {key:?}"),
            Frame::Json(json!({"type": "saveNumber", "key": key, "number": 1})),
            "invalid_key",
        ));
        rows.push((
            format!("add to {key:?}"),
            Frame::Json(json!({"type": "add", "key": key, "number": 1})),
            "invalid_key",
        ));
    }
    for (what, frame, code) in rows {
        match frame {
            Frame::Json(v) => ws.send(v).await,
            Frame::Text(t) => ws.send_text(t).await,
            Frame::Binary(b) => ws.send_raw(Message::binary(b)).await,
        }
        assert_shape(&ws.recv().await, &ws_error(code), &what);
        assert_unchanged(&s, &what).await;
    }
    // Still open and still a member.
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong"}));
    observer.expect_silence(Duration::from_millis(200)).await;
    ws.send(json!({"type": "add", "number": 4})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "add", "key": ROOM, "number": 4, "version": 2})
    );
    assert_eq!(
        total_rooms(&s).await,
        1,
        "a rejected message created a room"
    );
}

#[tokio::test]
async fn mutations_before_join_are_not_joined() {
    let s = TestServer::start(&[]).await;
    baseline(&s).await;
    let mut ws = s.ws().await;
    let rows = [
        json!({"type": "add", "number": 1}),
        json!({"type": "remove", "index": 0}),
        json!({"type": "update", "history": [9]}),
        json!({"type": "add", "key": ROOM, "number": 1}),
        json!({"type": "remove", "key": ROOM, "index": 0}),
        json!({"type": "update", "key": ROOM, "history": [9]}),
    ];
    for message in &rows {
        ws.send(message.clone()).await;
        assert_shape(
            &ws.recv().await,
            &ws_error("not_joined"),
            &message.to_string(),
        );
        assert_unchanged(&s, &message.to_string()).await;
    }
    // A member of another room still cannot change this one by naming it.
    ws.send(json!({"type": "join", "key": "elsewhere", "version": 0}))
        .await;
    ws.recv().await;
    for message in &rows[3..] {
        ws.send(message.clone()).await;
        assert_shape(
            &ws.recv().await,
            &ws_error("not_joined"),
            &format!("{message} as a member of another room"),
        );
        assert_unchanged(&s, &message.to_string()).await;
    }
    // A v1 member that left is no longer a member either.
    ws.send(json!({"type": "join", "key": ROOM})).await;
    ws.recv().await;
    ws.send(json!({"type": "leave", "key": ROOM})).await;
    ws.send(json!({"type": "remove", "key": ROOM, "index": 0}))
        .await;
    assert_shape(
        &ws.recv().await,
        &ws_error("not_joined"),
        "remove after leave",
    );
    assert_unchanged(&s, "remove after leave").await;
    assert_eq!(total_rooms(&s).await, 1);
}

#[tokio::test]
async fn frame_over_64_kib_closes_with_1009() {
    let s = TestServer::start(&[]).await;
    baseline(&s).await;
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    ws.recv().await;
    // Just under the limit is an ordinary message.
    ws.send(json!({"type": "ping", "pad": "x".repeat(60 * 1024)}))
        .await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "pong"}),
        "a 60 KiB frame is accepted"
    );
    ws.send(json!({"type": "add", "number": 5, "pad": "x".repeat(64 * 1024)}))
        .await;
    assert_eq!(
        ws.closed().await,
        Some(1009),
        "a frame over 64 KiB closes with 1009"
    );
    assert_unchanged(&s, "oversized frame").await;
    // The server keeps serving.
    let mut next = s.ws().await;
    next.send(json!({"type": "join", "key": ROOM})).await;
    assert_eq!(
        next.recv().await,
        json!({"type": "sync", "key": ROOM, "history": [1, 2, 3]})
    );
}

#[tokio::test]
async fn message_burst_over_the_rate_limit() {
    let s = TestServer::start(&[("WS_RATE_LIMIT", "1"), ("WS_RATE_BURST", "5")]).await;
    baseline(&s).await;
    let mut observer = s.ws().await;
    observer
        .send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    observer.recv().await;

    // Sent back to back: join + 4 pings use the burst of 5; the rest is dropped.
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    for _ in 0..4 {
        ws.send(json!({"type": "ping"})).await;
    }
    let dropped = [
        json!({"type": "add", "number": 9}),
        json!({"type": "remove", "index": 0}),
        json!({"type": "update", "history": []}),
        json!({"type": "saveNumber", "key": ROOM, "number": 9}),
        json!({"type": "ping"}),
    ];
    for message in &dropped {
        ws.send(message.clone()).await;
    }
    ws.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(ws.recv().await["type"], "sync");
    for i in 0..4 {
        assert_eq!(
            ws.recv().await,
            json!({"type": "pong"}),
            "ping {i} within the burst"
        );
    }
    for message in dropped
        .iter()
        .map(ToString::to_string)
        .chain(["binary frame".to_owned()])
    {
        assert_shape(&ws.recv().await, &ws_error("rate_limited"), &message);
    }
    ws.expect_silence(Duration::from_millis(200)).await;
    observer.expect_silence(Duration::from_millis(50)).await;
    assert_unchanged(&s, "rate-limited burst").await;

    // The connection stays open and recovers once tokens refill.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "pong"}),
        "after the limiter refilled"
    );
}

#[tokio::test]
async fn too_many_rooms_on_one_connection() {
    let s = TestServer::start(&[("WS_MAX_ROOMS", "2")]).await;
    baseline(&s).await;
    let mut ws = s.ws().await;
    for key in ["a", "b"] {
        ws.send(json!({"type": "join", "key": key, "version": 0}))
            .await;
        assert_eq!(ws.recv().await["type"], "sync");
    }
    ws.send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    assert_shape(&ws.recv().await, &ws_error("too_many_rooms"), "third room");
    ws.send(json!({"type": "add", "key": ROOM, "number": 1}))
        .await;
    assert_shape(
        &ws.recv().await,
        &ws_error("not_joined"),
        "not a member of the third room",
    );
    assert_unchanged(&s, "too many rooms").await;
    // Re-joining a room it already has is fine.
    ws.send(json!({"type": "join", "key": "a"})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "sync", "key": "a", "history": []})
    );
}

// ---------------------------------------------------------------------------
// Auth
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_password_then_auth_rate_limit() {
    let s = TestServer::start(&[("AUTH_RATE_LIMIT", "3")]).await;
    let token = s.token(ROOM, "right").await; // attempt 1
    let (status, _) = s
        .call(
            Method::PUT,
            "/api/roulette/r",
            Some(&token),
            Some(&json!({"history": [1, 2, 3]})),
        )
        .await;
    assert_eq!(status, 200);
    let room = || async { s.get_with_token("/api/roulette/r", &token).await.1 };
    let before = room().await;
    assert_eq!(
        (before["history"].clone(), before["version"].clone()),
        (json!([1, 2, 3]), json!(1))
    );

    for attempt in 2..=3 {
        let (status, body) = s
            .post(
                "/api/rooms/auth",
                &json!({"key": ROOM, "password": "wrong"}),
            )
            .await;
        assert_eq!(status, 401, "wrong password, attempt {attempt}: {body}");
        assert_shape(&body, &error_body(), "wrong password");
        assert_eq!(room().await, before, "wrong password changed the room");
    }
    // The fourth attempt within the minute is refused before any password work,
    // even with the right password, and for another room from the same client.
    for body in [
        json!({"key": ROOM, "password": "right"}),
        json!({"key": "other", "password": ""}),
    ] {
        let (status, reply) = s.post("/api/rooms/auth", &body).await;
        assert_eq!(status, 429, "{body}: {reply}");
        assert_shape(&reply, &error_body(), "auth rate limit");
    }
    assert_eq!(room().await, before);
    assert_eq!(
        s.get("/api/roulette/other").await,
        (200, json!({"key": "other", "history": [], "version": 0})),
        "a limited auth created a room"
    );
    // Everything else keeps working.
    assert_eq!(s.get("/livez").await.0, 200);
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn sign(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("signing")
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens() {
    let s = TestServer::start(&[]).await;
    let token = s.token(ROOM, "pw").await;
    let (status, _) = s
        .call(
            Method::PUT,
            "/api/roulette/r",
            Some(&token),
            Some(&json!({"history": [1, 2, 3]})),
        )
        .await;
    assert_eq!(status, 200);
    let foreign = s.token("other", "other-pw").await;
    let secret = s.jwt_secret();
    let now = jsonwebtoken::get_current_timestamp();
    let day = now + 24 * 3600;

    #[rustfmt::skip]
    let tokens: Vec<(&str, String)> = vec![
        ("forged (another secret)", sign(&json!({"key": ROOM, "exp": day}), b"not-the-server-secret-not-the-server-secret")),
        ("expired", sign(&json!({"key": ROOM, "exp": now - 60}), secret.as_bytes())),
        ("without exp", sign(&json!({"key": ROOM}), secret.as_bytes())),
        ("without key", sign(&json!({"exp": day}), secret.as_bytes())),
        ("another room's token", foreign.clone()),
        ("another room's claims, real secret", sign(&json!({"key": "other", "exp": day}), secret.as_bytes())),
        (
            "alg none",
            format!("{}.{}.", base64url(br#"{"alg":"none","typ":"JWT"}"#), base64url(json!({"key": ROOM, "exp": day}).to_string().as_bytes())),
        ),
        ("tampered signature", format!("{}x", &token[..token.len() - 1])),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    let assert_room = |what: String| {
        let s = &s;
        let token = token.clone();
        async move {
            let (status, body) = s.get_with_token("/api/roulette/r", &token).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(
                (body["history"].clone(), body["version"].clone()),
                (json!([1, 2, 3]), json!(1)),
                "room changed after: {what}"
            );
        }
    };
    let mut watcher = s.ws().await;
    watcher
        .send(json!({"type": "join", "key": ROOM, "version": 0, "token": token}))
        .await;
    assert_eq!(watcher.recv().await["version"], 1);

    for (what, bad) in &tokens {
        for (method, path, body) in [
            (Method::GET, "/api/roulette/r", None),
            (
                Method::PUT,
                "/api/roulette/r",
                Some(json!({"history": [9]})),
            ),
            (
                Method::POST,
                "/api/roulette/save",
                Some(json!({"key": ROOM, "number": 9})),
            ),
        ] {
            let (status, reply) = s.call(method.clone(), path, Some(bad), body.as_ref()).await;
            assert_eq!(status, 401, "{what} on {method} {path}: {reply}");
            assert_shape(&reply, &error_body(), what);
        }
        let mut ws = s.ws().await;
        ws.send(json!({"type": "join", "key": ROOM, "version": 0, "token": bad}))
            .await;
        assert_shape(
            &ws.recv().await,
            &json!({"type": "authRequired", "key": ROOM, "error": "<string>"}),
            what,
        );
        ws.send(json!({"type": "add", "number": 9})).await;
        assert_shape(
            &ws.recv().await,
            &ws_error("not_joined"),
            &format!("{what}: add after authRequired"),
        );
        assert_room(what.to_string()).await;
    }
    // An empty bearer and a non-bearer scheme are the same as no token.
    for header in ["Bearer ", "Basic dXNlcjpwYXNz", token.as_str()] {
        let reply = s
            .send(
                s.http
                    .get(s.url("/api/roulette/r"))
                    .header("Authorization", header),
            )
            .await;
        assert_eq!(
            reply.status, 401,
            "Authorization: {header:?}: {:?}",
            reply.text
        );
        assert_shape(&reply.json(), &error_body(), header);
    }
    watcher.expect_silence(Duration::from_millis(200)).await;
    assert_room("all tokens".into()).await;
}

/// PROTOCOL.md: a protected room needs a token for every write, and without a
/// valid token the connection is answered `authRequired` and not subscribed.
#[tokio::test]
async fn seed_writes_to_a_protected_room_need_a_token() {
    let s = TestServer::start(&[]).await;
    let token = s.token(ROOM, "pw").await;
    let (status, _) = s
        .call(
            Method::PUT,
            "/api/roulette/r",
            Some(&token),
            Some(&json!({"history": [1, 2, 3]})),
        )
        .await;
    assert_eq!(status, 200);
    for message in [
        json!({"type": "saveNumber", "key": ROOM, "number": 9}),
        json!({"type": "updateHistory", "key": ROOM, "history": []}),
        json!({"type": "saveNumber", "key": ROOM, "number": 9, "token": "garbage"}),
    ] {
        let mut ws = s.ws().await;
        ws.send(message.clone()).await;
        assert_shape(
            &ws.recv().await,
            &json!({"type": "authRequired", "key": ROOM, "error": "<string>"}),
            &message.to_string(),
        );
        ws.expect_silence(Duration::from_millis(200)).await;
        let (_, body) = s.get_with_token("/api/roulette/r", &token).await;
        assert_eq!(
            (body["history"].clone(), body["version"].clone()),
            (json!([1, 2, 3]), json!(1)),
            "room changed after {message}"
        );
    }
}

// ---------------------------------------------------------------------------
// Admin and connection cap
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_admin_token() {
    let s = TestServer::start(&[]).await;
    baseline(&s).await;
    let mut member = s.ws().await;
    member
        .send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    member.recv().await;
    let id = eventually(
        Duration::from_secs(5),
        "the connection in the admin view",
        || async {
            let (_, body) = s.admin_get("/api/admin/sessions").await;
            body.as_array()?.iter().find(|r| r["key"] == ROOM)?["connections"][0]["id"]
                .as_str()
                .map(str::to_owned)
        },
    )
    .await;
    let disconnect = format!("/api/admin/connections/{id}/disconnect");
    for (method, path) in [
        (Method::GET, "/api/admin/sessions"),
        (Method::GET, "/api/admin/stats"),
        (Method::GET, "/api/admin/sessions/r/history"),
        (Method::GET, "/api/admin/migrations"),
        (Method::POST, disconnect.as_str()),
    ] {
        let longer = format!("{ADMIN_TOKEN}-but-longer");
        let upper = ADMIN_TOKEN.to_uppercase();
        for token in [
            Some("wrong-token"),
            Some(""),
            Some(longer.as_str()),
            Some(upper.as_str()),
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
            None,
        ] {
            let (status, body) = s.call(method.clone(), path, token, None).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_shape(&body, &error_body(), path);
        }
        let basic = s
            .send(
                s.http
                    .request(method.clone(), s.url(path))
                    .header("Authorization", format!("Basic {ADMIN_TOKEN}")),
            )
            .await;
        check_error_reply(&basic, 401, "admin token under another scheme");
    }
    // The refused disconnect did not disconnect anyone.
    member.send(json!({"type": "ping"})).await;
    assert_eq!(member.recv().await, json!({"type": "pong"}));
    assert_unchanged(&s, "wrong admin token").await;
}

#[tokio::test]
async fn more_connections_than_ws_max_connections() {
    let s = TestServer::start(&[("WS_MAX_CONNECTIONS", "2")]).await;
    baseline(&s).await;
    let mut first = s.ws().await;
    first
        .send(json!({"type": "join", "key": ROOM, "version": 0}))
        .await;
    first.recv().await;
    let mut second = s.ws().await;
    second.send(json!({"type": "join", "key": ROOM})).await;
    second.recv().await;

    for attempt in 0..3 {
        let refused = match WsClient::try_connect(&s.ws_url()).await {
            Ok(_) => panic!(
                "connection {} over WS_MAX_CONNECTIONS=2 was accepted",
                attempt + 3
            ),
            Err(refused) => refused,
        };
        assert_eq!(refused.status, Some(503), "refusal: {refused:?}");
        let body: Value = serde_json::from_str(&refused.body)
            .unwrap_or_else(|_| panic!("non-JSON refusal {:?}", refused.body));
        assert_shape(&body, &error_body(), "refused connection");
    }
    assert_unchanged(&s, "refused connections").await;

    // The server keeps working: HTTP, and the two connections it holds.
    assert_eq!(s.get("/readyz").await.0, 200);
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": "other", "number": 1}))
        .await;
    assert_eq!(status, 200);
    first.send(json!({"type": "ping"})).await;
    assert_eq!(first.recv().await, json!({"type": "pong"}));

    // A freed slot is available again.
    second.close().await;
    let mut third = eventually(Duration::from_secs(5), "a free connection slot", || async {
        WsClient::try_connect(&s.ws_url()).await.ok()
    })
    .await;
    third.send(json!({"type": "join", "key": ROOM})).await;
    assert_eq!(
        third.recv().await,
        json!({"type": "sync", "key": ROOM, "history": [1, 2, 3]})
    );
}
