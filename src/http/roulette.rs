//! `/api/roulette`: read, append, replace and list rooms (the HTTP paths say
//! "session" for historical reasons).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::extract::{ApiPath, ApiQuery, BearerToken, ClientIp, JsonObject};
use super::openapi::{ErrorBody, WriteRefusals};
use crate::domain::{Change, History, MutationId, Number, RoomKey, Version};
use crate::hub::{RoomBody, Saved as SavedRoom};
use crate::rooms::Writer;
use crate::state::AppState;
use crate::store::{Page, RoomSummary};

fn rfc3339(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The Session object of the wire contract (never with a password or hash),
/// serialized straight from the room: a save answers with the whole history,
/// and building a `Value` tree of it first costs an allocation per number.
#[derive(Serialize, ToSchema)]
struct Session<'a> {
    id: i64,
    key: &'a RoomKey,
    #[schema(value_type = History)]
    history: &'a [Number],
    /// RFC 3339, milliseconds, UTC.
    created_at: String,
    updated_at: String,
    #[schema(value_type = u64)]
    version: Version,
    epoch: &'a str,
    protected: bool,
}

impl<'a> Session<'a> {
    fn of(key: &'a RoomKey, room: &'a SavedRoom) -> Self {
        Session {
            id: room.id,
            key,
            history: room.history(),
            created_at: rfc3339(&room.created_at),
            updated_at: rfc3339(&room.updated_at),
            version: room.version,
            epoch: &room.epoch,
            protected: room.protected,
        }
    }
}

/// `{"success": true, "data": Session}`
#[derive(Serialize, ToSchema)]
struct Saved<'a> {
    success: bool,
    data: Session<'a>,
}

