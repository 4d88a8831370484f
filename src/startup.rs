//! Wiring: open the store and the bus for the configured mode, build the state
//! and the router, bind the listener, run until a shutdown signal, drain.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::auth::{self, Auth, Hasher};
use crate::bus::memory::MemoryBroker;
use crate::bus::redis::{RedisBus, RedisBusOptions};
use crate::bus::{
    Broker, ControlMessage, ControlPlane, DynBroker, DynControlPlane, Inbound, InboundHandler,
};
use crate::config::{Config, Database};
use crate::domain::RoomKey;
use crate::files;
use crate::hub::registry::Connections;
use crate::hub::{Hub, HubConfig};
use crate::quota::Quotas;
use crate::rooms::Rooms;
use crate::state::{AppState, DatabaseOps, Lifecycle, Shared};
use crate::store::cached::CachedStore;
use crate::store::postgres::{PgOptions, PostgresStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{DynStore, ensure_current_schema};
use crate::telemetry;

/// Opens the configured store without touching its schema.
pub async fn open_store(config: &Config) -> anyhow::Result<DynStore> {
    let store: DynStore = match &config.database {
        Database::Sqlite(url) => {
            if let Some(path) = sqlite_path(url) {
                prepare_sqlite_file(&path)?;
            }
            Arc::new(SqliteStore::open_url(url).await?)
        }
        Database::Postgres(url) => {
            let options = PgOptions {
                max_connections: config.db.max_connections,
                acquire_timeout: config.db.acquire_timeout,
                statement_timeout: config.db.statement_timeout,
                connect_attempts: config.db.connect_attempts,
            };
            Arc::new(PostgresStore::connect(url, options).await?)
        }
    };
    Ok(store)
}

/// The database file of a `sqlite:` URL; `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// The database holds password hashes: its directory is created owner-only and
/// the file (and SQLite's side files, which take their mode from it) kept `0600`.
fn prepare_sqlite_file(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::create_private_dir(dir)
            .with_context(|| format!("creating data directory {}", dir.display()))?;
    }
    files::make_private_file(path)
        .with_context(|| format!("restricting {} to its owner", path.display()))?;
    for side in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(side);
        files::restrict_if_present(Path::new(&name))
            .with_context(|| format!("restricting {} to its owner", Path::new(&name).display()))?;
    }
    Ok(())
}

/// A built, bound, not yet running instance.
pub struct Application {
    listener: TcpListener,
    /// `/metrics` on its own address (`METRICS_BIND`), if configured.
    metrics_listener: Option<TcpListener>,
    state: AppState,
}

