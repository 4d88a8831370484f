//! `/api/admin`: cluster-wide view of rooms and connections, and remote
//! disconnects. Requires `Authorization: Bearer $ADMIN_TOKEN`; without a configured
//! token the whole API answers 404, as if it did not exist.

use std::collections::{HashMap, HashSet};

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::{ApiPath, bearer};
use super::openapi::{AdminRefusals, ErrorBody};
use crate::bus::{ConnectionInfo, ControlMessage};
use crate::domain::{History, RoomKey};
use crate::state::AppState;
use crate::store::{MigrationInfo, Page, RoomSummary};

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

/// One live connection in one room, as `GET /api/admin/sessions` lists it.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AdminConnection<'a> {
    id: &'a str,
    key: &'a str,
    connected_at: DateTime<Utc>,
    last_activity: DateTime<Utc>,
    /// Always `connected`.
    status: &'static str,
    ip_address: &'a str,
    user_agent: &'a str,
    instance: &'a str,
}

impl<'a> AdminConnection<'a> {
    fn of(c: &'a ConnectionInfo, key: &'a str) -> Self {
        AdminConnection {
            id: &c.id,
            key,
            connected_at: c.connected_at,
            last_activity: c.last_activity,
            status: "connected",
            ip_address: &c.ip_address,
            user_agent: &c.user_agent,
            instance: &c.instance,
        }
    }
}

/// One room with its live connections on every instance.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct AdminRoom<'a> {
    key: &'a str,
    created_at: DateTime<Utc>,
    last_activity: DateTime<Utc>,
    history_length: usize,
    active_connections: usize,
    /// Joins counted since the counter began, over every instance.
    total_connections: u64,
    protected: bool,
    connections: Vec<AdminConnection<'a>>,
}

impl<'a> AdminRoom<'a> {
    /// A room as its live members describe it: created when the first of them
    /// connected, active when the last of them was, nothing stored.
    fn new(key: &'a str, connections: &[&'a ConnectionInfo], joins: u64) -> Self {
        let now = Utc::now();
        AdminRoom {
            key,
            created_at: connections
                .iter()
                .map(|c| c.connected_at)
                .min()
                .unwrap_or(now),
            last_activity: connections
                .iter()
                .map(|c| c.last_activity)
                .max()
                .unwrap_or(now),
            history_length: 0,
            active_connections: connections.len(),
            total_connections: joins,
            protected: false,
            connections: connections
                .iter()
                .map(|c| AdminConnection::of(c, key))
                .collect(),
        }
    }

    /// The same room with what the store knows about it.
    fn stored(self, room: &RoomSummary) -> Self {
        AdminRoom {
            created_at: room.created_at,
            last_activity: room.updated_at,
            history_length: room.history_length,
            protected: room.protected,
            ..self
        }
    }
}

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminStats {
    total_sessions: u64,
    active_sessions: usize,
    total_connections: u64,
    active_connections: usize,
    average_history_length: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Disconnected {
    /// Always `success`.
    status: &'static str,
    message: String,
}

#[derive(Serialize, ToSchema)]
pub struct Migrations {
    /// `sqlite` or `postgres`.
    backend: &'static str,
    applied: Vec<MigrationInfo>,
    pending: Vec<MigrationInfo>,
}

/// Every live connection in the cluster, and joins counted per room.
async fn cluster_connections(
    state: &AppState,
) -> Result<(Vec<ConnectionInfo>, HashMap<String, u64>), ApiError> {
    let presence = state.cluster.presence().await.map_err(bus_unavailable)?;
    let joins = state.cluster.join_counts().await.map_err(bus_unavailable)?;
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
#[utoipa::path(
    get,
    path = "/api/admin/sessions",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Rooms with their live connections on every instance", body = Vec<AdminRoom>),
        AdminRefusals,
    )
)]
pub async fn sessions(_: Admin, State(state): State<AppState>) -> Result<Response, ApiError> {
    let (mut rooms, _) = state
        .rooms
        .list(Page {
            limit: 1000,
            offset: 0,
            include_history: false,
        })
        .await?;
    let (presence, joins) = cluster_connections(&state).await?;
    let live = by_room(&presence);
    let beyond = stored_beyond_page(&state, &live, &rooms).await?;
    rooms.extend(beyond);
    let stored: HashSet<&str> = rooms.iter().map(|r| r.key.as_str()).collect();
    let joined = |key: &str| joins.get(key).copied().unwrap_or_default();
    let mut list: Vec<AdminRoom> = rooms
        .iter()
        .map(|r| {
            let key = r.key.as_str();
            let connections = live.get(key).map(Vec::as_slice).unwrap_or_default();
            AdminRoom::new(key, connections, joined(key)).stored(r)
        })
        .collect();
    // A `join` does not create a room, so people can sit in a room that has
    // nothing stored yet. They are listed too, or an operator could neither see
    // nor disconnect them; the room's times come from its members.
    list.extend(
        live.iter()
            .filter(|(key, _)| !stored.contains(*key))
            .map(|(&key, connections)| AdminRoom::new(key, connections, joined(key))),
    );
    list.sort_by_key(|room| std::cmp::Reverse(room.last_activity));
    Ok(Json(list).into_response())
}

