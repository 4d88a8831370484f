//! Server → client frames, rendered once per dialect and shared by every member
//! that speaks it (a frame is a reference-counted `Utf8Bytes`, so fan-out to ten
//! thousand members clones a pointer, not a string).

use axum::extract::ws::Utf8Bytes;
use serde_json::{Value, json};

use crate::domain::{Change, History, RoomEvent, RoomKey, Version};

/// A rendered text frame.
pub type Frame = Utf8Bytes;

/// How a room membership wants its events rendered (see PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Current frontend: `join` with a `version` field.
    V2,
    /// Node-era frontend: `join` without `version`; every event is a full `sync`.
    V1,
    /// Migration document: `getHistory` / `saveNumber` / `updateHistory`.
    Seed,
}

fn frame(value: Value) -> Frame {
    Utf8Bytes::from(value.to_string())
}

/// Full state for a v2 member (on join, resync, or a fallback from a failed resume).
pub fn sync_v2(key: &RoomKey, history: &History, version: Version, epoch: Option<&str>) -> Frame {
    frame(json!({
        "type": "sync", "key": key, "history": history, "full": true,
        "version": version, "epoch": epoch,
    }))
}

/// Full state in the Node-era shape.
pub fn sync_v1(key: &RoomKey, history: &History) -> Frame {
    frame(json!({"type": "sync", "key": key, "history": history}))
}

/// Reply to the migration document's `getHistory`.
pub fn history_update(key: &RoomKey, history: &History) -> Frame {
    frame(json!({"type": "historyUpdate", "key": key, "history": history}))
}

/// Full state in a member's dialect; `None` for seed members, whose resync is a
/// `historyUpdated` frame.
pub fn full_state(
    dialect: Dialect,
    key: &RoomKey,
    history: &History,
    version: Version,
    epoch: Option<&str>,
) -> Frame {
    match dialect {
        Dialect::V2 => sync_v2(key, history, version, epoch),
        Dialect::V1 => sync_v1(key, history),
        Dialect::Seed => frame(json!({"type": "historyUpdated", "key": key, "history": history})),
    }
}

/// The `type` of [`full_state`]'s frame, for the sent-messages metric.
pub fn full_state_type(dialect: Dialect) -> &'static str {
    match dialect {
        Dialect::V2 | Dialect::V1 => "sync",
        Dialect::Seed => "historyUpdated",
    }
}

pub fn recovered(key: &RoomKey, version: Version, epoch: Option<&str>) -> Frame {
    frame(json!({"type": "recovered", "key": key, "version": version, "epoch": epoch}))
}

pub fn pong() -> Frame {
    Utf8Bytes::from_static(r#"{"type":"pong"}"#)
}

pub fn error(code: &str, message: &str) -> Frame {
    frame(json!({"type": "error", "error": message, "code": code}))
}

pub fn auth_required(key: &RoomKey, message: &str) -> Frame {
    frame(json!({"type": "authRequired", "key": key, "error": message}))
}

/// Renders a committed event for one dialect. `history` is the room's history
/// right after the event (v1 and seed frames carry it).
pub fn event(dialect: Dialect, event: &RoomEvent, history: &History) -> Frame {
    let key = &event.key;
    let mut value = match (dialect, &event.change) {
        (Dialect::V2, Change::Added(n)) => {
            json!({"type": "add", "key": key, "number": n, "version": event.version})
        }
        (Dialect::V2, Change::Removed(i)) => {
            json!({"type": "remove", "key": key, "index": i, "version": event.version})
        }
        (Dialect::V2, Change::Replaced(h)) => {
            json!({"type": "sync", "key": key, "history": h, "full": true, "version": event.version})
        }
        (Dialect::V1, _) => json!({"type": "sync", "key": key, "history": history}),
        (Dialect::Seed, Change::Added(n)) => {
            json!({"type": "numberSaved", "key": key, "number": n, "history": history})
        }
        (Dialect::Seed, _) => json!({"type": "historyUpdated", "key": key, "history": history}),
    };
    if let (Some(id), Value::Object(map)) = (&event.mutation_id, &mut value) {
        map.insert("id".into(), Value::from(id.as_str()));
    }
    frame(value)
}

/// The `type` of a rendered frame, for the sent-messages metric.
pub fn frame_type(dialect: Dialect, change: &Change) -> &'static str {
    match (dialect, change) {
        (Dialect::V2, Change::Added(_)) => "add",
        (Dialect::V2, Change::Removed(_)) => "remove",
        (Dialect::V2 | Dialect::V1, _) => "sync",
        (Dialect::Seed, Change::Added(_)) => "numberSaved",
        (Dialect::Seed, _) => "historyUpdated",
    }
}
