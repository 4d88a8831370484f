//! Redis bus (cluster mode): room events and admin control messages travel over
//! Redis pub/sub, presence and join counts live in Redis keys.
//!
//! Two connections per instance: a normal client for commands and `PUBLISH`, and a
//! [`SubscriberClient`] that only subscribes (a subscribed RESP2 connection cannot run
//! other commands). Both reconnect forever with exponential backoff, so a Redis outage
//! degrades the cluster to "each instance serves its own members" instead of killing
//! the process.
//!
//! Pub/sub is fire-and-forget: whatever is published while a connection is down is
//! lost. That is why every reconnect ends in [`Inbound::Resync`]: the hub then fills
//! the gap from the store's event log, which is the source of truth (architecture
//! invariant 3). The subscriber re-subscribes *before* the resync is emitted, so an
//! event is either delivered by Redis or visible to the catch-up, never neither.
//!
//! The publishing side needs the same care: an event committed while this
//! instance's connection is down cannot be published, and the other instances
//! may already have resynchronised (their connections were fine, or came back
//! sooner), so nothing would ever tell them — their members would stay behind
//! until the room's next event. So an instance that failed to publish announces
//! it on `croupier:resync` once its connection is back, and every other instance
//! answers with [`Inbound::Resync`]: the store's log has what was not published.
//!
//! Redis Cluster (`redis-cluster://`): room events use sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`) on a channel carrying the room's hash tag, so a
//! room's traffic stays on the shard that owns it; control and resync
//! announcements stay on plain channels, which a Cluster delivers to every
//! node. Sentinel (`redis-sentinel://`) behaves like one server that moves:
//! fred asks the sentinels for the master on every reconnect. A failover is a
//! reconnect (or a change of the Cluster's slot map), and ends like every
//! reconnect: re-subscribe, then [`Inbound::Resync`].
//!
//! Wire format, one channel per room (`croupier:room:<key>`, or the Cluster
//! name of [`Layout::room_channel`]), JSON payloads:
//! `{"origin","key","epoch","version","kind","value","mutationId","committedAt"}`,
//! `kind`/`value` being `add`/number, `remove`/index or `replace`/history, and
//! `committedAt` RFC 3339 with nanoseconds. `origin` is the publishing instance; an
//! instance ignores its own events because it already delivered them locally.
//!
//! TLS: a `rediss://` URL connects with rustls, trusting `REDIS_CA_CERT` (or
//! the public roots) and presenting a client certificate when one is
//! configured ([`RedisTlsFiles`]). A certificate problem ends start-up at once
//! with one line; only an unreachable server is waited for.
//!
//! The channel names and the JSON wire format live in `wire`; the background
//! tasks (dispatching messages, following reconnects, announcing lost publishes)
//! in `tasks`. This file holds the bus itself, its connections and the
//! [`Broker`] and [`ControlPlane`] implementations.
//!
//! [`Inbound::Resync`]: crate::bus::Inbound::Resync

mod tasks;
mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::TlsHostMapping;
use tokio::task::JoinHandle;

use super::{
    Broker, BusError, BusHealth, ConnectionInfo, ControlMessage, ControlPlane, InboundHandler,
    PRESENCE_TTL,
};
use crate::domain::{RoomEvent, RoomKey};
use crate::redis_layout::{Layout, fred_url};
use crate::tls::{self, RedisTlsFiles};
use tasks::{Role, check_shards, dispatch, retry_announcement, watch_connection};
use wire::{CONTROL_CHANNEL, RESYNC_CHANNEL, encode_event};

const PRESENCE_PREFIX: &str = "croupier:presence:";
const JOINS_KEY: &str = "croupier:joins";
/// Keys per `SUBSCRIBE`, `MGET` or `SCAN` page: large enough to be cheap, small
/// enough not to stall Redis for other clients.
const BATCH: usize = 500;

/// Tuning for [`RedisBus::connect_with`]; [`Default`] is what production uses.
#[derive(Debug, Clone)]
pub struct RedisBusOptions {
    /// How long start-up keeps retrying an unreachable Redis before giving up.
    pub startup_timeout: Duration,
    /// Upper bound for any single command (publish, subscribe, presence...).
    pub command_timeout: Duration,
    /// Upper bound for the `PING` behind [`ControlPlane::health`].
    pub health_timeout: Duration,
    /// First reconnect delay; doubled on each failed attempt...
    pub reconnect_min_delay: Duration,
    /// ...up to this.
    pub reconnect_max_delay: Duration,
    /// Lifetime of a presence entry that is not refreshed.
    pub presence_ttl: Duration,
    /// Pub/sub messages buffered between the socket reader and the dispatcher.
    /// Overflow is not silent: it triggers [`Inbound::Resync`].
    ///
    /// [`Inbound::Resync`]: crate::bus::Inbound::Resync
    pub message_buffer: usize,
    /// Certificates for a `rediss://` URL; ignored for `redis://`.
    pub tls: RedisTlsFiles,
}

