//! Conformance with the wire contract (`PROTOCOL.md`): every row is the request
//! a real client of one of the three backend generations sends, and the exact
//! reply it must get. Replies are compared as whole JSON values; volatile fields
//! (ids, timestamps, epochs, tokens) are compared by shape through the
//! placeholders of [`support::app::shape_mismatch`].
//!
//! Each test starts its own real `croupier` process in embedded (SQLite) mode.

mod support;

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use support::app::{ADMIN_TOKEN, TestServer, assert_shape, encode, eventually};
use support::contract::{
    DialectRow, Dialects, QUIET, Sender, error_body, expect_frame, room_path, room_reply, row,
    run_rows, saved, unknown_room,
};

// ---------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_room_routes_follow_the_table() {
    let s = TestServer::start(&[]).await;
    let long_key = "k".repeat(100);
    let cyrillic_key = "я".repeat(100);
    let save = "/api/roulette/save";
    #[rustfmt::skip]
    let rows = vec![
        row("unknown room reads as empty", Method::GET, "/api/roulette/t1", None, 200, unknown_room("t1")),
        row("GET did not create the room", Method::GET, "/api/roulette/sessions", None, 200, json!({"sessions": [], "total": 0})),
        row("save creates the room", Method::POST, save, Some(json!({"key": "t1", "number": 17})), 200, saved("t1", json!([17]), 1, false)),
        row("save appends \"00\"", Method::POST, save, Some(json!({"key": "t1", "number": "00"})), 200, saved("t1", json!([17, "00"]), 2, false)),
        row("integral float is read as an integer", Method::POST, save, Some(json!({"key": "t1", "number": 15.0})), 200, saved("t1", json!([17, "00", 15]), 3, false)),
        row("zero", Method::POST, save, Some(json!({"key": "t1", "number": 0})), 200, saved("t1", json!([17, "00", 15, 0]), 4, false)),
        row("GET an existing room", Method::GET, "/api/roulette/t1", None, 200, room_reply("t1", json!([17, "00", 15, 0]), 4)),
        row("PUT replaces; the path key wins over the body key", Method::PUT, "/api/roulette/t1", Some(json!({"key": "other", "history": [36, "00"]})), 200, saved("t1", json!([36, "00"]), 5, false)),
        row("the body key was ignored", Method::GET, "/api/roulette/other", None, 200, unknown_room("other")),
        row("an invalid body key is ignored too", Method::PUT, "/api/roulette/t1", Some(json!({"key": "a/b", "history": [36, "00", 1]})), 200, saved("t1", json!([36, "00", 1]), 6, false)),
        row("PUT creates a missing room", Method::PUT, "/api/roulette/t2", Some(json!({"history": [1, 2]})), 200, saved("t2", json!([1, 2]), 1, false)),
        row("PUT with an empty history", Method::PUT, "/api/roulette/t2", Some(json!({"history": []})), 200, saved("t2", json!([]), 2, false)),
        row("GET after emptying", Method::GET, "/api/roulette/t2", None, 200, room_reply("t2", json!([]), 2)),
        row("Cyrillic key, unknown", Method::GET, &room_path("Рулетка"), None, 200, unknown_room("Рулетка")),
        row("Cyrillic key, save", Method::POST, save, Some(json!({"key": "Рулетка", "number": 36})), 200, saved("Рулетка", json!([36]), 1, false)),
        row("Cyrillic key, read", Method::GET, &room_path("Рулетка"), None, 200, room_reply("Рулетка", json!([36]), 1)),
        row("key with an inner space", Method::PUT, &room_path("table 7"), Some(json!({"history": ["00", 0]})), 200, saved("table 7", json!(["00", 0]), 1, false)),
        row("100-character key", Method::POST, save, Some(json!({"key": long_key, "number": 1})), 200, saved(&long_key, json!([1]), 1, false)),
        row("100-character key, read", Method::GET, &room_path(&long_key), None, 200, room_reply(&long_key, json!([1]), 1)),
        row("100 Cyrillic characters (200 bytes) is a valid key", Method::PUT, &room_path(&cyrillic_key), Some(json!({"history": [2]})), 200, saved(&cyrillic_key, json!([2]), 1, false)),
        row("unknown API route", Method::GET, "/api/nope", None, 404, error_body()),
        row("unknown route outside /api", Method::GET, "/nope", None, 404, error_body()),
        row("wrong method on a room", Method::DELETE, "/api/roulette/t1", None, 405, error_body()),
        row("wrong method on save", Method::GET, save, None, 405, error_body()),
    ];
    let replies = run_rows(&s, rows).await;

    // The room's identity is fixed at creation: id, epoch and created_at do not
    // change across appends and replaces, and the HTTP read reports the same epoch.
    let t1: Vec<&Value> = replies
        .iter()
        .filter_map(|r| r.get("data"))
        .filter(|d| d["key"] == "t1")
        .collect();
    assert_eq!(t1.len(), 6);
    for d in &t1 {
        assert_eq!(d["id"], t1[0]["id"], "id is stable");
        assert_eq!(d["epoch"], t1[0]["epoch"], "epoch is stable");
        assert_eq!(d["created_at"], t1[0]["created_at"], "created_at is stable");
        let created =
            chrono::DateTime::parse_from_rfc3339(d["created_at"].as_str().unwrap_or_default())
                .expect("created_at");
        let updated =
            chrono::DateTime::parse_from_rfc3339(d["updated_at"].as_str().unwrap_or_default())
                .expect("updated_at");
        assert!(
            updated >= created,
            "updated_at {updated} before created_at {created}"
        );
    }
    assert_eq!(
        replies[6]["epoch"], t1[0]["epoch"],
        "GET reports the room's epoch"
    );
    let t2_id = replies
        .iter()
        .filter_map(|r| r.get("data"))
        .find(|d| d["key"] == "t2")
        .map(|d| d["id"].clone());
    assert_ne!(t2_id, Some(t1[0]["id"].clone()), "rooms have distinct ids");
}

