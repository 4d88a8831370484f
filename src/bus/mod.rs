//! The bus seam: how instances tell each other about committed room events,
//! share presence (who is connected where) and pass admin control messages.
//!
//! The seam is split by what its callers need, as centrifuge splits its
//! `Broker` from its `PresenceManager`: [`Broker`] carries room events (the
//! hub publishes and subscribes), [`ControlPlane`] carries everything about
//! connections and instances (presence, join counts, control messages,
//! health). Two backends implement both over one set of connections:
//! [`memory::MemoryBus`] connects instances in one process (the embedded
//! default has exactly one), [`redis::RedisBus`] connects instances through
//! Redis pub/sub (cluster mode). Every instance also delivers its own events
//! to its local members directly, so the bus only has to carry events to
//! *other* instances; receivers order and de-duplicate by version.

pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::{RoomEvent, RoomKey};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    #[error("bus protocol error: {0}")]
    Protocol(String),
}

/// An instruction for every instance: an admin's, addressed to whichever
/// instance holds the connection, or a room's change of access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControlMessage {
    Disconnect {
        connection_id: String,
    },
    /// A room that members could join openly was just created with a password:
    /// every instance removes the members that joined it without a valid token.
    Protected {
        key: String,
    },
}

/// What arrives from the bus for this instance to act on.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A room event committed by another instance.
    Event(RoomEvent),
    /// An admin control message (sent by any instance, this one included).
    Control(ControlMessage),
    /// The bus was interrupted and is back: events may have been missed, so every
    /// local room must catch up from the store.
    Resync,
}

/// Receives [`Inbound`] messages; called from the bus's receiving task, so it
/// must not block.
pub type InboundHandler = Arc<dyn Fn(Inbound) + Send + Sync>;

/// One WebSocket connection as the admin API shows it, cluster-wide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub id: String,
    pub instance: String,
    pub rooms: Vec<String>,
    pub connected_at: DateTime<Utc>,
    pub last_activity: DateTime<Utc>,
    pub ip_address: String,
    pub user_agent: String,
}

/// Health of the bus as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BusHealth {
    /// In-process bus: there is no external dependency to check.
    Disabled,
    Up(Duration),
    Down,
}

/// Room events between instances: what the hub needs to follow its rooms.
///
/// Like centrifuge's `Broker`, it knows nothing about connections: a room
/// task subscribes while it has members and publishes what its writers
/// committed; events from other instances arrive through the
/// [`InboundHandler`] given to the implementation when it connected.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sends a committed event to the other instances that have members in its room.
    async fn publish(&self, event: &RoomEvent) -> Result<(), BusError>;

    /// Starts receiving events for a room (called when it gets its first local member).
    async fn subscribe(&self, key: &RoomKey) -> Result<(), BusError>;

    /// Stops receiving events for a room (called after its last local member left).
    async fn unsubscribe(&self, key: &RoomKey) -> Result<(), BusError>;

    /// Whether events from other instances are arriving right now (the
    /// subscription is connected). Without it, local room state may lag behind.
    fn delivering(&self) -> bool {
        true
    }
}

/// Connections and instances rather than rooms: the cluster-wide presence
/// table and join counts that the admin API shows, the control messages
/// every instance acts on, and the bus's health. Like centrifuge's
/// `PresenceManager`, it is a separate seam from [`Broker`], so that the hub
/// cannot reach it and the admin API cannot publish room events.
#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    /// Broadcasts a control message to every instance, this one included.
    async fn control(&self, message: ControlMessage) -> Result<(), BusError>;

    /// Records or refreshes a connection in the cluster-wide presence table.
    /// Entries of a crashed instance expire on their own.
    async fn put_presence(&self, info: &ConnectionInfo) -> Result<(), BusError>;

    /// Removes a connection from the presence table.
    async fn remove_presence(&self, connection_id: &str) -> Result<(), BusError>;

    /// Every live connection on every instance.
    async fn presence(&self) -> Result<Vec<ConnectionInfo>, BusError>;

    /// Counts one more connection that joined a room (admin `totalConnections`).
    async fn count_join(&self, key: &RoomKey) -> Result<(), BusError>;

    /// Joins counted per room key.
    async fn join_counts(&self) -> Result<HashMap<String, u64>, BusError>;

    /// Whether the bus's external dependency answers, for `/health`.
    async fn health(&self) -> BusHealth;
}

/// The room-event half of a bus, shared by the hub and its room tasks.
pub type DynBroker = Arc<dyn Broker>;

/// The presence and control half of a bus, shared by rooms, sessions and
/// the admin and health endpoints.
pub type DynControlPlane = Arc<dyn ControlPlane>;

/// How long a presence entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(30);