impl Default for RedisBusOptions {
    fn default() -> Self {
        RedisBusOptions {
            startup_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            presence_ttl: PRESENCE_TTL,
            message_buffer: 1024,
            tls: RedisTlsFiles::default(),
        }
    }
}

/// Builds a command client with the bus's reconnect policy and timeouts and waits
/// until it is connected, retrying for up to `options.startup_timeout`.
///
/// [`RedisBus`] uses it internally; start-up can use it for other Redis users
/// (e.g. the room cache) so that they behave the same during an outage.
pub async fn connect_client(url: &str, options: &RedisBusOptions) -> anyhow::Result<Client> {
    let client = builder(url, options)?
        .build()
        .context("building the Redis client")?;
    init_with_retry(&client, options.startup_timeout).await?;
    Ok(client)
}

fn builder(url: &str, options: &RedisBusOptions) -> anyhow::Result<Builder> {
    let url = fred_url(url).map_err(|reason| anyhow::anyhow!("invalid REDIS_URL: {reason}"))?;
    let config = match url.strip_prefix("rediss://") {
        // fred would load the system's CA store for `rediss://`, failing on an
        // image without one; the TLS settings are ours, so parse the URL as
        // plain and attach them.
        Some(rest) => {
            let mut config =
                Config::from_url(&format!("redis://{rest}")).context("invalid REDIS_URL")?;
            let client_config = options.tls.client_config()?;
            config.tls = Some(TlsConfig {
                connector: TlsConnector::from(client_config),
                hostnames: TlsHostMapping::None,
            });
            config
        }
        None => Config::from_url(&url).context("invalid REDIS_URL")?,
    };
    let mut builder = Builder::from_config(config);
    let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1);
    // max_attempts 0 = retry forever; an outage must never end the process.
    builder.set_policy(ReconnectPolicy::new_exponential(
        0,
        millis(options.reconnect_min_delay),
        millis(options.reconnect_max_delay),
        2,
    ));
    builder.with_performance_config(|perf| {
        // Without a timeout a command issued during an outage would wait for the
        // reconnect, which may be minutes away.
        perf.default_command_timeout = options.command_timeout;
    });
    builder.with_connection_config(|conn| {
        conn.connection_timeout = options.command_timeout.max(Duration::from_secs(1));
        conn.internal_command_timeout = options.command_timeout.max(Duration::from_secs(1));
    });
    Ok(builder)
}

/// Connects, retrying with backoff while Redis is unreachable, until `budget` is spent.
async fn init_with_retry<C: ClientLike>(client: &C, budget: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + budget;
    let mut delay = Duration::from_millis(100);
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        count_command("connect");
        // With `fail_fast` (the default) a failed first attempt returns here instead of
        // entering the reconnect loop, so start-up bounds its own waiting.
        let attempt =
            tokio::time::timeout(remaining.max(Duration::from_millis(100)), client.init());
        let error = match attempt.await {
            Ok(Ok(_connection_task)) => return Ok(()),
            Ok(Err(err)) => err.to_string(),
            Err(_) => "connection attempt timed out".to_owned(),
        };
        count_error("connect");
        // fred keeps only the text of a TLS error. A rejected certificate will
        // be rejected again: stop now, and do not leave the client retrying.
        if let Some(reason) = tls::describe_text(&error, "REDIS_CA_CERT") {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.quit()).await;
            anyhow::bail!("connecting to Redis over TLS: {reason}");
        }
        let now = Instant::now();
        if now >= deadline {
            anyhow::bail!(
                "Redis still unreachable after {:.1} s: {error}",
                budget.as_secs_f32()
            );
        }
        tracing::warn!(
            error,
            retry_in_ms = delay.as_millis() as u64,
            "Redis not reachable yet"
        );
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// The Redis implementation of [`Broker`] and [`ControlPlane`], over one
/// set of connections. Dropping it closes them.
pub struct RedisBus {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    instance: String,
    /// Plain pub/sub, or sharded pub/sub with hash-tagged names in a Cluster.
    layout: Layout,
    client: Client,
    subscriber: SubscriberClient,
    handler: InboundHandler,
    /// Rooms this instance wants events for. The subscriber connection is made to
    /// match it after every reconnect. A std `Mutex` is right: it is never held
    /// across an `.await`, only for a set insert, remove or copy.
    wanted: Mutex<HashSet<RoomKey>>,
    /// A publish failed since the last resync announcement (module documentation).
    lost_publish: AtomicBool,
    /// Commands that should fail at once rather than queue while disconnected.
    fast: Options,
    health: Options,
    presence_ttl: Duration,
    client_up: AtomicBool,
    subscriber_up: AtomicBool,
    closed: AtomicBool,
}