#[tokio::test]
async fn sessions_list_paginates_newest_first() {
    let s = TestServer::start(&[]).await;
    for (key, history) in [
        ("a", json!([1])),
        ("b", json!([1, 2])),
        ("c", json!([1, 2, "00"])),
    ] {
        let (status, body) = s
            .put(
                &format!("/api/roulette/{key}"),
                &json!({"history": history}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        // Distinct activity times, so "newest first" is observable.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let summary = |key: &str, len: u64| {
        json!({
            "id": "<int>", "key": key, "historyLength": len,
            "created_at": "<rfc3339>", "updated_at": "<rfc3339>",
            "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "protected": false,
        })
    };
    let with_history = |key: &str, history: Value| {
        let mut v = summary(key, history.as_array().map_or(0, |a| a.len() as u64));
        v["history"] = history;
        v
    };
    let list = |sessions: Vec<Value>| json!({"sessions": sessions, "total": 3});
    #[rustfmt::skip]
    let rows = vec![
        row("default page", Method::GET, "/api/roulette/sessions", None, 200, list(vec![summary("c", 3), summary("b", 2), summary("a", 1)])),
        row("limit", Method::GET, "/api/roulette/sessions?limit=2", None, 200, list(vec![summary("c", 3), summary("b", 2)])),
        row("offset", Method::GET, "/api/roulette/sessions?offset=2", None, 200, list(vec![summary("a", 1)])),
        row("limit and offset", Method::GET, "/api/roulette/sessions?limit=1&offset=1", None, 200, list(vec![summary("b", 2)])),
        row("offset past the end", Method::GET, "/api/roulette/sessions?offset=10", None, 200, list(vec![])),
        row("limit above the maximum is capped", Method::GET, "/api/roulette/sessions?limit=5000", None, 200, list(vec![summary("c", 3), summary("b", 2), summary("a", 1)])),
        row(
            "include=history",
            Method::GET,
            "/api/roulette/sessions?include=history&limit=2",
            None,
            200,
            list(vec![with_history("c", json!([1, 2, "00"])), with_history("b", json!([1, 2]))]),
        ),
    ];
    let replies = run_rows(&s, rows).await;
    // Both spellings of the times carry the same instants.
    for summary in replies[0]["sessions"].as_array().expect("sessions") {
        assert_eq!(summary["createdAt"], summary["created_at"], "{summary}");
        assert_eq!(summary["lastActivity"], summary["updated_at"], "{summary}");
    }

    // New activity moves a room to the front.
    let (status, _) = s
        .post("/api/roulette/save", &json!({"key": "a", "number": 5}))
        .await;
    assert_eq!(status, 200);
    let (_, body) = s.get("/api/roulette/sessions").await;
    assert_shape(
        &body,
        &list(vec![summary("a", 2), summary("c", 3), summary("b", 2)]),
        "after activity in a",
    );
}

#[tokio::test]
async fn rooms_auth_creates_and_checks_passwords() {
    let s = TestServer::start(&[]).await;
    let token = json!({"token": "<string>", "protected": true});
    let open_token = json!({"token": "<string>", "protected": false});
    let auth = "/api/rooms/auth";
    #[rustfmt::skip]
    let rows = vec![
        row("create a protected room", Method::POST, auth, Some(json!({"key": "vault", "password": "s3cret"})), 200, token.clone()),
        row("right password", Method::POST, auth, Some(json!({"key": "vault", "password": "s3cret"})), 200, token.clone()),
        row("wrong password", Method::POST, auth, Some(json!({"key": "vault", "password": "guess"})), 401, error_body()),
        row("empty password on a protected room", Method::POST, auth, Some(json!({"key": "vault", "password": ""})), 401, error_body()),
        row("create an unprotected room (empty password)", Method::POST, auth, Some(json!({"key": "open", "password": ""})), 200, open_token.clone()),
        row("unprotected room accepts any password", Method::POST, auth, Some(json!({"key": "open", "password": "anything"})), 200, open_token.clone()),
        row("a room created by save is unprotected", Method::POST, "/api/roulette/save", Some(json!({"key": "plain", "number": 3})), 200, saved("plain", json!([3]), 1, false)),
        row("... and accepts any password", Method::POST, auth, Some(json!({"key": "plain", "password": "x"})), 200, open_token.clone()),
        row("the unprotected room stays readable without a token", Method::GET, "/api/roulette/open", None, 200, room_reply("open", json!([]), 0)),
        row("... and writable without a token", Method::POST, "/api/roulette/save", Some(json!({"key": "open", "number": 9})), 200, saved("open", json!([9]), 1, false)),
        row("... and still unprotected after a password was sent", Method::PUT, "/api/roulette/plain", Some(json!({"history": [4]})), 200, saved("plain", json!([4]), 2, false)),
    ];
    let replies = run_rows(&s, rows).await;

    // The token is an HS256 JWT with claims `key` and `exp` (24 h), signed with the
    // embedded secret.
    let secret = s.jwt_secret();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    let decoded = jsonwebtoken::decode::<Value>(
        replies[0]["token"].as_str().expect("token"),
        &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .expect("token is an HS256 JWT signed with JWT_SECRET");
    assert_eq!(decoded.claims["key"], "vault");
    let exp = decoded.claims["exp"].as_u64().expect("exp");
    let now = jsonwebtoken::get_current_timestamp();
    assert!(
        (now + 24 * 3600 - 120..=now + 24 * 3600 + 5).contains(&exp),
        "exp {exp} is not 24 h from {now}"
    );

    // The list shows which rooms are protected (and never their numbers without a token).
    let (_, list) = s.get("/api/roulette/sessions?include=history").await;
    let protected: Vec<(String, bool)> = list["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap_or_default().to_owned(),
                r["protected"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(protected.len(), 3, "{list}");
    for (key, flag) in protected {
        assert_eq!(flag, key == "vault", "protected flag of {key}: {list}");
    }
    let vault = list["sessions"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == "vault"))
        .expect("vault listed");
    assert!(
        vault.get("history").is_none(),
        "a protected room's history must not be listed: {vault}"
    );
}

#[tokio::test]
async fn protected_room_needs_its_token_over_http() {
    let s = TestServer::start(&[]).await;
    let token = s.token("vault", "pw").await;
    let other = s.token("other", "").await;
    let put = |history: Value| Some(json!({"history": history}));
    #[rustfmt::skip]
    let rows = vec![
        row("GET without token", Method::GET, "/api/roulette/vault", None, 401, error_body()),
        row("GET with token", Method::GET, "/api/roulette/vault", None, 200, room_reply("vault", json!([]), 0)).with_token(&token),
        row("GET with another room's token", Method::GET, "/api/roulette/vault", None, 401, error_body()).with_token(&other),
        row("save without token", Method::POST, "/api/roulette/save", Some(json!({"key": "vault", "number": 7})), 401, error_body()),
        row("save with another room's token", Method::POST, "/api/roulette/save", Some(json!({"key": "vault", "number": 7})), 401, error_body()).with_token(&other),
        row("save with token", Method::POST, "/api/roulette/save", Some(json!({"key": "vault", "number": 7})), 200, saved("vault", json!([7]), 1, true)).with_token(&token),
        row("PUT without token", Method::PUT, "/api/roulette/vault", put(json!([1])), 401, error_body()),
        row("PUT with another room's token", Method::PUT, "/api/roulette/vault", put(json!([1])), 401, error_body()).with_token(&other),
        row("PUT with token", Method::PUT, "/api/roulette/vault", put(json!([1, "00"])), 200, saved("vault", json!([1, "00"]), 2, true)).with_token(&token),
        row("GET sees the writes", Method::GET, "/api/roulette/vault", None, 200, room_reply("vault", json!([1, "00"]), 2)).with_token(&token),
        row("the other room's token works for it", Method::GET, "/api/roulette/other", None, 200, room_reply("other", json!([]), 0)).with_token(&other),
        row("a room token is not needed for an unprotected room", Method::GET, "/api/roulette/other", None, 200, room_reply("other", json!([]), 0)).with_token(&token),
    ];
    run_rows(&s, rows).await;
    let (status, body) = s
        .get_with_token("/api/admin/sessions/vault/history", ADMIN_TOKEN)
        .await;
    assert_eq!(
        (status, body),
        (200, json!([1, "00"])),
        "the admin API reads protected rooms"
    );
}

// ---------------------------------------------------------------------------
// Admin and operational endpoints
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_api_sees_and_disconnects_connections() {
    let s = TestServer::start(&[("INSTANCE_ID", "conformance-1")]).await;
    s.put("/api/roulette/adm", &json!({"history": [1, "00"]}))
        .await;
    s.put("/api/roulette/quiet", &json!({"history": [1, 2, 3, 4]}))
        .await;
    let mut member = s
        .ws_with_headers(&[("User-Agent", "conformance-client/1.0")])
        .await
        .expect("connect");
    member
        .send(json!({"type": "join", "key": "adm", "version": 0}))
        .await;
    member.recv().await;

    let wrong = s
        .get_with_token("/api/admin/sessions", "not-the-token")
        .await;
    assert_eq!(wrong.0, 401, "wrong admin token: {}", wrong.1);
    assert_shape(&wrong.1, &error_body(), "wrong admin token");
    let missing = s.get("/api/admin/stats").await;
    assert_eq!(missing.0, 401, "missing admin token: {}", missing.1);
    assert_shape(&missing.1, &error_body(), "missing admin token");

    // Presence is published right after the join; wait until the listing shows it.
    let sessions = eventually(
        Duration::from_secs(5),
        "the connection in /api/admin/sessions",
        || async {
            let (status, body) = s.admin_get("/api/admin/sessions").await;
            assert_eq!(status, 200, "{body}");
            let room = body.as_array()?.iter().find(|r| r["key"] == "adm")?.clone();
            (room["activeConnections"] == 1).then_some(body)
        },
    )
    .await;
    let adm = sessions
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == "adm"))
        .expect("adm")
        .clone();
    assert_shape(
        &adm,
        &json!({
            "key": "adm", "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "historyLength": 2,
            "activeConnections": 1, "totalConnections": 1, "protected": false,
            "connections": [{
                "id": "<string>", "key": "adm", "connectedAt": "<rfc3339>", "lastActivity": "<rfc3339>",
                "status": "connected", "ipAddress": "127.0.0.1", "userAgent": "conformance-client/1.0",
                "instance": "conformance-1",
            }],
        }),
        "admin sessions: live room",
    );
    let quiet = sessions
        .as_array()
        .and_then(|a| a.iter().find(|r| r["key"] == "quiet"))
        .expect("quiet")
        .clone();
    assert_shape(
        &quiet,
        &json!({
            "key": "quiet", "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "historyLength": 4,
            "activeConnections": 0, "totalConnections": 0, "protected": false, "connections": [],
        }),
        "admin sessions: room without connections",
    );
    assert_eq!(sessions.as_array().map(Vec::len), Some(2), "{sessions}");

    let (status, stats) = s.admin_get("/api/admin/stats").await;
    assert_eq!(status, 200, "{stats}");
    assert_shape(
        &stats,
        &json!({"totalSessions": 2, "activeSessions": 1, "totalConnections": 1, "activeConnections": 1, "averageHistoryLength": "<number>"}),
        "admin stats",
    );
    assert_eq!(stats["averageHistoryLength"].as_f64(), Some(3.0), "{stats}");

    assert_eq!(
        s.admin_get("/api/admin/sessions/adm/history").await,
        (200, json!([1, "00"]))
    );
    assert_eq!(
        s.admin_get(&format!("/api/admin/sessions/{}/history", encode("quiet")))
            .await,
        (200, json!([1, 2, 3, 4]))
    );
    let (status, body) = s.admin_get("/api/admin/sessions/nobody/history").await;
    assert_eq!(status, 404, "{body}");
    assert_shape(&body, &error_body(), "history of an unknown room");

    let (status, migrations) = s.admin_get("/api/admin/migrations").await;
    assert_eq!(status, 200, "{migrations}");
    assert_shape(
        &migrations,
        &json!({"backend": "sqlite", "applied": "<array>", "pending": []}),
        "migrations",
    );
    let applied = migrations["applied"].as_array().expect("applied");
    assert!(!applied.is_empty(), "{migrations}");
    for m in applied {
        assert_shape(
            m,
            &json!({"version": "<int>", "description": "<string>", "applied": true}),
            "applied migration",
        );
    }

    // Disconnect the live connection by its id: the client is closed.
    let id = adm["connections"][0]["id"].as_str().expect("id").to_owned();
    let (status, body) = s
        .admin_post("/api/admin/connections/unknown-id/disconnect")
        .await;
    assert_eq!(status, 404, "unknown connection: {body}");
    assert_shape(&body, &error_body(), "disconnect of an unknown connection");
    let (status, body) = s
        .admin_post(&format!("/api/admin/connections/{id}/disconnect"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_shape(
        &body,
        &json!({"status": "success", "message": "<string>"}),
        "disconnect",
    );
    let code = tokio::time::timeout(Duration::from_secs(5), member.closed())
        .await
        .expect("client closed after disconnect");
    assert!(code.is_some(), "the server sent a close frame");

    // Once gone, the connection is no longer listed and cannot be disconnected again.
    eventually(
        Duration::from_secs(5),
        "the connection leaves the admin view",
        || async {
            let (_, body) = s.admin_get("/api/admin/stats").await;
            (body["activeConnections"] == 0 && body["activeSessions"] == 0).then_some(())
        },
    )
    .await;
    let (status, body) = s
        .admin_post(&format!("/api/admin/connections/{id}/disconnect"))
        .await;
    assert_eq!(status, 404, "second disconnect: {body}");
}

#[tokio::test]
async fn admin_sessions_list_rooms_with_members_but_nothing_stored() {
    let s = TestServer::start(&[("INSTANCE_ID", "conformance-1")]).await;
    s.put("/api/roulette/stored", &json!({"history": [7]}))
        .await;
    // A join does not create a room: this one exists only through its members.
    let mut first = s.ws().await;
    first
        .send(json!({"type": "join", "key": "waiting", "version": 0}))
        .await;
    first.recv().await;
    let mut second = s.ws().await;
    second.send(json!({"type": "join", "key": "waiting"})).await;
    second.recv().await;
    assert_eq!(
        s.get("/api/roulette/waiting").await,
        (200, json!({"key": "waiting", "history": [], "version": 0}))
    );

    let waiting = eventually(
        Duration::from_secs(5),
        "the member-only room in /api/admin/sessions",
        || async {
            let (status, body) = s.admin_get("/api/admin/sessions").await;
            assert_eq!(status, 200, "{body}");
            let room = body.as_array()?.iter().find(|r| r["key"] == "waiting")?;
            (room["activeConnections"] == 2).then(|| room.clone())
        },
    )
    .await;
    assert_shape(
        &waiting,
        &json!({
            "key": "waiting", "createdAt": "<rfc3339>", "lastActivity": "<rfc3339>", "historyLength": 0,
            "activeConnections": 2, "totalConnections": 2, "protected": false,
            "connections": "<array>",
        }),
        "admin sessions: room with members and nothing stored",
    );
    // Its times come from its members: the earliest connection, the latest activity.
    let connections = waiting["connections"].as_array().expect("connections");
    let earliest = connections
        .iter()
        .map(|c| parse_time(&c["connectedAt"]))
        .min();
    let latest = connections
        .iter()
        .map(|c| parse_time(&c["lastActivity"]))
        .max();
    assert_eq!(
        Some(parse_time(&waiting["createdAt"])),
        earliest,
        "{waiting}"
    );
    assert_eq!(
        Some(parse_time(&waiting["lastActivity"])),
        latest,
        "{waiting}"
    );

    let (_, body) = s.admin_get("/api/admin/sessions").await;
    let keys: Vec<&str> = body
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["key"].as_str())
        .collect();
    assert_eq!(keys.len(), 2, "each room once: {body}");
    assert!(keys.contains(&"stored"), "{body}");
    let (status, body) = s.admin_get("/api/admin/sessions/waiting/history").await;
    assert_eq!(status, 404, "nothing stored yet: {body}");

    // Once its members leave, the room is gone from the listing.
    first.close().await;
    second.close().await;
    eventually(
        Duration::from_secs(5),
        "the member-only room leaves the listing",
        || async {
            let (_, body) = s.admin_get("/api/admin/sessions").await;
            (!body.as_array()?.iter().any(|r| r["key"] == "waiting")).then_some(())
        },
    )
    .await;
}

/// An RFC 3339 time from a JSON string (replies may differ in precision).
fn parse_time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    let text = value.as_str().expect("a time string");
    chrono::DateTime::parse_from_rfc3339(text)
        .expect("RFC 3339")
        .to_utc()
}

#[tokio::test]
async fn admin_api_is_absent_without_admin_token() {
    // An empty ADMIN_TOKEN means "unset" (config.rs).
    let s = TestServer::start(&[("ADMIN_TOKEN", "")]).await;
    s.put("/api/roulette/r", &json!({"history": [1]})).await;
    for (method, path) in [
        (Method::GET, "/api/admin/sessions"),
        (Method::GET, "/api/admin/stats"),
        (Method::GET, "/api/admin/sessions/r/history"),
        (Method::GET, "/api/admin/migrations"),
        (Method::POST, "/api/admin/connections/abc/disconnect"),
    ] {
        for token in [Some(ADMIN_TOKEN), Some(""), None] {
            let (status, body) = s.call(method.clone(), path, token, None).await;
            assert_eq!(status, 404, "{method} {path} with {token:?}: {body}");
            assert_shape(&body, &error_body(), path);
        }
    }
}

#[tokio::test]
async fn operational_endpoints() {
    let s = TestServer::start(&[("INSTANCE_ID", "ops-1")]).await;
    let (status, health) = s.get("/health").await;
    assert_eq!(status, 200, "{health}");
    assert_shape(
        &health,
        &json!({
            "status": "ok", "timestamp": "<rfc3339>", "instance": "ops-1", "version": env!("CARGO_PKG_VERSION"),
            "checks": {"database": {"status": "up", "latency_ms": "<number>"}, "redis": "disabled"},
        }),
        "/health",
    );
    let (status, body) = s.get("/livez").await;
    assert_eq!(status, 200, "/livez: {body}");
    let (status, body) = s.get("/readyz").await;
    assert_eq!(status, 200, "/readyz: {body}");

    s.get("/api/roulette/x").await;
    let metrics = s.send(s.http.get(s.url("/metrics"))).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "Prometheus content type: {:?}",
        metrics.header("content-type")
    );
    assert!(
        metrics
            .text
            .contains("# TYPE croupier_http_requests_total counter"),
        "{}",
        metrics.text
    );
    assert!(
        metrics.text.contains("route=\"/api/roulette/{key}\""),
        "requests are counted by route template"
    );
    for line in metrics
        .text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok(),
            "not a Prometheus sample line: {line:?}"
        );
    }

    // Without CORS_ORIGINS every origin is allowed.
    let preflight = s
        .send(
            s.http
                .request(Method::OPTIONS, s.url("/api/rooms/auth"))
                .header("Origin", "http://anything.test")
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "content-type"),
        )
        .await;
    assert!(
        matches!(preflight.status, 200 | 204),
        "preflight: {preflight:?}"
    );
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some("*")
    );
}

