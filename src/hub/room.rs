//! One room's task: the mirror of the room, its local members, and the only
//! writer of the room on this instance.
//!
//! The task is the only place that touches its members and mirror, so ordering
//! needs no locks: commands are handled one at a time, in arrival order. The
//! writes queued while it was busy are committed together, with one store
//! call; their events are published to the other instances (and the room
//! written into the cache) by a second task per room, so that neither waits
//! for the other and the room's publishes stay in commit order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use tokio::sync::{mpsc, watch};
use tokio::time::{Duration, Instant};

use super::view::{Snapshot, View};
use super::{Command, Greeting, Hub, Member, Saved, WriteReply, Written};
use crate::bus::DynBroker;
use crate::domain::{Change, History, Room, RoomEvent, RoomKey, Version};
use crate::protocol::frames::{self, Dialect, Frame};
use crate::store::cached::RoomCache;
use crate::store::{Batch, Head, Mutation, Outcome, Position, Shape, StoreError};

/// How long events the store has, and this instance has not seen yet, may
/// still be on their way over the bus before the repair reads them.
const REPAIR_GRACE: Duration = Duration::from_millis(250);

/// How long events that arrived ahead of a gap wait for the missing ones
/// before the room task reads them from the store's event log.
const GAP_WAIT: Duration = Duration::from_millis(5);

/// The most writes committed with one store call.
const MAX_BATCH: usize = 256;

/// How long the writers of a batch wait for its events to be published before
/// they are answered. Waiting means the other instances normally have the
/// events before a writer hears back, so its next read elsewhere already sees
/// its write; bounding it means a slow bus does not hold up acknowledgements
/// of durable writes. (The cache write is waited for in full: it is bounded by
/// the cache's own short timeouts, and an acknowledged write must never be
/// missing from what other instances read from the cache.)
const PUBLISH_WAIT: Duration = Duration::from_millis(50);

struct Mirror {
    history: History,
    version: Version,
    /// `None` while the room does not exist in the store yet.
    epoch: Option<Arc<str>>,
    /// `None` until known: a room created after the mirror was loaded may have
    /// been created with a password.
    protected: Option<bool>,
    /// What writers' replies show besides the history; `None` while unknown
    /// (the room did not exist when the mirror was loaded).
    meta: Option<Meta>,
}

impl Mirror {
    /// Where the mirror stands, with the rest of the head when it knows it:
    /// what a batch is sent with, so the store may commit it without reading
    /// the room first.
    fn head(&self) -> Position {
        let shape = self
            .meta
            .zip(self.protected)
            .map(|(meta, protected)| Shape {
                id: meta.id,
                history_length: self.history.len(),
                protected,
            });
        Position {
            epoch: self.epoch.clone(),
            version: self.version,
            shape,
        }
    }
}

/// A room's row identity and times, as the store last reported them.
#[derive(Debug, Clone, Copy)]
struct Meta {
    id: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<&Head> for Meta {
    fn from(head: &Head) -> Self {
        Meta {
            id: head.id,
            created_at: head.created_at,
            updated_at: head.updated_at,
        }
    }
}

/// Where a committed event stands against the mirror.
enum Place {
    /// Right after the mirror's version.
    Next,
    /// Already applied.
    Seen,
    /// Further ahead (events are missing), or of another epoch.
    Elsewhere,
}

/// The room right after one writer's event: its version and history length,
/// and its own copy of the history when the final one is not an extension.
struct State {
    version: Version,
    len: usize,
    own: Option<Arc<Snapshot>>,
}

/// A copy of the mirror as it is now, to keep one writer's room (only its
/// history is read).
fn mirror_snapshot(mirror: &Mirror, epoch: &Arc<str>) -> Arc<Snapshot> {
    Arc::new(Snapshot::new(
        mirror.version,
        epoch.clone(),
        mirror.protected.unwrap_or(false),
        mirror.history.clone(),
    ))
}

/// The last batch whose events were all published, and the last one whose
/// room the cache holds (or whose failed write has been dealt with).
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    published: u64,
    cached: u64,
}

/// Where committed batches go, numbered per task (writers wait for theirs):
/// their events to the bus, the room after each into the cache.
struct Outgoing {
    events: mpsc::UnboundedSender<(u64, Vec<RoomEvent>)>,
    rooms: mpsc::UnboundedSender<(u64, Option<RoomState>)>,
}

/// The room after a batch, as the cache keeps it.
type RoomState = (Arc<Snapshot>, Meta);

struct RoomTask {
    hub: Hub,
    key: RoomKey,
    generation: u64,
    view: Arc<View>,
    mirror: Option<Mirror>,
    recent: VecDeque<RoomEvent>,
    /// Events that arrived ahead of a gap, waiting for the gap to be filled.
    pending: BTreeMap<Version, RoomEvent>,
    members: Vec<Member>,
    /// Commands that arrived while writes were being gathered into a batch,
    /// handled (in order) right after it.
    deferred: VecDeque<Command>,
    /// To the task that publishes committed batches and writes the cache.
    outgoing: Outgoing,
    /// How far that task got.
    progress: watch::Receiver<Progress>,
    /// The number of the last batch handed to it.
    batches: u64,
    /// The store was seen ahead of the mirror (this version): unless the
    /// events arrive over the bus by the deadline, they are read from the log.
    behind: Option<(Version, Instant)>,
}

