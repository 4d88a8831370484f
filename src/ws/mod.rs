//! The WebSocket protocol: the upgrade (origin check, connection cap, frame
//! limit), the per-connection session, client messages and server frames.

pub mod frames;
pub mod messages;
pub mod registry;
mod session;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::http::header::{ORIGIN, USER_AGENT};
use axum::response::{IntoResponse, Response};

use crate::http::error::ApiError;
use crate::http::forwarded::client_ip;
use crate::state::AppState;

/// Who is on the other end, for the admin API.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: String,
    pub user_agent: String,
}

/// `GET /ws`
pub async fn upgrade(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    ConnectInfo(peer_addr): ConnectInfo<std::net::SocketAddr>,
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
    if let Some(origin) = headers.get(ORIGIN).and_then(|o| o.to_str().ok())
        && !state
            .config
            .cors_origins
            .allows(origin.trim_end_matches('/'))
    {
        return ApiError::Unauthorized(format!("origin {origin} is not allowed")).into_response();
    }
    // Refuse cleanly at the cap instead of running out of file descriptors.
    let Ok(permit) = state.ws_slots.clone().try_acquire_owned() else {
        tracing::warn!("connection cap reached; refusing a WebSocket");
        return ApiError::Unavailable.into_response();
    };
    let peer = Peer {
        ip: client_ip(&headers, Some(peer_addr), state.config.proxy_trust()).to_string(),
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
        .on_upgrade(move |socket| session::run(socket, state, peer, permit))
}