#[tokio::test]
async fn cors_follows_cors_origins() {
    let allowed = "http://localhost:3000";
    let s = TestServer::start(&[(
        "CORS_ORIGINS",
        "http://localhost:3000, https://rooms.example",
    )])
    .await;
    let preflight = |origin: &str, method: &str, path: &str| {
        s.http
            .request(Method::OPTIONS, s.url(path))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", method)
            .header(
                "Access-Control-Request-Headers",
                "content-type,authorization",
            )
    };
    for (origin, method, path) in [
        (allowed, "POST", "/api/rooms/auth"),
        (allowed, "PUT", "/api/roulette/r"),
        ("https://rooms.example", "GET", "/api/roulette/sessions"),
        ("https://rooms.example", "DELETE", "/api/roulette/r"),
    ] {
        let reply = s.send(preflight(origin, method, path)).await;
        let context = format!("preflight {method} {path} from {origin}: {reply:?}");
        assert!(matches!(reply.status, 200 | 204), "{context}");
        assert_eq!(
            reply.header("access-control-allow-origin").as_deref(),
            Some(origin),
            "{context}"
        );
        let methods = reply
            .header("access-control-allow-methods")
            .unwrap_or_default()
            .to_ascii_uppercase();
        for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
            assert!(methods.contains(m), "{context}: allow-methods lacks {m}");
        }
        let headers = reply
            .header("access-control-allow-headers")
            .unwrap_or_default()
            .to_ascii_lowercase();
        for h in ["content-type", "authorization"] {
            assert!(headers.contains(h), "{context}: allow-headers lacks {h}");
        }
    }
    for origin in [
        "http://evil.test",
        "http://localhost:3001",
        "https://rooms.example.evil.test",
    ] {
        let reply = s.send(preflight(origin, "POST", "/api/rooms/auth")).await;
        assert_eq!(
            reply.header("access-control-allow-origin"),
            None,
            "preflight from {origin} must not be allowed: {reply:?}"
        );
        let actual = s
            .send(
                s.http
                    .get(s.url("/api/roulette/r"))
                    .header("Origin", origin),
            )
            .await;
        assert_eq!(
            actual.header("access-control-allow-origin"),
            None,
            "GET from {origin}: {actual:?}"
        );
    }
    let actual = s
        .send(
            s.http
                .get(s.url("/api/roulette/r"))
                .header("Origin", allowed),
        )
        .await;
    assert_eq!(actual.status, 200);
    assert_eq!(
        actual.header("access-control-allow-origin").as_deref(),
        Some(allowed)
    );

    // WebSocket handshakes: allowed origin (with or without a trailing slash), no
    // origin (non-browser clients), and a refused origin.
    for headers in [
        vec![("Origin", allowed)],
        vec![("Origin", "http://localhost:3000/")],
        vec![],
    ] {
        let mut ws = s
            .ws_with_headers(&headers)
            .await
            .unwrap_or_else(|e| panic!("handshake with {headers:?} refused: {e:?}"));
        ws.send(json!({"type": "ping"})).await;
        assert_eq!(ws.recv().await, json!({"type": "pong"}));
    }
    for origin in ["http://evil.test", "null"] {
        let refused = match s.ws_with_headers(&[("Origin", origin)]).await {
            Ok(_) => panic!("a WebSocket from {origin} must be refused"),
            Err(refused) => refused,
        };
        let status = refused.status.expect("an HTTP refusal");
        assert!((400..500).contains(&status), "refusal status {status}");
        let body: Value = serde_json::from_str(&refused.body)
            .unwrap_or_else(|_| panic!("non-JSON refusal {:?}", refused.body));
        assert_shape(&body, &error_body(), "refused handshake");
    }
}