impl RedisBus {
    /// Connects with the production [`RedisBusOptions`].
    pub async fn connect(
        url: &str,
        instance: &str,
        handler: InboundHandler,
    ) -> anyhow::Result<RedisBus> {
        Self::connect_with(url, instance, handler, RedisBusOptions::default()).await
    }

    /// Connects both clients (retrying for up to `options.startup_timeout`),
    /// subscribes to the control channel and starts the receiving tasks.
    pub async fn connect_with(
        url: &str,
        instance: &str,
        handler: InboundHandler,
        options: RedisBusOptions,
    ) -> anyhow::Result<RedisBus> {
        let started = Instant::now();
        let client = connect_client(url, &options).await?;
        let mut sub_builder = builder(url, &options)?;
        sub_builder.with_performance_config(|perf| {
            perf.broadcast_channel_capacity = options.message_buffer.max(16);
        });
        let subscriber = sub_builder
            .build_subscriber_client()
            .context("building the Redis subscriber client")?;
        let remaining = options.startup_timeout.saturating_sub(started.elapsed());
        if let Err(err) = init_with_retry(&subscriber, remaining.max(Duration::from_secs(1))).await
        {
            // Do not leave the command client reconnecting forever in the background.
            let _ = client.quit().await;
            return Err(err);
        }

        let shared = Arc::new(Shared {
            instance: instance.to_owned(),
            layout: Layout::of_url(url),
            client,
            subscriber,
            handler,
            wanted: Mutex::new(HashSet::new()),
            lost_publish: AtomicBool::new(false),
            fast: Options {
                fail_fast: true,
                timeout: Some(options.command_timeout),
                ..Options::default()
            },
            health: Options {
                fail_fast: true,
                timeout: Some(options.health_timeout),
                ..Options::default()
            },
            presence_ttl: options.presence_ttl,
            client_up: AtomicBool::new(true),
            subscriber_up: AtomicBool::new(true),
            closed: AtomicBool::new(false),
        });

        // Take the receivers before subscribing so that nothing slips past, and only
        // after the first connect so that it is not reported as a reconnect.
        let messages = shared.subscriber.message_rx();
        let mut tasks = vec![
            tokio::spawn(dispatch(shared.clone(), messages)),
            tokio::spawn(watch_connection(shared.clone(), Role::Publisher)),
            tokio::spawn(watch_connection(shared.clone(), Role::Subscriber)),
            tokio::spawn(retry_announcement(shared.clone())),
        ];
        if shared.layout == Layout::Cluster {
            tasks.push(tokio::spawn(check_shards(shared.clone())));
        }
        let bus = RedisBus { shared, tasks };
        count_command("subscribe");
        bus.shared
            .subscriber
            .subscribe(vec![CONTROL_CHANNEL, RESYNC_CHANNEL])
            .await
            .inspect_err(|_| count_error("subscribe"))
            .context("subscribing to the control channels")?;
        bus.shared
            .confirm_subscriptions()
            .await
            .context("confirming the control channel subscription")?;
        set_up_gauge(true);
        tracing::info!(instance, "Redis bus connected");
        Ok(bus)
    }

    /// The command client, for other Redis users that should share its connection
    /// (e.g. the room cache). It is closed when this bus is dropped.
    pub fn command_client(&self) -> Client {
        self.shared.client.clone()
    }

