//! `POST /api/rooms/auth`: create a room (protected iff a password is given) or
//! prove knowledge of its password, and get a room token.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::error::ApiError;
use super::extract::{ClientIp, JsonObject};
use crate::auth::MAX_PASSWORD_BYTES;
use crate::domain::RoomKey;
use crate::state::AppState;

pub async fn authenticate(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    body: JsonObject,
) -> Result<Json<Value>, ApiError> {
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
    let auth = &state.rooms.auth;
    let existing = state.store().room_auth(&key).await?;
    let stored_hash = match existing {
        Some(room) => room.password_hash,
        None => {
            let hash = if password.is_empty() {
                None
            } else {
                Some(auth.hash_password(password.clone()).await?)
            };
            let created = state.rooms.create(&key, hash.clone()).await?;
            // If another request created the room first, its password state wins.
            if created.password_hash == hash {
                None
            } else {
                created.password_hash
            }
        }
    };
    if let Some(hash) = stored_hash
        && !auth.verify_password(password, hash).await?
    {
        return Err(ApiError::Unauthorized(
            "wrong password for this room".into(),
        ));
    }
    let token = auth.issue(&key)?;
    Ok(Json(json!({"token": token})))
}
