//! `POST /api/rooms/auth`: create a room (protected iff a password is given) or
//! prove knowledge of its password, and get a room token. The reply says
//! whether the room is protected: an open room stays open whatever password
//! is sent, and the client should know.
//!
//! Each attempt costs an argon2 hash, so attempts are limited per client
//! address before any work, and the hash waits in a bounded queue (a full one
//! answers 503 with `Retry-After` at once).

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{ClientIp, JsonObject};
use super::openapi::WriteRefusals;
use crate::auth::MAX_PASSWORD_BYTES;
use crate::domain::RoomKey;
use crate::state::AppState;

/// The body of `POST /api/rooms/auth`.
#[derive(ToSchema)]
#[allow(dead_code)] // documents the shape; the handler reads the fields one by one
struct AuthRequest {
    key: RoomKey,
    /// Empty or absent: no password (a new room is created open).
    #[schema(max_length = 256)]
    password: Option<String>,
}

/// A room token, and whether the room is protected: `false` tells a caller
/// who sent a password that the room already existed open and stays open.
#[derive(Serialize, ToSchema)]
pub struct TokenReply {
    token: String,
    protected: bool,
}

#[utoipa::path(
    post,
    path = "/api/rooms/auth",
    tag = "auth",
    request_body = AuthRequest,
    responses(
        (status = 200, description = "A room token, valid 24 h for this room", body = TokenReply),
        WriteRefusals,
    )
)]
pub async fn authenticate(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    body: JsonObject,
) -> Result<Json<TokenReply>, ApiError> {
    // Argon2 is deliberately slow: limit attempts per client before doing any work.
    if state.auth_limiter.check_key(&ip).is_err() {
        return Err(ApiError::TooManyRequests);
    }
    let key = RoomKey::from_json(body.field("key")?)?;
    let password = match body.0.get("password") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(p)) if p.len() <= MAX_PASSWORD_BYTES => p.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(format!(
                "password may be at most {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        Some(_) => return Err(ApiError::bad_request("password must be a string")),
    };
    let auth = state.rooms.auth();
    let protected = match find_or_create(&state, &key, &password).await? {
        Room::Created { protected } => protected,
        Room::Existing(None) => false,
        Room::Existing(Some(hash)) => {
            if !auth.verify_password(password, hash).await? {
                return Err(ApiError::Unauthorized(
                    "wrong password for this room".into(),
                ));
            }
            true
        }
    };
    let token = auth.issue(&key)?;
    Ok(Json(TokenReply { token, protected }))
}

/// The room this request found or made.
enum Room {
    /// Created by this request, with this request's password (nothing to check).
    Created { protected: bool },
    /// Already there, with its stored hash if it has a password.
    Existing(Option<String>),
}

/// Looks the room up, creating it (protected iff `password` is not empty) when
/// it does not exist yet.
async fn find_or_create(state: &AppState, key: &RoomKey, password: &str) -> Result<Room, ApiError> {
    if let Some(room) = state.rooms.access(key).await? {
        return Ok(Room::Existing(room.password_hash));
    }
    let auth = state.rooms.auth();
    let hash = if password.is_empty() {
        None
    } else {
        Some(auth.hash_password(password.to_owned()).await?)
    };
    let created = state.rooms.create(key, hash.clone()).await?;
    // If another request created the room first, its password state wins.
    Ok(if created.password_hash == hash {
        Room::Created {
            protected: hash.is_some(),
        }
    } else {
        Room::Existing(created.password_hash)
    })
}