impl Application {
    /// Builds an instance for `config`. Embedded mode gets its own in-process bus.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_broker(config, MemoryBroker::new()).await
    }

    /// Builds an instance whose in-process bus is `broker` (several instances in
    /// one process share one broker). Ignored when `REDIS_URL` is set.
    pub async fn build_with_broker(config: Config, broker: MemoryBroker) -> anyhow::Result<Self> {
        let metrics = telemetry::prometheus_handle();
        let store = open_store(&config).await?;
        // Embedded mode migrates itself. A cluster is migrated from the CLI before
        // instances roll, so an instance refuses to serve an out-of-date schema.
        if config.is_cluster() {
            ensure_current_schema(store.as_ref()).await?;
        } else {
            store.migrate().await?;
        }

        let secret = match &config.jwt_secret {
            Some(secret) => secret.clone(),
            None if config.is_cluster() => {
                anyhow::bail!(
                    "JWT_SECRET must be set in cluster mode (every instance must share it)"
                )
            }
            None => auth::load_or_create_secret(&config.data_dir)?,
        };

        // The bus needs somewhere to deliver before the hub exists; the hub needs
        // the bus. The handler looks the hub up once it is set.
        let targets: Arc<OnceLock<(Hub, Connections)>> = Arc::new(OnceLock::new());
        let handler: InboundHandler = {
            let targets = targets.clone();
            Arc::new(move |inbound| {
                let Some((hub, connections)) = targets.get() else {
                    return;
                };
                match inbound {
                    Inbound::Event(event) => hub.deliver(event),
                    Inbound::Control(ControlMessage::Disconnect { connection_id }) => {
                        connections.kick(&connection_id);
                    }
                    Inbound::Control(ControlMessage::Protected { key }) => {
                        match RoomKey::parse(&key) {
                            Ok(key) => hub.protected(&key),
                            Err(err) => {
                                tracing::warn!(error = %err, "ignoring a protected-room message with an invalid key")
                            }
                        }
                    }
                    Inbound::Resync => hub.catch_up_all(),
                }
            })
        };
        let (halves, store, cache): (_, DynStore, _) = match &config.redis_url {
            Some(url) => {
                let options = RedisBusOptions {
                    tls: config.redis_tls.clone(),
                    ..RedisBusOptions::default()
                };
                let bus =
                    RedisBus::connect_with(url, &config.instance_id, handler, options).await?;
                // Hot rooms are read from Redis; room tasks write each
                // committed batch's room through to it.
                let cached = CachedStore::new(
                    store,
                    bus.command_client(),
                    config.cache_ttl,
                    config.cache_max_history,
                );
                let cache = cached.room_cache();
                (both_halves(bus), Arc::new(cached), Some(cache))
            }
            None => (
                both_halves(broker.connect(&config.instance_id, handler)),
                store,
                None,
            ),
        };
        let (bus, control) = halves;

        let hub = Hub::new(
            store.clone(),
            bus.clone(),
            cache,
            HubConfig {
                queue_capacity: config.ws.queue_capacity,
                max_read_rooms: config.max_read_rooms,
                ..HubConfig::default()
            },
        );
        let connections = Connections::default();
        let _ = targets.set((hub.clone(), connections.clone()));

        let per_minute =
            NonZeroU32::new(config.auth_attempts_per_minute).unwrap_or(NonZeroU32::MIN);
        let rate_clock = DefaultClock::default();
        let state = AppState::new(Shared {
            rooms: Rooms::new(
                store.clone(),
                hub,
                control.clone(),
                Auth::new(
                    secret.as_bytes(),
                    Hasher::start(config.hashing.threads, config.hashing.queue)?,
                ),
                Arc::new(Quotas::new(config.quotas, rate_clock.clone())),
                config.max_history,
            ),
            cluster: control,
            database: DatabaseOps::new(store),
            connections,
            metrics,
            lifecycle: Arc::new(Lifecycle::default()),
            auth_limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))),
            ws_slots: Arc::new(Semaphore::new(config.ws.max_connections)),
            ws_clients: Default::default(),
            rate_clock,
            config: Arc::new(config),
        });

        let address = SocketAddr::new(state.config.bind, state.config.port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        let metrics_listener = match state.config.metrics_bind {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .with_context(|| format!("binding METRICS_BIND {address}"))?,
            ),
            None => None,
        };
        Ok(Application {
            listener,
            metrics_listener,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.state.config.bind, self.state.config.port))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains: readiness turns 503, sockets
    /// close with 1001, in-flight requests finish, all within `SHUTDOWN_GRACE`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Application {
            listener,
            metrics_listener,
            state,
        } = self;
        let lifecycle = state.lifecycle.clone();
        let grace = state.config.shutdown_grace;
        spawn_maintenance(&state);
        if let Some(listener) = metrics_listener {
            serve_metrics(listener, &state)?;
        }

        let router = crate::http::router(state.clone());
        lifecycle.set_ready(true);
        tracing::info!(
            address = %listener.local_addr()?,
            instance = %state.config.instance_id,
            store = state.database.backend(),
            database = %state.config.database_location(),
            redis = %state.config.redis_location(),
            "serving"
        );
        let config = &state.config;
        tracing::debug!(
            trusted_proxies = ?config.proxy_trust(),
            hash_threads = config.hashing.threads,
            auth_queue = config.hashing.queue,
            auth_rate_limit = config.auth_attempts_per_minute,
            "client addresses and password checks"
        );

        let draining = lifecycle.shutdown.clone();
        tokio::spawn({
            let lifecycle = lifecycle.clone();
            async move {
                shutdown.await;
                tracing::info!("shutdown requested; draining");
                lifecycle.set_ready(false);
                lifecycle.shutdown.cancel();
            }
        });
        // Returns once every connection has closed: requests finished, and every
        // WebSocket session gone after sending its 1001 close.
        let served = crate::http::server::serve(
            listener,
            router,
            &state.config.http,
            state.config.trust_proxy,
            draining.clone(),
        );
        tokio::select! {
            () = served => {}
            _ = async { draining.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("grace period over; exiting with connections still open");
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Both seams of one bus, over its one set of connections: the hub gets the
/// room events; rooms, sessions and the admin API the presence and control.
fn both_halves<B: Broker + ControlPlane>(bus: B) -> (DynBroker, DynControlPlane) {
    let bus = Arc::new(bus);
    (bus.clone(), bus)
}

/// Serves `/metrics` alone on its own listener until the instance drains.
fn serve_metrics(listener: TcpListener, state: &AppState) -> anyhow::Result<()> {
    tracing::info!(address = %listener.local_addr()?, "serving /metrics");
    let router = crate::http::metrics_router(state.clone());
    let stop = state.lifecycle.shutdown.clone();
    tokio::spawn(async move {
        let server = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await });
        if let Err(err) = server.await {
            tracing::warn!(error = %err, "metrics listener failed");
        }
    });
    Ok(())
}