// ---------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn join_and_get_history_in_each_dialect() {
    let s = TestServer::start(&[]).await;
    let (_, put) = s
        .put("/api/roulette/r", &json!({"history": [5, "00"]}))
        .await;
    let epoch = put["data"]["epoch"].clone();
    assert!(epoch.is_string(), "{put}");

    #[rustfmt::skip]
    let rows: Vec<(&str, Value, Value)> = vec![
        (
            "join v2 (version 0)",
            json!({"type": "join", "key": "r", "version": 0}),
            json!({"type": "sync", "key": "r", "history": [5, "00"], "full": true, "version": 1, "epoch": epoch}),
        ),
        (
            "join v1 (no version)",
            json!({"type": "join", "key": "r"}),
            json!({"type": "sync", "key": "r", "history": [5, "00"]}),
        ),
        (
            "join v2 with a null version",
            json!({"type": "join", "key": "r", "version": null}),
            json!({"type": "sync", "key": "r", "history": [5, "00"], "full": true, "version": 1, "epoch": epoch}),
        ),
        (
            "getHistory (seed)",
            json!({"type": "getHistory", "key": "r"}),
            json!({"type": "historyUpdate", "key": "r", "history": [5, "00"]}),
        ),
        (
            "join v2 on a room that does not exist yet",
            json!({"type": "join", "key": "new", "version": 0}),
            json!({"type": "sync", "key": "new", "history": [], "full": true, "version": 0, "epoch": "<string|null>"}),
        ),
        ("join v1 on a room that does not exist yet", json!({"type": "join", "key": "new"}), json!({"type": "sync", "key": "new", "history": []})),
        ("getHistory of a room that does not exist yet", json!({"type": "getHistory", "key": "new2"}), json!({"type": "historyUpdate", "key": "new2", "history": []})),
        ("ping", json!({"type": "ping"}), json!({"type": "pong"})),
    ];
    for (what, message, reply) in rows {
        let mut ws = s.ws().await;
        ws.send(message.clone()).await;
        expect_frame(&mut ws, &reply, what).await;
        ws.expect_silence(Duration::from_millis(100)).await;
    }
    // Joining creates nothing.
    assert_eq!(s.get("/api/roulette/new").await, (200, unknown_room("new")));
    let (_, list) = s.get("/api/roulette/sessions").await;
    assert_eq!(list["total"], 1, "{list}");
}