pub(super) fn spawn(
    hub: Hub,
    key: RoomKey,
    generation: u64,
    view: Arc<View>,
    rx: mpsc::UnboundedReceiver<Command>,
) {
    let (events, published) = mpsc::unbounded_channel();
    let (rooms, cached) = mpsc::unbounded_channel();
    let (done, progress) = watch::channel(Progress::default());
    tokio::spawn(publish_batches(
        hub.inner.bus.clone(),
        hub.inner.cache.clone(),
        key.clone(),
        published,
        cached,
        done,
    ));
    let outgoing = Outgoing { events, rooms };
    metrics::gauge!("croupier_rooms_active").increment(1.0);
    let task = RoomTask {
        hub,
        key,
        generation,
        view,
        mirror: None,
        recent: VecDeque::new(),
        pending: BTreeMap::new(),
        members: Vec::new(),
        deferred: VecDeque::new(),
        outgoing,
        progress,
        batches: 0,
        behind: None,
    };
    tokio::spawn(task.run(rx));
}

/// Publishes committed batches in commit order and, independently, writes the
/// newest room into the cache, marking each step done: a publish that waits
/// for a Redis that is gone does not hold up the cache writes (which writers
/// wait for), nor the other way round. What queued up meanwhile goes out
/// together: the events in one go, the newest room in one write. Ends when the
/// room task is gone and everything it handed over is out.
async fn publish_batches(
    bus: DynBroker,
    cache: Option<RoomCache>,
    key: RoomKey,
    mut events: mpsc::UnboundedReceiver<(u64, Vec<RoomEvent>)>,
    mut rooms: mpsc::UnboundedReceiver<(u64, Option<RoomState>)>,
    done: watch::Sender<Progress>,
) {
    let publishing = async {
        while let Some((mut seq, mut batch)) = events.recv().await {
            while let Ok((next, more)) = events.try_recv() {
                seq = next;
                batch.extend(more);
            }
            // Started in commit order, so they leave in that order; a receiver
            // that still sees a gap fills it from the store.
            let results = join_all(batch.iter().map(|event| bus.publish(event))).await;
            for (event, result) in batch.iter().zip(results) {
                // The write is durable; a lost publish is repaired by the
                // receivers' gap filling and periodic catch-up.
                if let Err(err) = result {
                    tracing::warn!(room = %event.key, version = event.version.get(), error = %err, "bus publish failed");
                }
            }
            done.send_modify(|progress| progress.published = seq);
        }
    };
    let caching = async {
        while let Some((mut seq, mut state)) = rooms.recv().await {
            while let Ok((next, newer)) = rooms.try_recv() {
                seq = next;
                state = newer.or(state);
            }
            if let (Some(cache), Some((snapshot, meta))) = (&cache, state) {
                let room = Room {
                    id: meta.id,
                    key: key.clone(),
                    history: snapshot.history.clone(),
                    version: snapshot.version,
                    epoch: snapshot.epoch.clone(),
                    created_at: meta.created_at,
                    updated_at: meta.updated_at,
                    protected: snapshot.protected,
                };
                cache.write(&room).await;
            }
            done.send_modify(|progress| progress.cached = seq);
        }
    };
    tokio::join!(publishing, caching);
}

impl Drop for RoomTask {
    /// However the task ends — retired, or a panic — reads stop using its
    /// snapshot and the hub forgets it, so the next command starts a new task.
    /// After a panic its members are closed so that they reconnect and resume
    /// rather than wait for events that no task will deliver; writers waiting
    /// for an answer see their reply channel closed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for member in self.members.drain(..) {
                member.outbox.overflow();
            }
        }
        self.view.clear();
        self.hub.forget(&self.key, self.generation);
        metrics::gauge!("croupier_rooms_active").decrement(1.0);
    }
}