/// The reply to a save or replace: the room right after the writer's change.
///
/// The body is [`Saved`] with [`Session`], field for field, but its history
/// is copied from the rendering the writers of one batch share
/// ([`SavedRoom::write_history_json`]): serializing a long history for every
/// writer would make a save cost more the longer the room's history is.
fn saved(key: &RoomKey, room: &SavedRoom) -> Response {
    let session = Session::of(key, room);
    let mut body = Vec::with_capacity(session.history.len() * 3 + 256);
    body.extend_from_slice(br#"{"success":true,"data":{"id":"#);
    body.extend_from_slice(session.id.to_string().as_bytes());
    body.extend_from_slice(br#","key":"#);
    push_json(&mut body, session.key.as_str());
    body.extend_from_slice(br#","history":"#);
    room.write_history_json(&mut body);
    body.extend_from_slice(br#","created_at":"#);
    push_json(&mut body, &session.created_at);
    body.extend_from_slice(br#","updated_at":"#);
    push_json(&mut body, &session.updated_at);
    body.extend_from_slice(br#","version":"#);
    body.extend_from_slice(session.version.to_string().as_bytes());
    body.extend_from_slice(br#","epoch":"#);
    push_json(&mut body, session.epoch);
    body.extend_from_slice(br#","protected":"#);
    body.extend_from_slice(if session.protected { b"true" } else { b"false" });
    body.extend_from_slice(b"}}");
    (
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(body),
    )
        .into_response()
}

/// Appends `text` as a JSON string.
fn push_json(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

fn mutation_id(body: &JsonObject) -> Result<Option<MutationId>, ApiError> {
    body.0
        .get("id")
        .map(|v| MutationId::from_json(v).map_err(ApiError::from))
        .transpose()
}

/// The body of `POST /api/roulette/save`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the shape; the handler reads the fields one by one
struct SaveRequest {
    key: RoomKey,
    number: Number,
    /// Mutation id: a retry with the same id within 10 minutes is applied once.
    #[schema(min_length = 1, max_length = 64)]
    id: Option<String>,
}

/// The body of `PUT /api/roulette/{key}` (a `key` in it is ignored).
#[derive(ToSchema)]
#[allow(dead_code)] // documents the shape; the handler reads the fields one by one
struct ReplaceRequest {
    history: History,
    #[schema(min_length = 1, max_length = 64)]
    id: Option<String>,
}

/// `GET /api/roulette/{key}`
#[utoipa::path(
    get,
    path = "/api/roulette/{key}",
    tag = "rooms",
    params(("key" = RoomKey, Path, description = "The room's key")),
    security((), ("room_token" = [])),
    responses(
        (status = 200, description = "The room; a room never created reads as empty, version 0, without an epoch", body = RoomBody),
        (status = 400, description = "Invalid key", body = ErrorBody),
        (status = 401, description = "Protected room without a valid token", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
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
        None => Json(RoomBody {
            key: &key,
            history: &History::default(),
            version: Version::ZERO,
            epoch: None,
        })
        .into_response(),
    })
}

/// `POST /api/roulette/save` with `{"key", "number"}`
#[utoipa::path(
    post,
    path = "/api/roulette/save",
    tag = "rooms",
    request_body = SaveRequest,
    security((), ("room_token" = [])),
    responses(
        (status = 200, description = "Appended (the room is created if missing)", body = Saved),
        WriteRefusals,
    )
)]
pub async fn save(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    BearerToken(token): BearerToken,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let key = RoomKey::from_json(body.field("key")?)?;
    let number = Number::from_json(body.field("number")?)?;
    let id = mutation_id(&body)?;
    let writer = Writer::request(client, token.as_deref());
    let written = state
        .rooms
        .mutate(writer, key.clone(), Change::Added(number), id)
        .await?;
    Ok(saved(&key, &written.room))
}

/// `PUT /api/roulette/{key}` with `{"history": [..]}`; a `key` in the body is ignored.
#[utoipa::path(
    put,
    path = "/api/roulette/{key}",
    tag = "rooms",
    params(("key" = RoomKey, Path, description = "The room's key")),
    request_body = ReplaceRequest,
    security((), ("room_token" = [])),
    responses(
        (status = 200, description = "Replaced (the room is created if missing)", body = Saved),
        WriteRefusals,
    )
)]
pub async fn replace(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    ApiPath(raw_key): ApiPath<String>,
    BearerToken(token): BearerToken,
    body: JsonObject,
) -> Result<Response, ApiError> {
    let key = RoomKey::parse(&raw_key)?;
    let history = History::from_json(body.field("history")?, state.config.max_history)?;
    let id = mutation_id(&body)?;
    let writer = Writer::request(client, token.as_deref());
    let written = state
        .rooms
        .mutate(writer, key.clone(), Change::Replaced(history), id)
        .await?;
    Ok(saved(&key, &written.room))
}

/// Query of the listing. Kept as text and parsed by the handler, so that a bad
/// value gets a sentence naming the parameter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Rooms per page: 1 to 1000 (default 100); with `include=history` at most
    /// `LIST_HISTORY_MAX_ROOMS` (default 20, also the default page).
    #[param(value_type = Option<u32>, minimum = 1)]
    limit: Option<String>,
    /// Rooms to skip: 0 to 2^63 - 1.
    #[param(value_type = Option<u64>)]
    offset: Option<String>,
    /// `history` adds each open room's history.
    #[param(value_type = Option<String>, pattern = "^history$")]
    include: Option<String>,
}

/// One room of the listing; both spellings of the times are read by clients.
#[derive(Serialize, ToSchema)]
struct Summary<'a> {
    id: i64,
    key: &'a RoomKey,
    #[serde(rename = "historyLength")]
    history_length: usize,
    created_at: String,
    updated_at: String,
    #[serde(rename = "createdAt")]
    created_at_alias: String,
    #[serde(rename = "lastActivity")]
    last_activity: String,
    protected: bool,
    /// With `include=history`, for open rooms only.
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<&'a History>,
}

impl<'a> Summary<'a> {
    fn of(room: &'a RoomSummary) -> Self {
        let created = rfc3339(&room.created_at);
        let updated = rfc3339(&room.updated_at);
        Summary {
            id: room.id,
            key: &room.key,
            history_length: room.history_length,
            created_at_alias: created.clone(),
            last_activity: updated.clone(),
            created_at: created,
            updated_at: updated,
            protected: room.protected,
            // A protected room's numbers are not readable without its token.
            history: room.history.as_ref().filter(|_| !room.protected),
        }
    }
}

#[derive(Serialize, ToSchema)]
struct Listing<'a> {
    sessions: Vec<Summary<'a>>,
    /// Rooms overall, not on this page.
    total: u64,
}

/// `GET /api/roulette/sessions?limit=&offset=&include=history`
///
/// With `include=history` a page holds at most `LIST_HISTORY_MAX_ROOMS` rooms,
/// so that one request cannot make the instance build a reply of tens of
/// megabytes; the reply is rendered on the blocking pool, off the workers
/// that serve every other request.
#[utoipa::path(
    get,
    path = "/api/roulette/sessions",
    tag = "rooms",
    params(ListQuery),
    responses(
        (status = 200, description = "Rooms by latest activity", body = Listing),
        (status = 400, description = "Invalid limit, offset or include", body = ErrorBody),
        (status = 503, description = "Database unavailable", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let include_history = match query.include.as_deref() {
        None | Some("") => false,
        Some("history") => true,
        Some(_) => return Err(ApiError::bad_request("include may only be \"history\"")),
    };
    let max_limit = if include_history {
        state.config.list_history_max_rooms
    } else {
        MAX_PAGE
    };
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_PAGE.min(max_limit),
        Some(raw) => {
            let limit = raw
                .parse::<u32>()
                .ok()
                .filter(|l| *l > 0)
                .ok_or_else(|| ApiError::bad_request("limit must be a positive integer"))?;
            if include_history && limit > max_limit {
                return Err(ApiError::bad_request(format!(
                    "with include=history, limit may be at most {max_limit}"
                )));
            }
            limit.min(max_limit)
        }
    };
    let offset = match query.offset.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw
            .parse::<u64>()
            .ok()
            .filter(|o| i64::try_from(*o).is_ok())
            .ok_or_else(|| {
                ApiError::bad_request(format!("offset must be an integer from 0 to {}", i64::MAX))
            })?,
    };
    let (rooms, total) = state
        .rooms
        .list(Page {
            limit,
            offset,
            include_history,
        })
        .await?;
    let render = move || {
        let listing = Listing {
            sessions: rooms.iter().map(Summary::of).collect(),
            total,
        };
        serde_json::to_vec(&listing)
    };
    let body = if include_history {
        tokio::task::spawn_blocking(render)
            .await
            .map_err(|err| ApiError::Internal(format!("rendering a listing: {err}")))?
    } else {
        render()
    }
    .map_err(|err| ApiError::Internal(format!("rendering a listing: {err}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// Rooms per listing page by default, and at most.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::Snapshot;

    #[tokio::test]
    async fn a_saved_reply_is_the_session_serde_would_write() {
        let numbers: Vec<Number> = (0..30u8)
            .map(|i| {
                if i == 7 {
                    Number::DoubleZero
                } else {
                    Number::Single(i)
                }
            })
            .collect();
        let snapshot = Arc::new(Snapshot::new(
            Version::new(30),
            "e1".into(),
            true,
            History::from_numbers(numbers),
        ));
        let key = RoomKey::parse("Стол \"7\"").unwrap();
        let now = chrono::Utc::now();
        for len in [0, 1, 12, 30] {
            let version = Version::new(len as u64);
            let room = SavedRoom::from_snapshot(5, now, now, snapshot.clone(), len, version);
            let expected = serde_json::to_vec(&Saved {
                success: true,
                data: Session::of(&key, &room),
            })
            .unwrap();
            let response = saved(&key, &room);
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8(body.to_vec()).unwrap(),
                String::from_utf8(expected).unwrap()
            );
        }
    }
}