#[tokio::test]
async fn every_dialect_sees_every_mutation() {
    let s = TestServer::start(&[]).await;
    let (_, put) = s.put("/api/roulette/t", &json!({"history": []})).await;
    let epoch = put["data"]["epoch"].clone();

    let mut members = Dialects::join(&s, "t", &epoch).await;

    // (sender, message, what v2 sees, what v1 sees, what seed sees)
    #[rustfmt::skip]
    let table: Vec<DialectRow> = vec![
        (
            Sender::V2,
            json!({"type": "add", "number": 17}),
            json!({"type": "add", "key": "t", "number": 17, "version": 2}),
            json!({"type": "sync", "key": "t", "history": [17]}),
            json!({"type": "numberSaved", "key": "t", "number": 17, "history": [17]}),
        ),
        (
            Sender::V2,
            json!({"type": "add", "key": "t", "number": "00"}),
            json!({"type": "add", "key": "t", "number": "00", "version": 3}),
            json!({"type": "sync", "key": "t", "history": [17, "00"]}),
            json!({"type": "numberSaved", "key": "t", "number": "00", "history": [17, "00"]}),
        ),
        (
            Sender::V1,
            json!({"type": "add", "key": "t", "number": 0}),
            json!({"type": "add", "key": "t", "number": 0, "version": 4}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0]}),
            json!({"type": "numberSaved", "key": "t", "number": 0, "history": [17, "00", 0]}),
        ),
        (
            Sender::Seed,
            json!({"type": "saveNumber", "key": "t", "number": 36}),
            json!({"type": "add", "key": "t", "number": 36, "version": 5}),
            json!({"type": "sync", "key": "t", "history": [17, "00", 0, 36]}),
            json!({"type": "numberSaved", "key": "t", "number": 36, "history": [17, "00", 0, 36]}),
        ),
        (
            Sender::V2,
            json!({"type": "remove", "index": 1}),
            json!({"type": "remove", "key": "t", "index": 1, "version": 6}),
            json!({"type": "sync", "key": "t", "history": [17, 0, 36]}),
            json!({"type": "historyUpdated", "key": "t", "history": [17, 0, 36]}),
        ),
        (
            Sender::V1,
            json!({"type": "remove", "key": "t", "index": 0}),
            json!({"type": "remove", "key": "t", "index": 0, "version": 7}),
            json!({"type": "sync", "key": "t", "history": [0, 36]}),
            json!({"type": "historyUpdated", "key": "t", "history": [0, 36]}),
        ),
        (
            Sender::V2,
            json!({"type": "update", "history": [5, "00", 36]}),
            json!({"type": "sync", "key": "t", "history": [5, "00", 36], "full": true, "version": 8}),
            json!({"type": "sync", "key": "t", "history": [5, "00", 36]}),
            json!({"type": "historyUpdated", "key": "t", "history": [5, "00", 36]}),
        ),
        (
            Sender::Seed,
            json!({"type": "updateHistory", "key": "t", "history": [1]}),
            json!({"type": "sync", "key": "t", "history": [1], "full": true, "version": 9}),
            json!({"type": "sync", "key": "t", "history": [1]}),
            json!({"type": "historyUpdated", "key": "t", "history": [1]}),
        ),
        (
            Sender::HttpSave,
            json!({"key": "t", "number": "00"}),
            json!({"type": "add", "key": "t", "number": "00", "version": 10}),
            json!({"type": "sync", "key": "t", "history": [1, "00"]}),
            json!({"type": "numberSaved", "key": "t", "number": "00", "history": [1, "00"]}),
        ),
        (
            Sender::HttpPut,
            json!({"history": [2, 3]}),
            json!({"type": "sync", "key": "t", "history": [2, 3], "full": true, "version": 11}),
            json!({"type": "sync", "key": "t", "history": [2, 3]}),
            json!({"type": "historyUpdated", "key": "t", "history": [2, 3]}),
        ),
        (
            Sender::V2,
            json!({"type": "add", "number": 15.0}),
            json!({"type": "add", "key": "t", "number": 15, "version": 12}),
            json!({"type": "sync", "key": "t", "history": [2, 3, 15]}),
            json!({"type": "numberSaved", "key": "t", "number": 15, "history": [2, 3, 15]}),
        ),
        (
            Sender::Seed,
            json!({"type": "saveNumber", "key": "t", "number": "00"}),
            json!({"type": "add", "key": "t", "number": "00", "version": 13}),
            json!({"type": "sync", "key": "t", "history": [2, 3, 15, "00"]}),
            json!({"type": "numberSaved", "key": "t", "number": "00", "history": [2, 3, 15, "00"]}),
        ),
        (
            Sender::V1,
            json!({"type": "update", "key": "t", "history": []}),
            json!({"type": "sync", "key": "t", "history": [], "full": true, "version": 14}),
            json!({"type": "sync", "key": "t", "history": []}),
            json!({"type": "historyUpdated", "key": "t", "history": []}),
        ),
    ];
    members.run(&s, table).await;
    assert_eq!(s.room("t").await, (json!([]), 14));
}