/// How often the auth limiter forgets clients whose attempts have expired.
const LIMITER_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Drops limiter entries that no longer restrict anyone and gives the table's
/// memory back. Without it every address ever seen (a spoofing or IPv6-rotating
/// client brings hundreds of thousands) keeps an entry for the life of the process.
///
/// Generic over the clock so that tests can drive it with governor's fake one.
fn forget_idle_clients<C: Clock>(
    limiter: &RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
) {
    let before = limiter.len();
    limiter.retain_recent();
    limiter.shrink_to_fit();
    let after = limiter.len();
    if after < before {
        tracing::debug!(before, after, "pruned the auth rate limiter");
    }
}

/// Background upkeep: the database health gauge, event-log pruning, the
/// periodic repair of followed rooms, and forgetting idle clients (auth
/// limiter, write and room quotas).
fn spawn_maintenance(state: &AppState) {
    let database = state.database.clone();
    let limiter = state.auth_limiter.clone();
    let rooms = state.rooms.clone();
    let stop = state.lifecycle.shutdown.clone();
    let mut repair = tokio::time::interval(state.config.repair_interval);
    // A slow check is not made up for with a burst of them.
    repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::spawn(async move {
        let mut check = tokio::time::interval(Duration::from_secs(5));
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        let mut prune_limiter = tokio::time::interval(LIMITER_PRUNE_INTERVAL);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = check.tick() => {
                    let up = if database.ping().await.is_ok() { 1.0 } else { 0.0 };
                    metrics::gauge!("croupier_dependency_up", "dependency" => "database").set(up);
                }
                _ = prune.tick() => match database.prune_events().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "pruned event log"),
                    Err(err) => tracing::warn!(error = %err, "event log pruning failed"),
                },
                _ = repair.tick() => {
                    if let Err(err) = rooms.verify_all().await {
                        tracing::warn!(error = %err, "cannot check rooms against the store");
                    }
                }
                _ = prune_limiter.tick() => {
                    forget_idle_clients(&limiter);
                    rooms.prune_quotas();
                }
            }
        }
    });
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file() {
        let path = |url| sqlite_path(url).map(|p| p.display().to_string());
        assert_eq!(
            path("sqlite:///data/croupier.db").as_deref(),
            Some("/data/croupier.db")
        );
        assert_eq!(
            path("sqlite://./data/x.db?mode=rwc").as_deref(),
            Some("./data/x.db")
        );
        assert_eq!(path("sqlite:x.db").as_deref(), Some("x.db"));
        assert_eq!(path("sqlite::memory:"), None);
    }

    #[test]
    fn the_auth_limiter_forgets_expired_clients() {
        let per_second = NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN);
        // governor keeps its own time, apart from tokio's: its fake clock moves
        // only when told to.
        let clock = governor::clock::FakeRelativeClock::default();
        let limiter = RateLimiter::dashmap_with_clock(Quota::per_second(per_second), clock.clone());
        for n in 0..1000u32 {
            let _ = limiter.check_key(&IpAddr::from(n.to_be_bytes()));
        }
        assert_eq!(limiter.len(), 1000);
        forget_idle_clients(&limiter);
        assert_eq!(limiter.len(), 1000, "every client is still restricted");
        // One attempt at 1000/s stops restricting its client after 1 ms.
        clock.advance(Duration::from_millis(20));
        forget_idle_clients(&limiter);
        assert_eq!(limiter.len(), 0);
    }
}