    /// Closes both connections and stops the receiving tasks.
    pub async fn shutdown(&self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = self.shared.subscriber.quit().await;
        let _ = self.shared.client.quit().await;
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for task in &self.tasks {
            task.abort();
        }
        // Without QUIT the connection tasks would keep reconnecting forever.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.shared.client.clone();
            let subscriber = self.shared.subscriber.clone();
            runtime.spawn(async move {
                let _ = subscriber.quit().await;
                let _ = client.quit().await;
            });
        }
    }
}

fn presence_key(connection_id: &str) -> String {
    format!("{PRESENCE_PREFIX}{connection_id}")
}

fn count_command(op: &'static str) {
    metrics::counter!("croupier_redis_commands_total", "op" => op).increment(1);
}

fn count_error(op: &'static str) {
    metrics::counter!("croupier_redis_errors_total", "op" => op).increment(1);
}

fn set_up_gauge(up: bool) {
    metrics::gauge!("croupier_dependency_up", "dependency" => "redis").set(if up {
        1.0
    } else {
        0.0
    });
}

/// Counts one command and its failure, and sorts a fred error into the bus's kinds.
fn observe<T>(op: &'static str, result: Result<T, Error>) -> Result<T, BusError> {
    count_command(op);
    result.map_err(|err| {
        count_error(op);
        tracing::debug!(op, error = %err, "Redis command failed");
        match err.kind() {
            ErrorKind::Parse
            | ErrorKind::Protocol
            | ErrorKind::InvalidArgument
            | ErrorKind::InvalidCommand => BusError::Protocol(err.to_string()),
            _ => BusError::Unavailable(err.to_string()),
        }
    })
}

#[async_trait]
impl Broker for RedisBus {
    fn delivering(&self) -> bool {
        self.shared.subscriber_up.load(Ordering::SeqCst)
    }

    async fn publish(&self, event: &RoomEvent) -> Result<(), BusError> {
        let payload = encode_event(&self.shared.instance, event);
        let client = self.shared.client.with_options(&self.shared.fast);
        let channel = self.shared.layout.room_channel(&event.key);
        let result = match self.shared.layout {
            Layout::Single => client.publish::<i64, _, _>(channel, payload).await,
            Layout::Cluster => client.spublish::<i64, _, _>(channel, payload).await,
        };
        if result.is_err() {
            self.shared.lost_publish.store(true, Ordering::SeqCst);
        }
        observe("publish", result)?;
        metrics::counter!("croupier_bus_messages_total", "direction" => "out").increment(1);
        Ok(())
    }

    async fn subscribe(&self, key: &RoomKey) -> Result<(), BusError> {
        // Wanted first: if the command fails because the connection is down, the
        // resubscription after the reconnect includes this room.
        self.shared.lock_wanted().insert(key.clone());
        if self.shared.subscriber.state() == ClientState::Disconnected {
            count_error("subscribe");
            return Err(BusError::Unavailable(
                "Redis subscriber is reconnecting".into(),
            ));
        }
        let channel = self.shared.layout.room_channel(key);
        observe("subscribe", self.shared.subscribe_room(&channel).await)?;
        self.shared.confirm_room_subscription(&channel).await
    }

    async fn unsubscribe(&self, key: &RoomKey) -> Result<(), BusError> {
        self.shared.lock_wanted().remove(key);
        if self.shared.subscriber.state() == ClientState::Disconnected {
            // Nothing to undo: the next connection subscribes only to wanted rooms.
            return Ok(());
        }
        let channel = self.shared.layout.room_channel(key);
        let result = match self.shared.layout {
            Layout::Single => self.shared.subscriber.unsubscribe(channel).await,
            Layout::Cluster => self.shared.subscriber.sunsubscribe(channel).await,
        };
        observe("unsubscribe", result)
    }
}

#[async_trait]
impl ControlPlane for RedisBus {
    async fn control(&self, message: ControlMessage) -> Result<(), BusError> {
        let payload =
            serde_json::to_string(&message).map_err(|e| BusError::Protocol(e.to_string()))?;
        let client = self.shared.client.with_options(&self.shared.fast);
        observe(
            "publish",
            client.publish::<i64, _, _>(CONTROL_CHANNEL, payload).await,
        )?;
        metrics::counter!("croupier_bus_messages_total", "direction" => "out").increment(1);
        Ok(())
    }