#[tokio::test]
async fn save_number_and_update_history_subscribe_as_seed() {
    let s = TestServer::start(&[]).await;
    let mut seed = s.ws().await;
    seed.send(json!({"type": "saveNumber", "key": "doc", "number": 4}))
        .await;
    expect_frame(
        &mut seed,
        &json!({"type": "numberSaved", "key": "doc", "number": 4, "history": [4]}),
        "saveNumber creates and subscribes",
    )
    .await;
    let mut seed2 = s.ws().await;
    seed2
        .send(json!({"type": "updateHistory", "key": "doc", "history": [4, 5]}))
        .await;
    for ws in [&mut seed, &mut seed2] {
        expect_frame(
            ws,
            &json!({"type": "historyUpdated", "key": "doc", "history": [4, 5]}),
            "updateHistory",
        )
        .await;
    }
    s.post("/api/roulette/save", &json!({"key": "doc", "number": 6}))
        .await;
    for ws in [&mut seed, &mut seed2] {
        expect_frame(
            ws,
            &json!({"type": "numberSaved", "key": "doc", "number": 6, "history": [4, 5, 6]}),
            "both are subscribed",
        )
        .await;
        ws.expect_silence(QUIET).await;
    }
    assert_eq!(s.room("doc").await, (json!([4, 5, 6]), 3));
}

