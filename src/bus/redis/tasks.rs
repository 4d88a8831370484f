//! The background tasks of a [`RedisBus`](super::RedisBus): forwarding pub/sub
//! messages to the handler, following each connection's losses and reconnects
//! (re-subscribing, then asking the hub to resync), and retrying resync
//! announcements; plus the methods of the shared state they work on.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;

use super::wire::{CONTROL_CHANNEL, RESYNC_CHANNEL, decode_event, published_by};
use super::{BATCH, Shared, count_error, observe, set_up_gauge};
use crate::bus::{BusError, ControlMessage, Inbound};
use crate::domain::RoomKey;
use crate::redis_layout::Layout;

/// How often a pending resync announcement is retried (besides right after a
/// reconnect), for publishes that failed only after the reconnect was reported.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);
impl Shared {
    pub(super) fn lock_wanted(&self) -> std::sync::MutexGuard<'_, HashSet<RoomKey>> {
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
        } else if channel.starts_with("croupier:") {
            // Our own events were delivered locally before they were published.
            if published_by(payload, &self.instance) {
                return;
            }
            let (_, event) = match decode_event(payload) {
                Ok(decoded) => decoded,
                Err(reason) => return self.malformed(channel, &reason),
            };
            if self.layout.room_channel(&event.key) != channel {
                return self.malformed(channel, "room key does not match the channel");
            }
            // A room unsubscribed a moment ago may still have messages in flight.
            if !self.lock_wanted().contains(&event.key) {
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
        let channels: Vec<String> = rooms.iter().map(|k| self.layout.room_channel(k)).collect();
        observe(
            "subscribe",
            self.subscriber
                .subscribe(vec![CONTROL_CHANNEL, RESYNC_CHANNEL])
                .await,
        )?;
        match self.layout {
            Layout::Single => {
                for chunk in channels.chunks(BATCH) {
                    observe("subscribe", self.subscriber.subscribe(chunk.to_vec()).await)?;
                }
            }
            // One SSUBSCRIBE may name channels of one slot only: one per room.
            Layout::Cluster => {
                for chunk in channels.chunks(BATCH) {
                    let sent = chunk.iter().map(|c| self.subscriber.ssubscribe(c.clone()));
                    for result in futures_util::future::join_all(sent).await {
                        observe("subscribe", result)?;
                    }
                }
            }
        }
        // A room left while the batch was in flight must not stay subscribed.
        let gone: Vec<String> = {
            let wanted = self.lock_wanted();
            rooms
                .iter()
                .filter(|k| !wanted.contains(*k))
                .map(|k| self.layout.room_channel(k))
                .collect()
        };
        match self.layout {
            Layout::Single if !gone.is_empty() => {
                observe("unsubscribe", self.subscriber.unsubscribe(gone).await)?;
            }
            Layout::Single => {}
            Layout::Cluster => {
                for channel in gone {
                    observe("unsubscribe", self.subscriber.sunsubscribe(channel).await)?;
                }
            }
        }
        self.confirm_subscriptions().await?;
        if self.layout == Layout::Cluster {
            for channel in &channels {
                self.confirm_room_subscription(channel).await?;
            }
        }
        Ok(())
    }

    /// Subscribes to one room's channel: sharded in a Cluster, so that the
    /// shard owning the room carries its events.
    pub(super) async fn subscribe_room(&self, channel: &str) -> Result<(), Error> {
        match self.layout {
            Layout::Single => self.subscriber.subscribe(channel.to_owned()).await,
            Layout::Cluster => self.subscriber.ssubscribe(channel.to_owned()).await,
        }
    }

    /// [`Self::confirm_subscriptions`] for one room's channel: in a Cluster the
    /// `PING` goes to the shard that took the `SSUBSCRIBE`.
    pub(super) async fn confirm_room_subscription(&self, channel: &str) -> Result<(), BusError> {
        if self.layout == Layout::Single {
            return self.confirm_subscriptions().await;
        }
        let slot = fred::util::redis_keyslot(channel.as_bytes());
        let owner = self
            .subscriber
            .cached_cluster_state()
            .and_then(|state| state.get_server(slot).cloned());
        let Some(owner) = owner else {
            return Err(BusError::Unavailable(
                "the Cluster's slot map is not known yet".into(),
            ));
        };
        let options = Options {
            cluster_node: Some(owner),
            ..self.fast.clone()
        };
        observe(
            "subscribe_confirm",
            self.subscriber
                .with_options(&options)
                .ping::<Value>(None)
                .await,
        )
        .map(|_| ())
    }

    /// Waits until Redis has processed every subscription command sent so far.
    ///
    /// fred completes `SUBSCRIBE` once it is written, not when Redis acknowledges
    /// it, but callers rely on "subscribed" meaning "no later event can pass by":
    /// the hub subscribes before reading its snapshot. A `PING` on the same
    /// connection is answered only after everything queued before it.
    pub(super) async fn confirm_subscriptions(&self) -> Result<(), BusError> {
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
pub(super) async fn dispatch(
    shared: Arc<Shared>,
    mut messages: tokio::sync::broadcast::Receiver<Message>,
) {
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
pub(super) enum Role {
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
pub(super) async fn watch_connection(shared: Arc<Shared>, role: Role) {
    let (mut reconnects, mut errors, mut changes) = match role {
        Role::Publisher => (
            shared.client.reconnect_rx(),
            shared.client.error_rx(),
            shared.client.cluster_change_rx(),
        ),
        Role::Subscriber => (
            shared.subscriber.reconnect_rx(),
            shared.subscriber.error_rx(),
            shared.subscriber.cluster_change_rx(),
        ),
    };
    loop {
        tokio::select! {
            // A Cluster's slots moved (a failover, a resharding): sharded
            // subscriptions may now point at a node that no longer owns them,
            // and events may have been lost in the move. Handled as a reconnect.
            change = changes.recv(), if shared.layout == Layout::Cluster => match change {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    tracing::info!(connection = role.name(), "Redis Cluster slot map changed");
                    match role {
                        Role::Subscriber => resubscribe_until_done(&shared).await,
                        // Usually the publisher notices first (a SPUBLISH
                        // answered MOVED after a graceful failover): the
                        // subscriber sends nothing, so it has to be told to
                        // re-read the slot map, which ends in its own change
                        // event and re-subscription.
                        Role::Publisher => {
                            if let Err(err) = shared.subscriber.sync_cluster().await {
                                tracing::warn!(error = %err, "re-reading the Cluster's slot map failed");
                            }
                        }
                    }
                    if shared.closed.load(Ordering::SeqCst) {
                        return;
                    }
                    (shared.handler)(Inbound::Resync);
                }
                Err(RecvError::Closed) => return,
            },
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
pub(super) async fn retry_announcement(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(ANNOUNCE_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shared.closed.load(Ordering::SeqCst) {
        tick.tick().await;
        if shared.lost_publish.load(Ordering::SeqCst) && shared.client.is_connected() {
            shared.announce_lost_publishes().await;
        }
    }
}

/// How often a Redis Cluster's masters are pinged one by one.
const SHARD_CHECK: Duration = Duration::from_secs(5);

/// In a Redis Cluster: pings every master of the slot map this instance
/// holds, one by one, and reports how many there are and how many answered
/// (`croupier_redis_shards`, `croupier_redis_shards_up`). A shard whose master
/// is down takes its rooms' events and cache with it until its replica takes
/// over, while the cluster as a whole still answers.
pub(super) async fn check_shards(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SHARD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shared.closed.load(Ordering::SeqCst) {
        tick.tick().await;
        let Some(routing) = shared.client.cached_cluster_state() else {
            continue;
        };
        let masters = routing.unique_primary_nodes();
        let mut up = 0usize;
        for server in &masters {
            let node = shared.client.with_cluster_node(server);
            match tokio::time::timeout(Duration::from_secs(2), node.ping::<String>(None)).await {
                Ok(Ok(_)) => up += 1,
                Ok(Err(err)) => {
                    count_error("ping");
                    tracing::debug!(shard = %server, error = %err, "a Redis Cluster master does not answer");
                }
                Err(_) => {
                    tracing::debug!(shard = %server, "a Redis Cluster master does not answer in time")
                }
            }
        }
        metrics::gauge!("croupier_redis_shards").set(masters.len() as f64);
        metrics::gauge!("croupier_redis_shards_up").set(up as f64);
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