    async fn put_presence(&self, info: &ConnectionInfo) -> Result<(), BusError> {
        let payload = serde_json::to_string(info).map_err(|e| BusError::Protocol(e.to_string()))?;
        let ttl_ms = i64::try_from(self.shared.presence_ttl.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let client = self.shared.client.with_options(&self.shared.fast);
        let result = client
            .set::<(), _, _>(
                presence_key(&info.id),
                payload,
                Some(Expiration::PX(ttl_ms)),
                None,
                false,
            )
            .await;
        observe("presence_put", result)
    }

    async fn remove_presence(&self, connection_id: &str) -> Result<(), BusError> {
        let client = self.shared.client.with_options(&self.shared.fast);
        observe(
            "presence_remove",
            client.del::<i64, _>(presence_key(connection_id)).await,
        )?;
        Ok(())
    }

    async fn presence(&self) -> Result<Vec<ConnectionInfo>, BusError> {
        let client = self.shared.client.with_options(&self.shared.fast);
        let pattern = format!("{PRESENCE_PREFIX}*");
        let keys = match self.shared.layout {
            Layout::Single => scan_keys(&client, &pattern).await?,
            Layout::Cluster => scan_every_master(&self.shared.client, &pattern).await?,
        };
        let mut connections = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let values: Vec<Option<String>> = match self.shared.layout {
                Layout::Single => observe("presence_list", client.mget(chunk.to_vec()).await)?,
                // Presence keys hash to many slots, and MGET must stay in one.
                Layout::Cluster => {
                    let gets = chunk.iter().map(|key| client.get::<Option<String>, _>(key));
                    futures_util::future::join_all(gets)
                        .await
                        .into_iter()
                        .map(|value| observe("presence_list", value))
                        .collect::<Result<_, _>>()?
                }
            };
            // A key that expired between SCAN and MGET comes back as nil.
            for raw in values.into_iter().flatten() {
                match serde_json::from_str::<ConnectionInfo>(&raw) {
                    Ok(info) => connections.push(info),
                    Err(err) => {
                        count_error("decode");
                        tracing::warn!(error = %err, "malformed presence entry ignored");
                    }
                }
            }
        }
        Ok(connections)
    }

    async fn count_join(&self, key: &RoomKey) -> Result<(), BusError> {
        let client = self.shared.client.with_options(&self.shared.fast);
        observe(
            "count_join",
            client
                .hincrby::<i64, _, _>(JOINS_KEY, key.as_str(), 1)
                .await,
        )?;
        Ok(())
    }

    async fn join_counts(&self) -> Result<HashMap<String, u64>, BusError> {
        let client = self.shared.client.with_options(&self.shared.fast);
        observe("join_counts", client.hgetall(JOINS_KEY).await)
    }

    async fn health(&self) -> BusHealth {
        let started = Instant::now();
        let client = self.shared.client.with_options(&self.shared.health);
        // The outer timeout also covers time spent before the command is queued.
        let ping = tokio::time::timeout(
            self.shared.health.timeout.unwrap_or(Duration::from_secs(1)),
            client.ping::<String>(None),
        )
        .await
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "PING timed out")));
        match observe("ping", ping) {
            Ok(_) => BusHealth::Up(started.elapsed()),
            Err(_) => BusHealth::Down,
        }
    }
}

/// All keys matching `pattern`, paged with `SCAN` so Redis is never blocked.
async fn scan_keys<C: KeysInterface>(client: &C, pattern: &str) -> Result<Vec<String>, BusError> {
    let mut keys = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let page = client.scan_page::<(String, Vec<String>), _, _>(
            cursor,
            pattern,
            Some(BATCH as u32),
            None,
        );
        let (next, found) = observe("scan", page.await)?;
        keys.extend(found);
        if next == "0" {
            // SCAN may return a key more than once.
            keys.sort_unstable();
            keys.dedup();
            return Ok(keys);
        }
        cursor = next;
    }
}

/// All keys matching `pattern` on every master of a Cluster, each paged with
/// `SCAN` as in [`scan_keys`].
pub async fn scan_every_master(client: &Client, pattern: &str) -> Result<Vec<String>, BusError> {
    use fred::types::scan::Scanner;
    use futures_util::StreamExt;

    let mut keys = Vec::new();
    let mut pages =
        std::pin::pin!(client.scan_cluster(pattern.to_owned(), Some(BATCH as u32), None));
    while let Some(page) = pages.next().await {
        let mut page = observe("scan", page)?;
        if let Some(found) = page.take_results() {
            keys.extend(found.into_iter().filter_map(|k| k.into_string()));
        }
        page.next();
    }
    keys.sort_unstable();
    keys.dedup();
    Ok(keys)
}