/// Stored rooms with live members that fell outside the listing's page (the
/// page holds the most recently written rooms; people can sit quietly in an old
/// one). One lookup per such room, and there are at most as many as live rooms.
async fn stored_beyond_page(
    state: &AppState,
    live: &HashMap<&str, Vec<&ConnectionInfo>>,
    page: &[RoomSummary],
) -> Result<Vec<RoomSummary>, ApiError> {
    let listed: HashSet<&str> = page.iter().map(|r| r.key.as_str()).collect();
    let mut found = Vec::new();
    for key in live.keys().filter(|k| !listed.contains(*k)) {
        // Presence holds only keys that were parsed at a join.
        let Ok(key) = RoomKey::parse(key) else {
            continue;
        };
        if let Some(room) = state.rooms.read_unchecked(&key).await? {
            found.push(RoomSummary {
                id: room.id,
                history_length: room.history.len(),
                created_at: room.created_at,
                updated_at: room.updated_at,
                protected: room.protected,
                history: None,
                key: room.key,
            });
        }
    }
    Ok(found)
}

/// `GET /api/admin/stats`
#[utoipa::path(
    get,
    path = "/api/admin/stats",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Cluster-wide totals", body = AdminStats),
        AdminRefusals,
    )
)]
pub async fn stats(_: Admin, State(state): State<AppState>) -> Result<Json<AdminStats>, ApiError> {
    let totals = state.rooms.stats().await?;
    let (presence, joins) = cluster_connections(&state).await?;
    Ok(Json(AdminStats {
        total_sessions: totals.rooms,
        active_sessions: by_room(&presence).len(),
        total_connections: joins.values().sum::<u64>(),
        active_connections: presence.len(),
        average_history_length: totals.average_history_length,
    }))
}

/// `GET /api/admin/sessions/{key}/history`
#[utoipa::path(
    get,
    path = "/api/admin/sessions/{key}/history",
    tag = "admin",
    params(("key" = RoomKey, Path, description = "The room's key")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The room's history, protected or not", body = History),
        (status = 400, description = "Invalid key", body = ErrorBody),
        AdminRefusals,
    )
)]
pub async fn history(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(raw_key): ApiPath<String>,
) -> Result<Json<History>, ApiError> {
    let key = RoomKey::parse(&raw_key)?;
    let room = state
        .rooms
        .read_unchecked(&key)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(room.history))
}

/// `POST /api/admin/connections/{id}/disconnect`
#[utoipa::path(
    post,
    path = "/api/admin/connections/{id}/disconnect",
    tag = "admin",
    params(("id" = String, Path, description = "A connection id from GET /api/admin/sessions")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The instance holding it closes it (1000)", body = Disconnected),
        AdminRefusals,
    )
)]
pub async fn disconnect(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Disconnected>, ApiError> {
    let presence = state.cluster.presence().await.map_err(bus_unavailable)?;
    if !presence.iter().any(|c| c.id == id) {
        return Err(ApiError::NotFound);
    }
    state
        .cluster
        .control(ControlMessage::Disconnect {
            connection_id: id.clone(),
        })
        .await
        .map_err(bus_unavailable)?;
    Ok(Json(Disconnected {
        status: "success",
        message: format!("connection {id} disconnected"),
    }))
}

/// `GET /api/admin/migrations` (read-only; schema changes happen through the CLI).
#[utoipa::path(
    get,
    path = "/api/admin/migrations",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Applied and pending schema migrations (read-only)", body = Migrations),
        AdminRefusals,
    )
)]
pub async fn migrations(
    _: Admin,
    State(state): State<AppState>,
) -> Result<Json<Migrations>, ApiError> {
    let all = state.database.migration_status().await?;
    let (applied, pending): (Vec<_>, Vec<_>) = all.into_iter().partition(|m| m.applied);
    Ok(Json(Migrations {
        backend: state.database.backend(),
        applied,
        pending,
    }))
}
