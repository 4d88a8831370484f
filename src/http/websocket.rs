//! `GET /ws`: the WebSocket upgrade. The origin check and the per-client and
//! per-instance socket caps answer here, before anything is upgraded; an
//! accepted connection is handed to its session task in `crate::ws`.

use std::sync::Arc;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::http::header::{ORIGIN, USER_AGENT};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::forwarded::client_ip;
use super::openapi::ErrorBody;
use crate::hub::Socket;
use crate::state::AppState;
use crate::ws::{self, Peer};

/// How long a client refused for holding too many sockets should wait.
const CLIENT_CAP_RETRY_SECS: u64 = 5;

/// `GET /ws`
#[utoipa::path(
    get,
    path = "/ws",
    tag = "operations",
    description = "The WebSocket endpoint (RFC 6455). Its messages are described in docs/protocol.md.",
    responses(
        (status = 101, description = "Switched to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake", body = ErrorBody),
        (status = 401, description = "Origin not in CORS_ORIGINS", body = ErrorBody),
        (status = 429, description = "This address holds WS_MAX_PER_CLIENT sockets", body = ErrorBody),
        (status = 503, description = "The instance is full or shutting down", body = ErrorBody),
    )
)]
pub async fn upgrade(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    ConnectInfo(peer_addr): ConnectInfo<std::net::SocketAddr>,
    socket: Option<Extension<Arc<Socket>>>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::bad_request(format!(
                "WebSocket handshake required: {}",
                rejection.body_text()
            ))
            .into_response();
        }
    };
    if state.lifecycle.shutdown.is_cancelled() {
        return ApiError::Unavailable.into_response();
    }
    // The session writes its frames into the connection's socket itself, which
    // only `http::server` hands out.
    let Some(Extension(socket)) = socket else {
        return ApiError::Internal(
            "WebSocket upgrade on a connection without a shared socket".into(),
        )
        .into_response();
    };
    if let Some(origin) = headers.get(ORIGIN).and_then(|o| o.to_str().ok())
        && !state
            .config
            .cors_origins
            .allows(origin.trim_end_matches('/'))
    {
        return ApiError::Unauthorized(format!("origin {origin} is not allowed")).into_response();
    }
    let ip = client_ip(&headers, Some(peer_addr), state.config.proxy_trust());
    // One address may not take every slot of the instance...
    let Some(client_slot) = state
        .ws_clients
        .try_take(ip, state.config.ws.max_per_client)
    else {
        tracing::debug!(client = %ip, "per-client WebSocket cap reached; refusing");
        return ApiError::RateLimited(CLIENT_CAP_RETRY_SECS).into_response();
    };
    // ...and the instance refuses cleanly at its cap instead of running out of
    // file descriptors.
    let Ok(permit) = state.ws_slots.clone().try_acquire_owned() else {
        tracing::warn!("connection cap reached; refusing a WebSocket");
        return ApiError::Unavailable.into_response();
    };
    let peer = Peer {
        ip,
        user_agent: headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .chars()
            .take(256)
            .collect(),
    };
    let max = state.config.ws.max_frame_bytes;
    // Small socket buffers: tungstenite allocates the read buffer up front and
    // keeps it for the connection's life, so its size is most of what an idle
    // connection costs (its default is 128 KiB each way). 1 KiB still takes any
    // client message of this protocol (a join with its token is a few hundred
    // bytes) in one read; a larger frame is read whole, in 1 KiB reads.
    ws.max_frame_size(max)
        .max_message_size(max)
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .on_upgrade(move |ws| ws::run(ws, socket, state, peer, (permit, client_slot)))
}
