//! Wiring: open the store and the bus for the configured mode, build the state
//! and the router, bind the listener, run until a shutdown signal, drain.

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use governor::{Quota, RateLimiter};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::auth::{self, Auth};
use crate::bus::memory::MemoryBroker;
use crate::bus::redis::RedisBus;
use crate::bus::{ControlMessage, DynBus, Inbound, InboundHandler};
use crate::config::{Config, Database};
use crate::hub::{Hub, HubConfig};
use crate::rooms::Rooms;
use crate::state::{AppState, Lifecycle, Shared};
use crate::store::cached::CachedStore;
use crate::store::postgres::{PgOptions, PostgresStore};
use crate::store::sqlite::SqliteStore;
use crate::store::{DynStore, ensure_current_schema};
use crate::telemetry;
use crate::ws::registry::Connections;

/// Opens the configured store without touching its schema.
pub async fn open_store(config: &Config) -> anyhow::Result<DynStore> {
    let store: DynStore = match &config.database {
        Database::Sqlite(url) => {
            if let Some(dir) = sqlite_dir(url) {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating data directory {}", dir.display()))?;
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

fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = path.split('?').next()?;
    (path != ":memory:").then(|| std::path::Path::new(path).parent().map(|p| p.to_path_buf()))?
}

/// A built, bound, not yet running instance.
pub struct Application {
    listener: TcpListener,
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
                    Inbound::Resync => hub.catch_up_all(),
                }
            })
        };
        let (bus, store): (DynBus, DynStore) = match &config.redis_url {
            Some(url) => {
                let bus = RedisBus::connect(url, &config.instance_id, handler).await?;
                // Hot rooms are read from Redis; every write goes through to it.
                let cached = CachedStore::new(
                    store,
                    bus.command_client(),
                    config.cache_ttl,
                    config.cache_max_history,
                );
                (Arc::new(bus), Arc::new(cached))
            }
            None => (
                Arc::new(broker.connect(&config.instance_id, handler)),
                store,
            ),
        };

        let hub = Hub::new(
            store.clone(),
            bus.clone(),
            HubConfig {
                queue_capacity: config.ws.queue_capacity,
                ..HubConfig::default()
            },
        );
        let connections = Connections::default();
        let _ = targets.set((hub.clone(), connections.clone()));

        let per_minute =
            NonZeroU32::new(config.auth_attempts_per_minute).unwrap_or(NonZeroU32::MIN);
        let state = AppState::new(Shared {
            rooms: Rooms {
                store,
                bus,
                hub,
                auth: Auth::new(secret.as_bytes()),
                max_history: config.max_history,
            },
            connections,
            metrics,
            lifecycle: Arc::new(Lifecycle::default()),
            auth_limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))),
            ws_slots: Arc::new(Semaphore::new(config.ws.max_connections)),
            rate_clock: Default::default(),
            config: Arc::new(config),
        });

        let address = SocketAddr::new(state.config.bind, state.config.port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        Ok(Application { listener, state })
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
        let Application { listener, state } = self;
        let lifecycle = state.lifecycle.clone();
        let grace = state.config.shutdown_grace;
        spawn_maintenance(&state);

        let router = crate::http::router(state.clone());
        lifecycle.set_ready(true);
        tracing::info!(address = %listener.local_addr()?, instance = %state.config.instance_id, store = state.store().backend(), "serving");

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

/// Background upkeep: the database health gauge and event-log pruning.
fn spawn_maintenance(state: &AppState) {
    let store = state.rooms.store.clone();
    let stop = state.lifecycle.shutdown.clone();
    tokio::spawn(async move {
        let mut check = tokio::time::interval(Duration::from_secs(5));
        let mut prune = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = check.tick() => {
                    let up = if store.ping().await.is_ok() { 1.0 } else { 0.0 };
                    metrics::gauge!("croupier_dependency_up", "dependency" => "database").set(up);
                }
                _ = prune.tick() => match store.prune_events().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "pruned event log"),
                    Err(err) => tracing::warn!(error = %err, "event log pruning failed"),
                },
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
