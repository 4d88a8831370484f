//! Shared application state, cheap to clone into every handler and connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use governor::DefaultKeyedRateLimiter;
use governor::clock::DefaultClock;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::hub::registry::{ClientSlots, Connections};
use crate::rooms::Rooms;
use crate::store::Store;

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
    pub rooms: Rooms,
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

impl Shared {
    pub fn store(&self) -> &dyn Store {
        self.rooms.store.as_ref()
    }
}
