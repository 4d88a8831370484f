//! `/api/admin`: cluster-wide view of rooms and connections, and remote
//! disconnects. Requires `Authorization: Bearer $ADMIN_TOKEN`; without a configured
//! token the whole API answers 404, as if it did not exist.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::extract::{ApiPath, bearer};
use crate::bus::{ConnectionInfo, ControlMessage};
use crate::domain::RoomKey;
use crate::state::AppState;
use crate::store::Page;

/// Proof that the request carried the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.config.admin_token else {
            return Err(ApiError::NotFound);
        };
        let given = bearer(parts).unwrap_or_default();
        if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(Admin)
        } else {
            Err(ApiError::Unauthorized(
                "a valid admin token is required".into(),
            ))
        }
    }
}

fn bus_unavailable(err: crate::bus::BusError) -> ApiError {
    tracing::warn!(error = %err, "bus unavailable for an admin call");
    ApiError::Unavailable
}

fn connection_json(c: &ConnectionInfo, key: &str) -> Value {
    json!({
        "id": c.id, "key": key, "connectedAt": c.connected_at, "lastActivity": c.last_activity,
        "status": "connected", "ipAddress": c.ip_address, "userAgent": c.user_agent, "instance": c.instance,
    })
}

/// Every live connection in the cluster, and joins counted per room.
async fn cluster_connections(
    state: &AppState,
) -> Result<(Vec<ConnectionInfo>, HashMap<String, u64>), ApiError> {
    let bus = &state.rooms.bus;
    let presence = bus.presence().await.map_err(bus_unavailable)?;
    let joins = bus.join_counts().await.map_err(bus_unavailable)?;
    Ok((presence, joins))
}

/// Live connections grouped by room key.
fn by_room(connections: &[ConnectionInfo]) -> HashMap<&str, Vec<&ConnectionInfo>> {
    let mut rooms: HashMap<&str, Vec<&ConnectionInfo>> = HashMap::new();
    for c in connections {
        for key in &c.rooms {
            rooms.entry(key.as_str()).or_default().push(c);
        }
    }
    rooms
}

/// `GET /api/admin/sessions`
pub async fn sessions(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let (rooms, _) = state
        .store()
        .list_rooms(Page {
            limit: 1000,
            offset: 0,
            include_history: false,
        })
        .await?;
    let (presence, joins) = cluster_connections(&state).await?;
    let live = by_room(&presence);
    let list: Vec<Value> = rooms
        .iter()
        .map(|r| {
            let key = r.key.as_str();
            let connections = live.get(key).map(Vec::as_slice).unwrap_or_default();
            json!({
                "key": key, "createdAt": r.created_at, "lastActivity": r.updated_at,
                "historyLength": r.history_length, "activeConnections": connections.len(),
                "totalConnections": joins.get(key).copied().unwrap_or_default(), "protected": r.protected,
                "connections": connections.iter().map(|c| connection_json(c, key)).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(Value::Array(list)))
}

/// `GET /api/admin/stats`
pub async fn stats(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let totals = state.store().stats().await?;
    let (presence, joins) = cluster_connections(&state).await?;
    Ok(Json(json!({
        "totalSessions": totals.rooms,
        "activeSessions": by_room(&presence).len(),
        "totalConnections": joins.values().sum::<u64>(),
        "activeConnections": presence.len(),
        "averageHistoryLength": totals.average_history_length,
    })))
}

/// `GET /api/admin/sessions/{key}/history`
pub async fn history(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(raw_key): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let key = RoomKey::parse(&raw_key)?;
    let room = state.store().room(&key).await?.ok_or(ApiError::NotFound)?;
    Ok(Json(json!(room.history)))
}

/// `POST /api/admin/connections/{id}/disconnect`
pub async fn disconnect(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let presence = state.rooms.bus.presence().await.map_err(bus_unavailable)?;
    if !presence.iter().any(|c| c.id == id) {
        return Err(ApiError::NotFound);
    }
    state
        .rooms
        .bus
        .control(ControlMessage::Disconnect {
            connection_id: id.clone(),
        })
        .await
        .map_err(bus_unavailable)?;
    Ok(Json(
        json!({"status": "success", "message": format!("connection {id} disconnected")}),
    ))
}

/// `GET /api/admin/migrations` (read-only; schema changes happen through the CLI).
pub async fn migrations(_: Admin, State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let all = state.store().migration_status().await?;
    let (applied, pending): (Vec<_>, Vec<_>) = all.into_iter().partition(|m| m.applied);
    Ok(Json(
        json!({"backend": state.store().backend(), "applied": applied, "pending": pending}),
    ))
}
