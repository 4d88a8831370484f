//! The WebSocket transport: one session task per upgraded connection
//! (`session.rs`), speaking the wire protocol of `crate::protocol` to the
//! client and going through `Rooms` for everything about rooms. The upgrade
//! itself (origin check, caps) is an HTTP route, `http::websocket`.

mod session;

use std::net::IpAddr;

pub use session::run;

/// Who is on the other end: its address (quotas, the admin API) and user agent.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    pub user_agent: String,
}
