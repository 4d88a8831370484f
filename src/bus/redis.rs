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
//! Wire format, one channel per room (`croupier:room:{key}`), JSON payloads:
//! `{"origin","key","epoch","version","kind","value","mutationId","committedAt"}`,
//! `kind`/`value` being `add`/number, `remove`/index or `replace`/history, and
//! `committedAt` RFC 3339 with nanoseconds. `origin` is the publishing instance; an
//! instance ignores its own events because it already delivered them locally.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::{
    Bus, BusError, BusHealth, ConnectionInfo, ControlMessage, Inbound, InboundHandler, PRESENCE_TTL,
};
use crate::domain::{Change, History, MutationId, Number, RoomEvent, RoomKey};

const ROOM_CHANNEL_PREFIX: &str = "croupier:room:";
const CONTROL_CHANNEL: &str = "croupier:control";
/// "I could not publish some events; catch up from the store." Payload: the
/// announcing instance (which ignores its own announcement).
const RESYNC_CHANNEL: &str = "croupier:resync";
const PRESENCE_PREFIX: &str = "croupier:presence:";
const JOINS_KEY: &str = "croupier:joins";
/// Keys per `SUBSCRIBE`, `MGET` or `SCAN` page: large enough to be cheap, small
/// enough not to stall Redis for other clients.
const BATCH: usize = 500;
/// How often a pending resync announcement is retried (besides right after a
/// reconnect), for publishes that failed only after the reconnect was reported.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);