#[tokio::test]
async fn mutation_ids_are_echoed_and_applied_once() {
    let s = TestServer::start(&[]).await;
    s.put("/api/roulette/m", &json!({"history": []})).await;
    let mut v2 = s.ws().await;
    v2.send(json!({"type": "join", "key": "m", "version": 0}))
        .await;
    v2.recv().await;
    let mut v1 = s.ws().await;
    v1.send(json!({"type": "join", "key": "m"})).await;
    v1.recv().await;

    v2.send(json!({"type": "add", "number": 7, "id": "click-1"}))
        .await;
    expect_frame(
        &mut v2,
        &json!({"type": "add", "key": "m", "number": 7, "version": 2, "id": "click-1"}),
        "add with id",
    )
    .await;
    expect_frame(
        &mut v1,
        &json!({"type": "sync", "key": "m", "history": [7], "id": "click-1"}),
        "v1 event carries the id",
    )
    .await;

    // A retry with the same id changes nothing and produces no event.
    v2.send(json!({"type": "add", "number": 7, "id": "click-1"}))
        .await;
    v2.expect_silence(QUIET).await;
    v1.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(s.room("m").await, (json!([7]), 2));

    v2.send(json!({"type": "remove", "index": 0, "id": "click-2"}))
        .await;
    expect_frame(
        &mut v2,
        &json!({"type": "remove", "key": "m", "index": 0, "version": 3, "id": "click-2"}),
        "remove with id",
    )
    .await;
    expect_frame(
        &mut v1,
        &json!({"type": "sync", "key": "m", "history": [], "id": "click-2"}),
        "v1 remove with id",
    )
    .await;
    v2.send(json!({"type": "update", "history": [1, 2], "id": "click-3"}))
        .await;
    expect_frame(&mut v2, &json!({"type": "sync", "key": "m", "history": [1, 2], "full": true, "version": 4, "id": "click-3"}), "update with id").await;
    expect_frame(
        &mut v1,
        &json!({"type": "sync", "key": "m", "history": [1, 2], "id": "click-3"}),
        "v1 update with id",
    )
    .await;

    // HTTP retries are safe too, and the WebSocket members see the event once.
    for attempt in 0..2 {
        let (status, body) = s
            .post(
                "/api/roulette/save",
                &json!({"key": "m", "number": 9, "id": "http-1"}),
            )
            .await;
        assert_eq!(status, 200, "attempt {attempt}: {body}");
        assert_shape(
            &body,
            &saved("m", json!([1, 2, 9]), 5, false),
            &format!("save attempt {attempt}"),
        );
    }
    expect_frame(
        &mut v2,
        &json!({"type": "add", "key": "m", "number": 9, "version": 5, "id": "http-1"}),
        "HTTP save with id",
    )
    .await;
    v2.expect_silence(QUIET).await;
    expect_frame(
        &mut v1,
        &json!({"type": "sync", "key": "m", "history": [1, 2, 9], "id": "http-1"}),
        "v1 HTTP save",
    )
    .await;
    v1.expect_silence(Duration::from_millis(50)).await;

    // Ids are per room.
    v2.send(json!({"type": "join", "key": "m2", "version": 0}))
        .await;
    v2.recv().await;
    v2.send(json!({"type": "add", "key": "m2", "number": 1, "id": "click-1"}))
        .await;
    expect_frame(
        &mut v2,
        &json!({"type": "add", "key": "m2", "number": 1, "version": 1, "id": "click-1"}),
        "same id, other room",
    )
    .await;
    assert_eq!(s.room("m").await, (json!([1, 2, 9]), 5));
}

#[tokio::test]
async fn leave_stops_delivery() {
    let s = TestServer::start(&[]).await;
    let mut ws = s.ws().await;
    ws.send(json!({"type": "join", "key": "a", "version": 0}))
        .await;
    ws.recv().await;
    ws.send(json!({"type": "join", "key": "b", "version": 0}))
        .await;
    ws.recv().await;
    s.post("/api/roulette/save", &json!({"key": "a", "number": 1}))
        .await;
    expect_frame(
        &mut ws,
        &json!({"type": "add", "key": "a", "number": 1, "version": 1}),
        "member of a",
    )
    .await;

    ws.send(json!({"type": "leave", "key": "a"})).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(
        ws.recv().await,
        json!({"type": "pong"}),
        "leave has no reply"
    );
    s.post("/api/roulette/save", &json!({"key": "a", "number": 2}))
        .await;
    s.post("/api/roulette/save", &json!({"key": "b", "number": 3}))
        .await;
    expect_frame(
        &mut ws,
        &json!({"type": "add", "key": "b", "number": 3, "version": 1}),
        "still a member of b",
    )
    .await;
    ws.expect_silence(QUIET).await;

    ws.send(json!({"type": "add", "key": "a", "number": 4}))
        .await;
    expect_frame(
        &mut ws,
        &json!({"type": "error", "error": "<string>", "code": "not_joined"}),
        "a mutation after leave",
    )
    .await;
    assert_eq!(s.room("a").await, (json!([1, 2]), 2));
}

#[tokio::test]
async fn protected_room_over_websocket() {
    let s = TestServer::start(&[]).await;
    let token = s.token("vault", "pw").await;
    let other = s.token("open", "").await;
    s.call(
        Method::PUT,
        "/api/roulette/vault",
        Some(&token),
        Some(&json!({"history": [3]})),
    )
    .await;
    let auth_required = json!({"type": "authRequired", "key": "vault", "error": "<string>"});

    let mut guest = s.ws().await;
    for (what, message) in [
        (
            "join without token",
            json!({"type": "join", "key": "vault", "version": 0}),
        ),
        (
            "v1 join without token",
            json!({"type": "join", "key": "vault"}),
        ),
        (
            "join with another room's token",
            json!({"type": "join", "key": "vault", "version": 0, "token": other}),
        ),
        (
            "getHistory without token",
            json!({"type": "getHistory", "key": "vault"}),
        ),
    ] {
        guest.send(message).await;
        expect_frame(&mut guest, &auth_required, what).await;
    }
    // Not subscribed: events do not reach it, and it cannot mutate through the room.
    s.call(
        Method::POST,
        "/api/roulette/save",
        Some(&token),
        Some(&json!({"key": "vault", "number": 4})),
    )
    .await;
    guest.expect_silence(QUIET).await;
    guest
        .send(json!({"type": "add", "key": "vault", "number": 5}))
        .await;
    expect_frame(
        &mut guest,
        &json!({"type": "error", "error": "<string>", "code": "not_joined"}),
        "add after authRequired",
    )
    .await;

    let mut member = s.ws().await;
    member
        .send(json!({"type": "join", "key": "vault", "version": 0, "token": token}))
        .await;
    expect_frame(&mut member, &json!({"type": "sync", "key": "vault", "history": [3, 4], "full": true, "version": 2, "epoch": "<string>"}), "join with token").await;
    member.send(json!({"type": "add", "number": 5})).await;
    expect_frame(
        &mut member,
        &json!({"type": "add", "key": "vault", "number": 5, "version": 3}),
        "member adds",
    )
    .await;
    let mut reader = s.ws().await;
    reader
        .send(json!({"type": "getHistory", "key": "vault", "token": token}))
        .await;
    expect_frame(
        &mut reader,
        &json!({"type": "historyUpdate", "key": "vault", "history": [3, 4, 5]}),
        "getHistory with token",
    )
    .await;
    guest.expect_silence(Duration::from_millis(50)).await;
    assert_eq!(
        s.get_with_token("/api/roulette/vault", &token).await.1["version"],
        3
    );
}

