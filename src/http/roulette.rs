//! `/api/roulette`: read, append, replace and list rooms (the HTTP paths say
//! "session" for historical reasons).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery, BearerToken, JsonObject};
use crate::domain::{Change, History, MutationId, Number, Room, RoomKey};
use crate::state::AppState;
use crate::store::Page;

fn rfc3339(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The Session object of the wire contract (never with a password or hash),
/// serialized straight from the room: a save answers with the whole history,
/// and building a `Value` tree of it first costs an allocation per number.
#[derive(Serialize)]
struct Session<'a> {
    id: i64,
    key: &'a RoomKey,
    history: &'a History,
    created_at: String,
    updated_at: String,
    version: u64,
    epoch: &'a str,
    protected: bool,
}

impl<'a> Session<'a> {
    fn of(room: &'a Room) -> Self {
        Session {
            id: room.id,
            key: &room.key,
            history: &room.history,
            created_at: rfc3339(&room.created_at),
            updated_at: rfc3339(&room.updated_at),
            version: room.version,
            epoch: &room.epoch,
            protected: room.protected,
        }
    }
}

/// `{"success": true, "data": Session}`
#[derive(Serialize)]
struct Saved<'a> {
    success: bool,
    data: Session<'a>,
}

fn saved(room: &Room) -> Response {
    Json(Saved {
        success: true,
        data: Session::of(room),
    })
    .into_response()
}

fn mutation_id(body: &JsonObject) -> Result<Option<MutationId>, ApiError> {
    body.0
        .get("id")
        .map(|v| MutationId::from_json(v).map_err(ApiError::bad_request))
        .transpose()
}

/// `GET /api/roulette/{key}`
pub async fn get_room(
    State(state): State<AppState>,
    ApiPath(raw_key): ApiPath<String>,
    BearerToken(token): BearerToken,
) -> Result<Response, ApiError> {
    let key = RoomKey::parse(&raw_key)?;
    Ok(match state.rooms.read(&key, token.as_deref()).await? {
        // Rendered once per version, shared by every reader.
        Some(snapshot) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            snapshot.body(&key),
        )
            .into_response(),
        None => Json(json!({"key": key, "history": [], "version": 0})).into_response(),
    })
}

/// `POST /api/roulette/save` with `{"key", "number"}`
pub async fn save(
    State(state): State<AppState>,
    BearerToken(token): BearerToken,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let key = RoomKey::from_json(body.field("key")?)?;
    let number = Number::from_json(body.field("number")?)?;
    let id = mutation_id(&body)?;
    state.rooms.authorize(&key, token.as_deref()).await?;
    let applied = state.rooms.mutate(key, Change::Added(number), id).await?;
    Ok(saved(&applied.room))
}

/// `PUT /api/roulette/{key}` with `{"history": [..]}`; a `key` in the body is ignored.
pub async fn replace(
    State(state): State<AppState>,
    ApiPath(raw_key): ApiPath<String>,
    BearerToken(token): BearerToken,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let key = RoomKey::parse(&raw_key)?;
    let history = History::from_json(body.field("history")?, state.config.max_history)?;
    let id = mutation_id(&body)?;
    state.rooms.authorize(&key, token.as_deref()).await?;
    let applied = state
        .rooms
        .mutate(key, Change::Replaced(history), id)
        .await?;
    Ok(saved(&applied.room))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    limit: Option<String>,
    offset: Option<String>,
    include: Option<String>,
}

/// `GET /api/roulette/sessions?limit=&offset=&include=history`
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = match query.limit.as_deref() {
        None | Some("") => 100,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| *l > 0)
            .ok_or_else(|| ApiError::bad_request("limit must be a positive integer"))?
            .min(1000),
    };
    let offset = match query.offset.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw
            .parse::<u64>()
            .map_err(|_| ApiError::bad_request("offset must be a non-negative integer"))?,
    };
    let include_history = match query.include.as_deref() {
        None | Some("") => false,
        Some("history") => true,
        Some(_) => return Err(ApiError::bad_request("include may only be \"history\"")),
    };
    let (rooms, total) = state
        .store()
        .list_rooms(Page {
            limit,
            offset,
            include_history,
        })
        .await?;
    let sessions: Vec<Value> = rooms
        .iter()
        .map(|r| {
            let created = rfc3339(&r.created_at);
            let updated = rfc3339(&r.updated_at);
            let mut summary = json!({
                "id": r.id, "key": r.key, "historyLength": r.history_length,
                "created_at": created, "updated_at": updated,
                "createdAt": created, "lastActivity": updated, "protected": r.protected,
            });
            // A protected room's numbers are not readable without its token.
            if let (Some(history), false) = (&r.history, r.protected) {
                summary["history"] = json!(history);
            }
            summary
        })
        .collect();
    Ok(Json(json!({"sessions": sessions, "total": total})))
}
