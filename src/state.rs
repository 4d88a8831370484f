//! Shared application state, cheap to clone into every handler and connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use governor::DefaultKeyedRateLimiter;
use governor::clock::DefaultClock;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::bus::DynControlPlane;
use crate::config::Config;
use crate::hub::registry::{ClientSlots, Connections};
use crate::rooms::Rooms;
use crate::store::{DynStore, MigrationInfo, StoreError};

/// Readiness and shutdown, shared by the server, its probes and every socket.
#[derive(Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    /// Cancelled when the instance starts draining: sockets close with 1001 and
    /// new WebSocket upgrades are refused.
    pub shutdown: CancellationToken,
}

impl Lifecycle {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.shutdown.is_cancelled()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Cloned into every request and connection, so one reference count, not one
/// per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub config: Arc<Config>,
    /// Everything about rooms: reads, changes, joins, protection.
    pub rooms: Rooms,
    /// Connections and instances: presence, join counts, admin control
    /// messages and the bus's health.
    pub cluster: DynControlPlane,
    /// The store as operations see it; rooms are reached through `rooms`.
    pub database: DatabaseOps,
    pub connections: Connections,
    pub metrics: PrometheusHandle,
    pub lifecycle: Arc<Lifecycle>,
    /// Attempts at `/api/rooms/auth` per client address; pruned every minute
    /// by the maintenance task (`startup`).
    pub auth_limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
    /// One permit per open WebSocket, up to `WS_MAX_CONNECTIONS`.
    pub ws_slots: Arc<Semaphore>,
    /// Open WebSockets per client address, up to `WS_MAX_PER_CLIENT`.
    pub ws_clients: ClientSlots,
    /// The clock every connection's message-rate limiter reads. Made once:
    /// creating one runs CPUID, which in a virtual machine traps to the
    /// hypervisor, and reconnect storms create thousands of limiters.
    pub rate_clock: DefaultClock,
}

/// The store's operational side: health, schema and housekeeping. It
/// deliberately offers nothing about rooms, so that handlers read and change
/// rooms through [`Rooms`], whose checks and fan-out they cannot skip.
#[derive(Clone)]
pub struct DatabaseOps(DynStore);

impl DatabaseOps {
    pub fn new(store: DynStore) -> Self {
        DatabaseOps(store)
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.0.backend()
    }

    /// A round trip to the database; its latency when it answers.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        self.0.ping().await
    }

    /// Applied and pending schema migrations.
    pub async fn migration_status(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        self.0.migration_status().await
    }

    /// Drops event-log entries past their retention; how many went.
    pub async fn prune_events(&self) -> Result<u64, StoreError> {
        self.0.prune_events().await
    }
}