/// The current frontend's observed flow, cross-origin in development: tokenless
/// join at once, `/api/rooms/auth` with an empty password behind a preflight,
/// then close 4000 and reconnect with `join` + token, resuming from its version.
#[tokio::test]
async fn frontend_flow_with_resume() {
    let origin = "http://localhost:3000";
    let s = TestServer::start(&[("CORS_ORIGINS", origin)]).await;
    let mut socket = s
        .ws_with_headers(&[("Origin", origin)])
        .await
        .expect("handshake from the page origin");
    socket
        .send(json!({"type": "join", "key": "front", "version": 0}))
        .await;
    expect_frame(&mut socket, &json!({"type": "sync", "key": "front", "history": [], "full": true, "version": 0, "epoch": "<string|null>"}), "tokenless join").await;

    let preflight = s
        .send(
            s.http
                .request(Method::OPTIONS, s.url("/api/rooms/auth"))
                .header("Origin", origin)
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", "content-type"),
        )
        .await;
    assert!(matches!(preflight.status, 200 | 204), "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    let auth = s
        .send(
            s.http
                .post(s.url("/api/rooms/auth"))
                .header("Origin", origin)
                .json(&json!({"key": "front", "password": ""})),
        )
        .await;
    assert_eq!(auth.status, 200, "{auth:?}");
    assert_eq!(
        auth.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    let token = auth.json()["token"].as_str().expect("token").to_owned();

    // The unprotected room already works on the tokenless socket; the click is
    // echoed with exactly the value sent.
    socket.send(json!({"type": "add", "number": 17})).await;
    expect_frame(
        &mut socket,
        &json!({"type": "add", "key": "front", "number": 17, "version": 1}),
        "echo of the click",
    )
    .await;
    socket.send(json!({"type": "add", "number": "00"})).await;
    expect_frame(
        &mut socket,
        &json!({"type": "add", "key": "front", "number": "00", "version": 2}),
        "echo of 00",
    )
    .await;
    socket.close_with(4000, "token arrived").await;

    // Meanwhile another table writes.
    s.post("/api/roulette/save", &json!({"key": "front", "number": 3}))
        .await;
    s.post("/api/roulette/save", &json!({"key": "front", "number": 4}))
        .await;
    let (_, room) = s.get("/api/roulette/front").await;
    let epoch = room["epoch"].as_str().expect("epoch").to_owned();

    let resume = |version: u64, epoch: Option<&str>| {
        let mut join = json!({"type": "join", "key": "front", "version": version, "token": token});
        if let Some(e) = epoch {
            join["epoch"] = json!(e);
        }
        join
    };
    let full_sync = json!({"type": "sync", "key": "front", "history": [17, "00", 3, 4], "full": true, "version": 4, "epoch": epoch});
    let recovered = json!({"type": "recovered", "key": "front", "version": 4, "epoch": epoch});
    #[rustfmt::skip]
    let rows: Vec<(&str, Value, Vec<Value>)> = vec![
        (
            "resume from version 2 with the epoch",
            resume(2, Some(&epoch)),
            vec![
                json!({"type": "add", "key": "front", "number": 3, "version": 3}),
                json!({"type": "add", "key": "front", "number": 4, "version": 4}),
                recovered.clone(),
            ],
        ),
        (
            "resume without an epoch",
            resume(3, None),
            vec![json!({"type": "add", "key": "front", "number": 4, "version": 4}), recovered.clone()],
        ),
        ("resume at the current version", resume(4, Some(&epoch)), vec![recovered.clone()]),
        ("resume with a stale epoch", resume(2, Some("0000000000000000")), vec![full_sync.clone()]),
        ("resume from a version ahead of the room", resume(9, Some(&epoch)), vec![full_sync.clone()]),
    ];
    for (what, join, frames) in rows {
        let mut ws = s
            .ws_with_headers(&[("Origin", origin)])
            .await
            .expect("reconnect");
        ws.send(join).await;
        for (i, frame) in frames.iter().enumerate() {
            expect_frame(&mut ws, frame, &format!("{what}, frame {i}")).await;
        }
        ws.expect_silence(Duration::from_millis(150)).await;
    }
}

/// The OpenAPI document lists every route of the contract with its replies.
#[tokio::test]
async fn the_openapi_document_covers_the_http_contract() {
    let s = TestServer::start(&[]).await;
    let (status, document) = s.get("/api/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(document["openapi"], "3.1.0");
    let expected: &[(&str, &str, &[&str])] = &[
        ("/api/roulette/{key}", "get", &["200", "400", "401", "503"]),
        (
            "/api/roulette/{key}",
            "put",
            &["200", "400", "401", "413", "415", "429", "503"],
        ),
        (
            "/api/roulette/save",
            "post",
            &["200", "400", "401", "413", "415", "429", "503"],
        ),
        ("/api/roulette/sessions", "get", &["200", "400", "503"]),
        (
            "/api/rooms/auth",
            "post",
            &["200", "400", "401", "413", "415", "429", "503"],
        ),
        ("/api/admin/sessions", "get", &["200", "401", "404", "503"]),
        ("/api/admin/stats", "get", &["200", "401", "404", "503"]),
        (
            "/api/admin/sessions/{key}/history",
            "get",
            &["200", "400", "401", "404", "503"],
        ),
        (
            "/api/admin/connections/{id}/disconnect",
            "post",
            &["200", "401", "404", "503"],
        ),
        (
            "/api/admin/migrations",
            "get",
            &["200", "401", "404", "503"],
        ),
        ("/api/openapi.json", "get", &["200"]),
        ("/health", "get", &["200", "503"]),
        ("/livez", "get", &["200"]),
        ("/readyz", "get", &["200", "503"]),
        ("/metrics", "get", &["200"]),
        ("/ws", "get", &["101", "400", "401", "429", "503"]),
    ];
    for (path, method, statuses) in expected {
        let responses = &document["paths"][path][method]["responses"];
        for status in *statuses {
            assert!(
                responses.get(status).is_some(),
                "{method} {path} documents {status}: {responses}"
            );
        }
    }
    let paths = document["paths"].as_object().expect("paths").len();
    assert_eq!(paths, 15, "no undocumented or unexpected paths");
    let error = &document["components"]["schemas"]["ErrorBody"];
    assert_eq!(error["required"], json!(["success", "error"]));
}