impl RoomTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let bus = self.hub.inner.bus.clone();
        // Subscribe before the first snapshot is read, so an event committed after
        // the snapshot cannot pass by unseen. If the bus is down, local events still
        // flow and the bus asks for a catch-up once it is back.
        if let Err(err) = bus.subscribe(&self.key).await {
            tracing::warn!(room = %self.key, error = %err, "bus subscribe failed");
        }
        let linger = self.hub.inner.config.linger;
        let read_linger = self.hub.inner.config.read_linger;
        // When an event arrived ahead of a gap: the moment to stop waiting for the
        // missing ones and read them from the store.
        let mut gap_deadline: Option<Instant> = None;
        loop {
            let wake = [gap_deadline, self.behind.map(|(_, at)| at)]
                .into_iter()
                .flatten()
                .min();
            let deadline = match wake {
                Some(deadline) => Some(deadline),
                None if self.members.is_empty() => Some(Instant::now() + self.linger(linger)),
                None => None,
            };
            let received = match (self.deferred.pop_front(), deadline) {
                (Some(command), _) => Some(Some(command)),
                (None, Some(deadline)) => tokio::time::timeout_at(deadline, rx.recv()).await.ok(),
                (None, None) => Some(rx.recv().await),
            };
            match received {
                Some(Some(command)) => self.handle(command, &mut rx).await,
                Some(None) => break,
                None if self.behind.is_some_and(|(_, at)| at <= Instant::now()) => {
                    self.finish_verify().await
                }
                None if gap_deadline.is_some() => self.catch_up().await,
                None if self.view.idle() < read_linger => continue,
                None if self.hub.try_retire(&self.key, self.generation, &rx) => break,
                None => continue,
            }
            gap_deadline = match gap_deadline {
                _ if self.pending.is_empty() => None,
                None => Some(Instant::now() + GAP_WAIT),
                // Still missing after a catch-up: try again later.
                Some(deadline) if deadline <= Instant::now() => Some(Instant::now() + GAP_WAIT),
                waiting => waiting,
            };
            if self.mirror.as_ref().is_some_and(|m| m.protected.is_none()) {
                self.learn_protection().await;
            }
        }
        self.view.clear();
        if let Err(err) = bus.unsubscribe(&self.key).await {
            tracing::debug!(room = %self.key, error = %err, "bus unsubscribe failed");
        }
    }

    /// How long to stay without members. A room that is not being read,
    /// while the hub runs more room tasks than it follows for reads, is gone
    /// as soon as nothing is queued: writes to ever more rooms must not grow
    /// the instance beyond that bound (each is committed by a task of its own,
    /// which then leaves).
    fn linger(&self, linger: Duration) -> Duration {
        let config = &self.hub.inner.config;
        if self.view.idle() >= config.read_linger && self.hub.active_rooms() > config.max_read_rooms
        {
            Duration::ZERO
        } else {
            linger
        }
    }

    async fn handle(&mut self, command: Command, rx: &mut mpsc::UnboundedReceiver<Command>) {
        match command {
            Command::Join {
                member,
                greeting,
                reply,
            } => {
                let result = self.join(member, greeting).await;
                let _ = reply.send(result);
            }
            Command::Mutate { mutation, reply } => self.write(mutation, reply, rx).await,
            Command::Leave { conn_id } => self.members.retain(|m| m.conn_id != conn_id),
            Command::Event(event) => self.on_event(event).await,
            Command::CatchUp => {
                if self.mirror.is_some() {
                    self.catch_up().await;
                }
            }
            Command::Protected => self.on_protected().await,
            Command::Verify(stored) => self.verify(stored).await,
            Command::Watch => {
                self.view.touch();
                if self.mirror.is_none()
                    && let Err(err) = self.load().await
                {
                    tracing::debug!(room = %self.key, error = %err, "cannot load a read room");
                }
            }
        }
    }

    /// Publishes the mirror as the room's read snapshot, or withdraws the
    /// snapshot while the mirror cannot answer a read on its own. Returns the
    /// snapshot reads now see.
    fn publish_view(&self) -> Option<Arc<Snapshot>> {
        match &self.mirror {
            Some(Mirror {
                history,
                version,
                epoch: Some(epoch),
                protected: Some(protected),
                ..
            }) => {
                if self.view.shows(epoch, *version)
                    && let Some(current) = self.view.current()
                {
                    // Already shown: no need to copy the history again.
                    return Some(current);
                }
                let snapshot = Arc::new(Snapshot::new(
                    *version,
                    epoch.clone(),
                    *protected,
                    history.clone(),
                ));
                self.view.publish(snapshot.clone());
                Some(snapshot)
            }
            _ => {
                self.view.clear();
                None
            }
        }
    }

    /// The room came into existence after the mirror was loaded: ask the store
    /// whether it was created with a password (fixed from then on).
    async fn learn_protection(&mut self) {
        let Some(epoch) = self.mirror.as_ref().and_then(|m| m.epoch.clone()) else {
            return;
        };
        match self.hub.inner.store.room(&self.key).await {
            Ok(Some(room)) if room.epoch == epoch => {
                if let Some(mirror) = &mut self.mirror {
                    mirror.protected = Some(room.protected);
                }
                self.publish_view();
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(room = %self.key, error = %err, "cannot look up room protection")
            }
        }
    }

    /// Commits this write and every write queued behind it (up to
    /// [`MAX_BATCH`]) with one store call; delivers what the store committed —
    /// first what other instances committed since the mirror's version, then
    /// the batch — to the members, publishes the read snapshot, hands the batch
    /// to the publishing task and answers each writer.
    async fn write(
        &mut self,
        mutation: Mutation,
        reply: WriteReply,
        rx: &mut mpsc::UnboundedReceiver<Command>,
    ) {
        let mut mutations = Vec::new();
        let mut replies = Vec::new();
        let mut next = Some((mutation, reply));
        while let Some((mutation, reply)) = next.take() {
            // A writer that went away (its request was dropped) is not
            // committed for: nobody would be told.
            if !reply.is_closed() {
                mutations.push(mutation);
                replies.push(reply);
            }
            while next.is_none() && mutations.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Command::Mutate { mutation, reply }) => next = Some((mutation, reply)),
                    Ok(other) => self.deferred.push_back(other),
                    Err(_) => break,
                }
            }
        }
        if mutations.is_empty() {
            return;
        }
        if self.mirror.is_none()
            && let Err(err) = self.load().await
        {
            answer(
                replies,
                mutations.iter().map(|_| Err(err.clone())).collect(),
            );
            return;
        }
        let known = self.held().unwrap_or_default();
        let store = self.hub.inner.store.clone();
        let batch = match store.apply_batch(&self.key, &known, &mutations).await {
            Ok(batch) if batch.outcomes.len() == mutations.len() => batch,
            Ok(batch) => {
                let err = StoreError::Internal(format!(
                    "the store answered {} mutations with {} outcomes",
                    mutations.len(),
                    batch.outcomes.len()
                ));
                tracing::error!(room = %self.key, error = %err, "cannot answer a batch");
                answer(
                    replies,
                    mutations.iter().map(|_| Err(err.clone())).collect(),
                );
                // Whatever it did commit reaches the members this way.
                self.resync_all().await;
                return;
            }
            Err(err) => {
                answer(
                    replies,
                    mutations.iter().map(|_| Err(err.clone())).collect(),
                );
                return;
            }
        };
        let (answers, events, current) = self.take_batch(batch).await;
        if events.is_empty() {
            answer(replies, answers);
            return;
        }
        self.batches += 1;
        let seq = self.batches;
        let state = current.zip(self.mirror.as_ref().and_then(|m| m.meta));
        let _ = self.outgoing.events.send((seq, events));
        let _ = self.outgoing.rooms.send((seq, state));
        let (mut published, mut cached) = (self.progress.clone(), self.progress.clone());
        tokio::spawn(async move {
            // Each wait ends early if the publishing task is gone: the writes
            // are durable either way, and a lost publish is repaired by the
            // receivers.
            let publish = async {
                let wait = published.wait_for(|progress| progress.published >= seq);
                let _ = tokio::time::timeout(PUBLISH_WAIT, wait).await;
            };
            let cache = async {
                let _ = cached.wait_for(|progress| progress.cached >= seq).await;
            };
            tokio::join!(publish, cache);
            answer(replies, answers);
        });
    }

    /// Brings the mirror and the members up to the store's answer to a batch,
    /// and works out each writer's answer. Returns the answers, the events the
    /// batch committed (to publish) and the read snapshot right after it.
    async fn take_batch(
        &mut self,
        batch: Batch,
    ) -> (
        Vec<Result<Written, StoreError>>,
        Vec<RoomEvent>,
        Option<Arc<Snapshot>>,
    ) {
        let Batch {
            missed,
            outcomes,
            head,
        } = batch;
        let events: Vec<RoomEvent> = outcomes
            .iter()
            .filter_map(|outcome| match outcome {
                Outcome::Applied(event) => Some(event.clone()),
                _ => None,
            })
            .collect();
        let ours: HashMap<Version, usize> = outcomes
            .iter()
            .enumerate()
            .filter_map(|(i, outcome)| match outcome {
                Outcome::Applied(event) => Some((event.version, i)),
                _ => None,
            })
            .collect();
        let mut states: Vec<Option<State>> = outcomes.iter().map(|_| None).collect();
        // What other instances committed first, then the batch: each event
        // applied and delivered exactly once, in version order. Anything that
        // does not follow on is read from the event log; what still does not
        // (another epoch, a pruned log) makes the room reload below.
        let mut queue: VecDeque<RoomEvent> = missed.unwrap_or_default().into();
        queue.extend(events.iter().cloned());
        let mut log_reads = 0;
        // Writers whose room so far is a prefix of the mirror's history.
        let mut open: Vec<usize> = Vec::new();
        while let Some(event) = queue.pop_front() {
            match self.place(&event) {
                Place::Seen => {}
                Place::Next => {
                    let reshapes = !matches!(event.change, Change::Added(_));
                    if let Some(mirror) = self.mirror.as_ref().filter(|_| reshapes) {
                        // A writer's reply shows the room right after its own
                        // event: once a later event removes or replaces numbers,
                        // that room is no longer a prefix of the final one, so
                        // the open writers keep a copy of it now.
                        if !open.is_empty() {
                            let before = mirror_snapshot(mirror, &event.epoch);
                            for i in open.drain(..) {
                                if let Some(state) = &mut states[i] {
                                    state.own = Some(before.clone());
                                }
                            }
                        }
                    }
                    let mine = ours
                        .get(&event.version)
                        .copied()
                        .filter(|_| head.as_ref().is_some_and(|h| h.epoch == event.epoch));
                    self.deliver(event);
                    if let (Some(i), Some(mirror)) = (mine, &self.mirror) {
                        states[i] = Some(State {
                            version: mirror.version,
                            len: mirror.history.len(),
                            own: None,
                        });
                        open.push(i);
                    }
                }
                Place::Elsewhere if log_reads < 2 => {
                    log_reads += 1;
                    let Some(after) = self.mirror.as_ref().map(|m| m.version) else {
                        break;
                    };
                    match self.hub.inner.store.events_since(&self.key, after).await {
                        Ok(Some(log)) => {
                            queue.push_front(event);
                            for missing in log.into_iter().rev() {
                                queue.push_front(missing);
                            }
                        }
                        Ok(None) => break,
                        Err(err) => {
                            tracing::warn!(room = %self.key, error = %err, "cannot read the event log after a write");
                            break;
                        }
                    }
                }
                Place::Elsewhere => break,
            }
        }
        // The mirror must now hold the room as the store reports it after the
        // batch (or later: the log may have had newer events).
        let consistent = match (&head, &self.mirror) {
            (Some(head), Some(mirror)) => {
                mirror.epoch.as_deref() == Some(&*head.epoch) && mirror.version >= head.version
            }
            (None, Some(mirror)) => mirror.epoch.is_none(),
            (_, None) => false,
        };
        if consistent {
            if let (Some(head), Some(mirror)) = (&head, &mut self.mirror) {
                mirror.protected = Some(head.protected);
                mirror.meta = Some(Meta::from(head));
            }
        } else {
            // Another epoch, a pruned log, or a store that cannot be read: every
            // member gets the room as the store now holds it, and every writer
            // of the batch that room.
            tracing::info!(room = %self.key, "room reloaded after a write it could not follow");
            self.resync_all().await;
            states.iter_mut().for_each(|state| *state = None);
        }
        let current = self.publish_view();
        let meta = self.mirror.as_ref().and_then(|mirror| mirror.meta);
        let answers = outcomes
            .into_iter()
            .zip(states)
            .map(|(outcome, state)| {
                let (event, duplicate) = match outcome {
                    Outcome::Applied(event) => (event, false),
                    Outcome::Duplicate(event) => (event, true),
                    Outcome::Refused(err) => return Err(err),
                };
                let (Some(current), Some(meta)) = (&current, meta) else {
                    return Err(StoreError::Unavailable(
                        "the room could not be read back after the write".into(),
                    ));
                };
                let (version, len, snapshot) = match state {
                    Some(State { version, len, own }) => {
                        (version, len, own.unwrap_or_else(|| current.clone()))
                    }
                    None => (current.version, current.history.len(), current.clone()),
                };
                let room = Saved {
                    id: meta.id,
                    version,
                    epoch: current.epoch.clone(),
                    protected: current.protected,
                    created_at: meta.created_at,
                    updated_at: meta.updated_at,
                    snapshot,
                    len,
                };
                Ok(Written {
                    event,
                    duplicate,
                    room,
                })
            })
            .collect();
        // Events from other instances that were waiting behind the batch.
        self.drain_pending();
        (answers, events, current)
    }

    /// Where a committed event stands against the mirror.
    fn place(&self, event: &RoomEvent) -> Place {
        let Some(mirror) = &self.mirror else {
            return Place::Elsewhere;
        };
        match &mirror.epoch {
            Some(epoch) if *epoch != event.epoch => Place::Elsewhere,
            Some(_) if event.version <= mirror.version => Place::Seen,
            _ if event.version == mirror.version.next() => Place::Next,
            _ => Place::Elsewhere,
        }
    }

    async fn load(&mut self) -> Result<(), StoreError> {
        self.load_from(false).await
    }

    /// Loads the mirror; `fresh` reads past the Redis cache, for the times
    /// the cache itself may be wrong (see [`crate::store::Store::room_fresh`]).
    async fn load_from(&mut self, fresh: bool) -> Result<(), StoreError> {
        let store = &self.hub.inner.store;
        let room = if fresh {
            store.room_fresh(&self.key).await?
        } else {
            store.room(&self.key).await?
        };
        self.mirror = Some(match room {
            Some(room) => Mirror {
                meta: Some(Meta {
                    id: room.id,
                    created_at: room.created_at,
                    updated_at: room.updated_at,
                }),
                history: room.history,
                version: room.version,
                epoch: Some(room.epoch),
                protected: Some(room.protected),
            },
            None => Mirror {
                history: History::default(),
                version: Version::ZERO,
                epoch: None,
                protected: None,
                meta: None,
            },
        });
        self.recent.clear();
        self.pending.clear();
        self.publish_view();
        Ok(())
    }

    async fn join(&mut self, member: Member, greeting: Greeting) -> Result<(), StoreError> {
        if self.mirror.is_none() {
            self.load().await?;
        }
        self.members.retain(|m| m.conn_id != member.conn_id);
        let Some(mirror) = &self.mirror else {
            return Err(StoreError::Internal(
                "room mirror missing after load".into(),
            ));
        };
        // The room may have become protected after the connection checked it.
        if mirror.protected == Some(true) && !member.authorized {
            return Err(StoreError::AuthRequired);
        }
        let epoch = mirror.epoch.as_deref();
        let mut greeting_frames: Vec<(Frame, &'static str)> = Vec::new();
        match greeting {
            Greeting::Sync => greeting_frames.push((
                frames::full_state(
                    member.dialect,
                    &self.key,
                    &mirror.history,
                    mirror.version,
                    epoch,
                ),
                frames::full_state_type(member.dialect),
            )),
            Greeting::HistoryUpdate => greeting_frames.push((
                frames::history_update(&self.key, &mirror.history),
                "historyUpdate",
            )),
            Greeting::Nothing => {}
            Greeting::Resume {
                version,
                epoch: client_epoch,
            } => {
                let replay = if client_epoch.is_some_and(|e| Some(e.as_str()) != epoch) {
                    None
                } else {
                    self.missed_events(version).await
                };
                let Some(mirror) = self.mirror.as_ref() else {
                    return Err(StoreError::Internal(
                        "room mirror missing after load".into(),
                    ));
                };
                match replay {
                    Some(events) => {
                        for event in &events {
                            greeting_frames.push((
                                frames::event(member.dialect, event, &mirror.history),
                                frames::frame_type(member.dialect, &event.change),
                            ));
                        }
                        greeting_frames.push((
                            frames::recovered(&self.key, mirror.version, epoch),
                            "recovered",
                        ));
                    }
                    None => {
                        metrics::counter!("croupier_ws_resyncs_total").increment(1);
                        greeting_frames.push((
                            frames::sync_v2(
                                &self.key,
                                &mirror.history,
                                mirror.version,
                                mirror.epoch.as_deref(),
                            ),
                            "sync",
                        ));
                    }
                }
            }
        }
        for (_, kind) in &greeting_frames {
            metrics::counter!("croupier_ws_messages_sent_total", "type" => *kind).increment(1);
        }
        if greeting_frames
            .into_iter()
            .all(|(frame, _)| member.outbox.push(&frame))
        {
            self.members.push(member);
        }
        Ok(())
    }

    /// The events after `version` up to the mirror's version, if every one can
    /// be replayed (from memory, else from the store's log) and they fit the
    /// member's queue. `None` means "send a full sync instead".
    async fn missed_events(&self, version: Version) -> Option<Vec<RoomEvent>> {
        let mirror = self.mirror.as_ref()?;
        if version > mirror.version {
            return None;
        }
        let missing = mirror.version.since(version) as usize;
        if missing + 2 > self.hub.inner.config.queue_capacity {
            return None;
        }
        if missing == 0 {
            return Some(Vec::new());
        }
        if self
            .recent
            .front()
            .is_some_and(|e| e.version <= version.next())
        {
            return Some(
                self.recent
                    .iter()
                    .filter(|e| e.version > version)
                    .cloned()
                    .collect(),
            );
        }
        let events = self
            .hub
            .inner
            .store
            .events_since(&self.key, version)
            .await
            .ok()??;
        let events: Vec<RoomEvent> = events
            .into_iter()
            .filter(|e| e.version <= mirror.version && Some(&e.epoch) == mirror.epoch.as_ref())
            .collect();
        (events.len() == missing).then_some(events)
    }

    async fn on_event(&mut self, event: RoomEvent) {
        let Some(mirror) = &self.mirror else {
            // Not loaded: there are no members yet; the first join reads the store.
            return;
        };
        if mirror.epoch.as_ref().is_some_and(|e| *e != event.epoch) {
            // The room was recreated or the database restored: start over.
            self.resync_all().await;
            return;
        }
        if event.version <= mirror.version {
            return; // already delivered (the same event came by two paths)
        }
        if event.version > mirror.version.next() {
            // Usually the missing events are already on their way: writers of
            // one committed group are answered in any order, and publishes may
            // overtake each other. The run loop reads the store only if they do
            // not arrive within `GAP_WAIT`.
            self.pending.insert(event.version, event);
            return;
        }
        self.apply_and_deliver(event);
        self.drain_pending();
    }

    /// Compares the mirror with the room's head as the periodic repair read
    /// it from the store (`None`: no such room).
    async fn verify(&mut self, stored: Option<Position>) {
        let Some(held) = self.held() else { return };
        let stored = stored.unwrap_or_default();
        if stored == held {
            return;
        }
        if self.is_behind(&held, &stored) {
            self.expect(stored.version);
            return;
        }
        // The heads were read before this task handled its latest events:
        // confirm with a fresh read before changing anything.
        let fresh = match self
            .hub
            .inner
            .store
            .heads(std::slice::from_ref(&self.key))
            .await
        {
            Ok(heads) => heads.into_iter().next().map(|(_, p)| p).unwrap_or_default(),
            Err(err) => {
                tracing::debug!(room = %self.key, error = %err, "cannot verify a room against the store");
                return;
            }
        };
        let Some(held) = self.held() else { return };
        if fresh == held {
            return;
        }
        if self.is_behind(&held, &fresh) {
            self.expect(fresh.version);
            return;
        }
        let kind = if held.epoch.is_some() && fresh.epoch == held.epoch {
            // The store has less than this instance delivered: an
            // asynchronous failover or a restore lost commits. Numbering
            // must not go on in the epoch whose later versions clients saw.
            if let Err(err) = self.hub.inner.store.fork_epoch(&self.key, &held).await {
                tracing::warn!(room = %self.key, error = %err, "cannot move a room that went back in time to a new epoch");
                return;
            }
            "rewind"
        } else {
            "epoch"
        };
        metrics::counter!("croupier_repairs_total", "kind" => kind).increment(1);
        tracing::warn!(
            room = %self.key,
            kind,
            held_version = held.version.get(),
            stored_version = fresh.version.get(),
            "room differs from the store; every member gets the store's state"
        );
        self.behind = None;
        self.resync_all().await;
    }

    /// Where the mirror stands, if the room is loaded.
    fn held(&self) -> Option<Position> {
        self.mirror.as_ref().map(Mirror::head)
    }

    /// The store holds later events of the mirror's epoch (or the room,
    /// created since the mirror was loaded): normally they are on their way
    /// over the bus.
    fn is_behind(&self, held: &Position, stored: &Position) -> bool {
        stored.version > held.version && (held.epoch.is_none() || stored.epoch == held.epoch)
    }

    fn expect(&mut self, version: Version) {
        if self.behind.is_none_or(|(v, _)| v < version) {
            let at = self
                .behind
                .map_or_else(|| Instant::now() + REPAIR_GRACE, |(_, at)| at);
            self.behind = Some((version, at));
        }
    }

    /// The store was ahead a moment ago: if the events still have not
    /// arrived, their publish was lost; read them from the log.
    async fn finish_verify(&mut self) {
        let Some((version, _)) = self.behind.take() else {
            return;
        };
        let Some(held) = self.mirror.as_ref().map(|m| m.version) else {
            return;
        };
        if held < version {
            metrics::counter!("croupier_repairs_total", "kind" => "behind").increment(1);
            tracing::warn!(room = %self.key, held_version = held.get(), stored_version = version.get(), "events that never arrived over the bus are read from the store");
            self.catch_up().await;
        }
    }

    /// Delivers everything the store has after the mirror's version.
    async fn catch_up(&mut self) {
        let Some(version) = self.mirror.as_ref().map(|m| m.version) else {
            return;
        };
        match self.hub.inner.store.events_since(&self.key, version).await {
            Ok(Some(events)) => {
                for event in events {
                    let current = self.mirror.as_ref().map(|m| (m.version, m.epoch.clone()));
                    match current {
                        Some((_, Some(epoch))) if epoch != event.epoch => {
                            self.resync_all().await;
                            return;
                        }
                        Some((v, _)) if event.version == v.next() => self.apply_and_deliver(event),
                        _ => {}
                    }
                }
                self.drain_pending();
            }
            Ok(None) => self.resync_all().await,
            Err(err) => {
                tracing::warn!(room = %self.key, error = %err, "cannot fill event gap; closing members so they resume");
                self.drop_all_members();
            }
        }
    }

    fn drain_pending(&mut self) {
        while let Some(mirror) = &self.mirror {
            let next = mirror.version.next();
            self.pending.retain(|v, _| *v >= next);
            match self.pending.remove(&next) {
                Some(event) => self.apply_and_deliver(event),
                None => break,
            }
        }
    }

    /// Reloads the room from the store itself (something did not add up: the
    /// cache may be as wrong as the mirror) and sends every member its full
    /// state.
    async fn resync_all(&mut self) {
        if let Err(err) = self.load_from(true).await {
            tracing::warn!(room = %self.key, error = %err, "cannot reload room; closing members so they resume");
            self.drop_all_members();
            return;
        }
        let Some(mirror) = &self.mirror else { return };
        metrics::counter!("croupier_ws_resyncs_total").increment(self.members.len() as u64);
        let key = &self.key;
        write_to_members(
            &mut self.members,
            |dialect| {
                frames::full_state(
                    dialect,
                    key,
                    &mirror.history,
                    mirror.version,
                    mirror.epoch.as_deref(),
                )
            },
            frames::full_state_type,
        );
    }

    /// The room was created with a password while members could join it
    /// openly: every member without a valid token is removed, told so in its
    /// dialect, and gets nothing further from the room. Protection never goes
    /// away again, so the message needs no check; the mirror is reloaded to
    /// learn the new room's epoch and protection.
    async fn on_protected(&mut self) {
        let key = &self.key;
        self.members.retain(|member| {
            if member.authorized {
                return true;
            }
            let message = "this room is now protected; a token is required";
            let (frame, kind) = match member.dialect {
                Dialect::V2 => (frames::auth_required(key, message), "authRequired"),
                Dialect::V1 | Dialect::Seed => (frames::error("auth_required", message), "error"),
            };
            metrics::counter!("croupier_ws_messages_sent_total", "type" => kind).increment(1);
            member.outbox.push(&frame);
            member.outbox.removed(key.clone());
            false
        });
        if self.mirror.is_some()
            && let Err(err) = self.load().await
        {
            tracing::warn!(room = %self.key, error = %err, "cannot reload a protected room; closing members so they rejoin");
            self.drop_all_members();
        }
    }

    fn drop_all_members(&mut self) {
        for member in self.members.drain(..) {
            member.outbox.overflow();
        }
        self.mirror = None;
        self.pending.clear();
        self.recent.clear();
        self.view.clear();
    }

    fn apply_and_deliver(&mut self, event: RoomEvent) {
        self.deliver(event);
        self.publish_view();
    }

    /// Applies the next event to the mirror and queues it to every member,
    /// without publishing the read snapshot (the caller does, once).
    fn deliver(&mut self, event: RoomEvent) {
        let Some(mirror) = &mut self.mirror else {
            return;
        };
        mirror.history.apply(&event.change);
        mirror.version = event.version;
        if mirror.epoch.is_none() {
            mirror.epoch = Some(event.epoch.clone());
        }
        let history = &mirror.history;
        write_to_members(
            &mut self.members,
            |dialect| frames::event(dialect, &event, history),
            |dialect| frames::frame_type(dialect, &event.change),
        );
        let latency = (Utc::now() - event.committed_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("croupier_fanout_latency_seconds").record(latency.as_secs_f64());

        self.recent.push_back(event);
        while self.recent.len() > self.hub.inner.config.recent_events {
            self.recent.pop_front();
        }
    }
}

/// Rooms with at least this many members per core are written by as many
/// threads as the machine has cores (one of them the room task's own).
const MEMBERS_PER_WRITER: usize = 1024;

/// Writes one frame to every member (`render`'s for its dialect, each
/// rendered once), drops the members whose connection is gone or overflowed,
/// and counts the frames sent by type (`kind` of the dialect).
///
/// Each write is one non-blocking system call whose cost is nearly all the
/// kernel's TCP path, so a large room is split between threads: the room task
/// writes the first share itself, on its worker, while scoped threads write
/// the others, and it returns once all are written. On loopback a send also
/// runs the receiver's side of TCP, so one thread alone takes N times that
/// path before the last member has the event.
fn write_to_members(
    members: &mut Vec<Member>,
    render: impl Fn(Dialect) -> Frame,
    kind: impl Fn(Dialect) -> &'static str,
) {
    let writers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(members.len() / MEMBERS_PER_WRITER)
        .max(1);
    write_shared(members, writers, render, kind);
}

/// [`write_to_members`] with `writers` threads.
fn write_shared(
    members: &mut Vec<Member>,
    writers: usize,
    render: impl Fn(Dialect) -> Frame,
    kind: impl Fn(Dialect) -> &'static str,
) {
    let mut frames: [Option<Frame>; 3] = Default::default();
    for member in members.iter() {
        let slot = dialect_slot(member.dialect);
        if frames[slot].is_none() {
            frames[slot] = Some(render(member.dialect));
        }
    }
    let keep: Vec<AtomicBool> = members.iter().map(|_| AtomicBool::new(true)).collect();
    let all: &[Member] = members;
    let write = |share: Range<usize>| {
        for i in share {
            if let Some(frame) = &frames[dialect_slot(all[i].dialect)] {
                keep[i].store(all[i].outbox.push(frame), Ordering::Relaxed);
            }
        }
    };
    let size = all.len().div_ceil(writers.max(1)).max(1);
    let mut shares = (0..all.len())
        .step_by(size)
        .map(|start| start..(start + size).min(all.len()));
    std::thread::scope(|scope| {
        let mut own: Vec<Range<usize>> = shares.next().into_iter().collect();
        for share in shares {
            let write = &write;
            let spawned = std::thread::Builder::new()
                .name("croupier-fanout".into())
                .spawn_scoped(scope, {
                    let share = share.clone();
                    move || write(share)
                });
            // Without a thread (the system refused one), the room task
            // writes that share too.
            if spawned.is_err() {
                own.push(share);
            }
        }
        for share in own {
            write(share);
        }
    });
    let mut sent = [0u64; 3];
    for member in members.iter() {
        sent[dialect_slot(member.dialect)] += 1;
    }
    for dialect in [Dialect::V2, Dialect::V1, Dialect::Seed] {
        let count = sent[dialect_slot(dialect)];
        if count > 0 {
            metrics::counter!("croupier_ws_messages_sent_total", "type" => kind(dialect))
                .increment(count);
        }
    }
    let mut flags = keep.into_iter();
    members.retain(|_| flags.next().is_some_and(AtomicBool::into_inner));
}

/// Answers each writer of a batch.
fn answer(replies: Vec<WriteReply>, answers: Vec<Result<Written, StoreError>>) {
    for (reply, answer) in replies.into_iter().zip(answers) {
        // A writer that went away meanwhile needs no answer.
        let _ = reply.send(answer);
    }
}

fn dialect_slot(dialect: Dialect) -> usize {
    match dialect {
        Dialect::V2 => 0,
        Dialect::V1 => 1,
        Dialect::Seed => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::outbox::{self, Socket};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Every member gets its dialect's frame once, whichever thread wrote it,
    /// and exactly the members whose connection is gone are dropped, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_shared_between_threads_each_get_their_frame_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let dialects = [Dialect::V2, Dialect::V1, Dialect::Seed];
        let mut members = Vec::new();
        let mut peers = Vec::new();
        let mut inboxes = Vec::new();
        for i in 0..301u64 {
            let (accepted, peer) = tokio::join!(listener.accept(), TcpStream::connect(address));
            let (_read, write) = accepted.unwrap().0.into_split();
            let (outbox, inbox) = outbox::channel(Arc::new(Socket::new(write)), 8, 1 << 16);
            members.push(Member {
                conn_id: i,
                dialect: dialects[i as usize % 3],
                authorized: true,
                outbox,
            });
            // Every seventh connection's task is gone.
            if i % 7 == 3 {
                drop(inbox);
            } else {
                inboxes.push(inbox);
                peers.push((i, peer.unwrap()));
            }
        }
        let frame = |dialect: Dialect| Frame::from(format!("{dialect:?}"));
        write_shared(&mut members, 3, frame, |_| "test");
        let kept: Vec<u64> = members.iter().map(|m| m.conn_id).collect();
        let expected: Vec<u64> = peers.iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, expected);
        for (i, peer) in &mut peers {
            let want = format!("{:?}", dialects[*i as usize % 3]);
            let mut got = vec![0u8; 2 + want.len()];
            let read = tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got));
            read.await.expect("the frame arrives").unwrap();
            assert_eq!(&got[..2], &[0x81, want.len() as u8], "member {i}");
            assert_eq!(&got[2..], want.as_bytes(), "member {i}");
        }
        // Nothing more was written to anyone.
        write_shared(&mut members, 1, |_| Frame::from("end"), |_| "test");
        for (i, peer) in &mut peers {
            let mut got = [0u8; 5];
            let read = tokio::time::timeout(Duration::from_secs(5), peer.read_exact(&mut got));
            read.await.expect("the frame arrives").unwrap();
            assert_eq!(&got, b"\x81\x03end", "member {i}");
        }
    }
}