/// Tuning for [`RedisBus::connect_with`]; [`Default`] is what production uses.
#[derive(Debug, Clone)]
pub struct RedisBusOptions {
    /// How long start-up keeps retrying an unreachable Redis before giving up.
    pub startup_timeout: Duration,
    /// Upper bound for any single command (publish, subscribe, presence...).
    pub command_timeout: Duration,
    /// Upper bound for the `PING` behind [`Bus::health`].
    pub health_timeout: Duration,
    /// First reconnect delay; doubled on each failed attempt...
    pub reconnect_min_delay: Duration,
    /// ...up to this.
    pub reconnect_max_delay: Duration,
    /// Lifetime of a presence entry that is not refreshed.
    pub presence_ttl: Duration,
    /// Pub/sub messages buffered between the socket reader and the dispatcher.
    /// Overflow is not silent: it triggers [`Inbound::Resync`].
    pub message_buffer: usize,
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
    let config = Config::from_url(url).context("invalid REDIS_URL")?;
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

/// The Redis implementation of [`Bus`]. Dropping it closes its connections.
pub struct RedisBus {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    instance: String,
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
        let tasks = vec![
            tokio::spawn(dispatch(shared.clone(), messages)),
            tokio::spawn(watch_connection(shared.clone(), Role::Publisher)),
            tokio::spawn(watch_connection(shared.clone(), Role::Subscriber)),
            tokio::spawn(retry_announcement(shared.clone())),
        ];
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

fn room_channel(key: &RoomKey) -> String {
    format!("{ROOM_CHANNEL_PREFIX}{key}")
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
impl Bus for RedisBus {
    async fn publish(&self, event: &RoomEvent) -> Result<(), BusError> {
        let payload = encode_event(&self.shared.instance, event);
        let client = self.shared.client.with_options(&self.shared.fast);
        let result = client
            .publish::<i64, _, _>(room_channel(&event.key), payload)
            .await;
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
        let result = self.shared.subscriber.subscribe(room_channel(key)).await;
        observe("subscribe", result)?;
        self.shared.confirm_subscriptions().await
    }

    async fn unsubscribe(&self, key: &RoomKey) -> Result<(), BusError> {
        self.shared.lock_wanted().remove(key);
        if self.shared.subscriber.state() == ClientState::Disconnected {
            // Nothing to undo: the next connection subscribes only to wanted rooms.
            return Ok(());
        }
        let result = self.shared.subscriber.unsubscribe(room_channel(key)).await;
        observe("unsubscribe", result)
    }

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
        let keys = scan_keys(&client, &format!("{PRESENCE_PREFIX}*")).await?;
        let mut connections = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(BATCH) {
            let values: Vec<Option<String>> =
                observe("presence_list", client.mget(chunk.to_vec()).await)?;
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

impl Shared {
    fn lock_wanted(&self) -> std::sync::MutexGuard<'_, HashSet<RoomKey>> {
        // Poisoning only means another thread panicked while holding a plain set.
        self.wanted.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, message: Message) {
        let channel: &str = &message.channel;
        let Some(payload) = message.value.as_bytes() else {
            return self.malformed(channel, "payload is not a string");
        };
        let inbound = if channel == RESYNC_CHANNEL {
            if payload == self.instance.as_bytes() {
                return; // its own members had every event delivered locally
            }
            Inbound::Resync
        } else if channel == CONTROL_CHANNEL {
            match serde_json::from_slice::<ControlMessage>(payload) {
                Ok(control) => Inbound::Control(control),
                Err(err) => return self.malformed(channel, &err.to_string()),
            }
        } else if channel.starts_with(ROOM_CHANNEL_PREFIX) {
            let (origin, event) = match decode_event(payload) {
                Ok(decoded) => decoded,
                Err(reason) => return self.malformed(channel, &reason),
            };
            if room_channel(&event.key) != channel {
                return self.malformed(channel, "room key does not match the channel");
            }
            // Our own events were delivered locally before they were published, and
            // a room unsubscribed a moment ago may still have messages in flight.
            if origin == self.instance || !self.lock_wanted().contains(&event.key) {
                return;
            }
            Inbound::Event(event)
        } else {
            return;
        };
        metrics::counter!("croupier_bus_messages_total", "direction" => "in").increment(1);
        (self.handler)(inbound);
    }

    /// Tells the other instances to catch up from the store if a publish failed
    /// since the last announcement; if this fails too, it stays pending.
    async fn announce_lost_publishes(&self) {
        if !self.lost_publish.swap(false, Ordering::SeqCst) {
            return;
        }
        let client = self.client.with_options(&self.fast);
        let sent = client
            .publish::<i64, _, _>(RESYNC_CHANNEL, self.instance.as_str())
            .await;
        match observe("publish", sent) {
            Ok(_) => tracing::info!(
                "asked the other instances to catch up on events this one could not publish"
            ),
            Err(_) => self.lost_publish.store(true, Ordering::SeqCst),
        }
    }

    fn malformed(&self, channel: &str, reason: &str) {
        count_error("decode");
        tracing::warn!(channel, reason, "malformed bus message ignored");
    }

    /// Brings the subscriber connection in line with `wanted` after a reconnect.
    async fn resubscribe(&self) -> Result<(), BusError> {
        let rooms: Vec<RoomKey> = self.lock_wanted().iter().cloned().collect();
        let mut channels: Vec<String> = rooms.iter().map(room_channel).collect();
        channels.push(CONTROL_CHANNEL.to_owned());
        channels.push(RESYNC_CHANNEL.to_owned());
        for chunk in channels.chunks(BATCH) {
            observe("subscribe", self.subscriber.subscribe(chunk.to_vec()).await)?;
        }
        // A room left while the batch was in flight must not stay subscribed.
        let gone: Vec<String> = {
            let wanted = self.lock_wanted();
            rooms
                .iter()
                .filter(|k| !wanted.contains(*k))
                .map(room_channel)
                .collect()
        };
        if !gone.is_empty() {
            observe("unsubscribe", self.subscriber.unsubscribe(gone).await)?;
        }
        self.confirm_subscriptions().await
    }

    /// Waits until Redis has processed every subscription command sent so far.
    ///
    /// fred completes `SUBSCRIBE` once it is written, not when Redis acknowledges
    /// it, but callers rely on "subscribed" meaning "no later event can pass by":
    /// the hub subscribes before reading its snapshot. A `PING` on the same
    /// connection is answered only after everything queued before it.
    async fn confirm_subscriptions(&self) -> Result<(), BusError> {
        observe(
            "subscribe_confirm",
            self.subscriber.ping::<Value>(None).await,
        )
        .map(|_| ())
    }

    fn mark(&self, role: Role, up: bool) {
        let flag = match role {
            Role::Publisher => &self.client_up,
            Role::Subscriber => &self.subscriber_up,
        };
        let was = flag.swap(up, Ordering::SeqCst);
        if was != up {
            if up {
                tracing::info!(connection = role.name(), "Redis connection restored");
            } else {
                tracing::warn!(
                    connection = role.name(),
                    "Redis connection lost; reconnecting"
                );
            }
        }
        set_up_gauge(
            self.client_up.load(Ordering::SeqCst) && self.subscriber_up.load(Ordering::SeqCst),
        );
    }
}

/// Forwards pub/sub messages to the handler.
async fn dispatch(shared: Arc<Shared>, mut messages: tokio::sync::broadcast::Receiver<Message>) {
    loop {
        match messages.recv().await {
            Ok(message) => shared.deliver(message),
            Err(RecvError::Lagged(missed)) => {
                // Dropped messages are events someone's members now lack: catch up.
                count_error("lagged");
                tracing::warn!(missed, "bus receiver fell behind; resynchronising");
                (shared.handler)(Inbound::Resync);
            }
            Err(RecvError::Closed) => return,
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Publisher,
    Subscriber,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Publisher => "publisher",
            Role::Subscriber => "subscriber",
        }
    }
}

/// Follows one connection's losses and reconnects. After a reconnect the
/// subscriber re-subscribes, and either connection then asks the hub to resync:
/// events published or received while it was down were lost.
async fn watch_connection(shared: Arc<Shared>, role: Role) {
    let (mut reconnects, mut errors) = match role {
        Role::Publisher => (shared.client.reconnect_rx(), shared.client.error_rx()),
        Role::Subscriber => (
            shared.subscriber.reconnect_rx(),
            shared.subscriber.error_rx(),
        ),
    };
    loop {
        tokio::select! {
            reconnect = reconnects.recv() => match reconnect {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    metrics::counter!("croupier_redis_reconnects_total", "connection" => role.name()).increment(1);
                    shared.mark(role, true);
                    match role {
                        Role::Subscriber => resubscribe_until_done(&shared).await,
                        Role::Publisher => shared.announce_lost_publishes().await,
                    }
                    if shared.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    (shared.handler)(Inbound::Resync);
                }
                Err(RecvError::Closed) => return,
            },
            error = errors.recv() => match error {
                Ok((err, _)) => {
                    tracing::debug!(connection = role.name(), error = %err, "Redis connection error");
                    shared.mark(role, false);
                }
                Err(RecvError::Lagged(_)) => shared.mark(role, false),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// Retries a pending resync announcement every [`ANNOUNCE_RETRY`]: a publish can
/// fail after the reconnect that would have announced it was already reported (a
/// command issued just before a drop), or time out while the connection stays up.
async fn retry_announcement(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(ANNOUNCE_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shared.closed.load(Ordering::SeqCst) {
        tick.tick().await;
        if shared.lost_publish.load(Ordering::SeqCst) && shared.client.is_connected() {
            shared.announce_lost_publishes().await;
        }
    }
}

async fn resubscribe_until_done(shared: &Shared) {
    let mut delay = Duration::from_millis(100);
    while !shared.closed.load(Ordering::SeqCst) {
        match shared.resubscribe().await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "re-subscribing after reconnect failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// A room event on the wire. Private so that domain types stay free of transport concerns.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEvent {
    origin: String,
    key: String,
    epoch: String,
    version: u64,
    kind: String,
    value: serde_json::Value,
    #[serde(default)]
    mutation_id: Option<String>,
    committed_at: String,
}

fn encode_event(origin: &str, event: &RoomEvent) -> String {
    let value = match &event.change {
        Change::Added(n) => n.to_json(),
        Change::Removed(i) => serde_json::Value::from(*i),
        Change::Replaced(h) => serde_json::to_value(h).unwrap_or_default(),
    };
    let wire = WireEvent {
        origin: origin.to_owned(),
        key: event.key.to_string(),
        epoch: event.epoch.to_string(),
        version: event.version,
        kind: event.change.kind().to_owned(),
        value,
        mutation_id: event.mutation_id.as_ref().map(|m| m.as_str().to_owned()),
        committed_at: event
            .committed_at
            .to_rfc3339_opts(SecondsFormat::Nanos, true),
    };
    // Serialising plain strings, integers and JSON values cannot fail.
    serde_json::to_string(&wire).unwrap_or_default()
}

/// Parses a payload into (origin instance, event); the error says what was wrong.
fn decode_event(payload: &[u8]) -> Result<(String, RoomEvent), String> {
    let wire: WireEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let change = match wire.kind.as_str() {
        "add" => Change::Added(Number::from_json(&wire.value).map_err(|e| e.to_string())?),
        "remove" => Change::Removed(
            wire.value
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or("remove index is not an unsigned integer")?,
        ),
        "replace" => Change::Replaced(
            History::from_json(&wire.value, usize::MAX).map_err(|e| e.to_string())?,
        ),
        other => return Err(format!("unknown change kind {other:?}")),
    };
    let mutation_id = wire
        .mutation_id
        .map(|id| MutationId::from_json(&serde_json::Value::String(id)))
        .transpose()
        .map_err(str::to_owned)?;
    let committed_at = DateTime::parse_from_rfc3339(&wire.committed_at)
        .map_err(|e| format!("committedAt: {e}"))?
        .with_timezone(&Utc);
    let event = RoomEvent {
        key: RoomKey::parse(&wire.key).map_err(|e| e.to_string())?,
        epoch: wire.epoch.into(),
        version: wire.version,
        change,
        mutation_id,
        committed_at,
    };
    Ok((wire.origin, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(change: Change) -> RoomEvent {
        RoomEvent {
            key: RoomKey::parse("Рулетка 1").unwrap(),
            epoch: "e1".into(),
            version: 7,
            change,
            mutation_id: Some(MutationId::new("m-1".into())),
            committed_at: DateTime::parse_from_rfc3339("2024-05-01T10:00:00.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn events_round_trip_through_the_wire_format() {
        let history = History::from_numbers(vec![Number::Single(3), Number::DoubleZero]);
        for change in [
            Change::Added(Number::Single(17)),
            Change::Added(Number::DoubleZero),
            Change::Removed(4),
            Change::Replaced(history),
            Change::Replaced(History::default()),
        ] {
            let sent = event(change);
            let (origin, received) = decode_event(encode_event("a", &sent).as_bytes()).unwrap();
            assert_eq!(origin, "a");
            assert_eq!(received, sent);
        }
    }

    #[test]
    fn malformed_payloads_are_rejected_not_panicked_on() {
        let good = encode_event("a", &event(Change::Added(Number::Single(1))));
        let mut bad: Vec<String> = vec!["".into(), "null".into(), "[]".into(), "{".into()];
        for (from, to) in [
            ("\"value\":1", "\"value\":37"),
            ("\"kind\":\"add\"", "\"kind\":\"spin\""),
            ("\"key\":\"Рулетка 1\"", "\"key\":\"a/b\""),
            ("2024-05-01T10:00:00.123456789Z", "yesterday"),
            ("\"version\":7", "\"version\":-1"),
        ] {
            assert!(good.contains(from), "{from} not in {good}");
            bad.push(good.replace(from, to));
        }
        for payload in bad {
            assert!(
                decode_event(payload.as_bytes()).is_err(),
                "{payload} was accepted"
            );
        }
    }
}
