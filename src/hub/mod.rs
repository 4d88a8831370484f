//! The hub: this instance's rooms that have local members, local writers or
//! recent reads, and the one task per room that is the room's only writer on
//! this instance, delivers its events to those members in version order and
//! keeps a snapshot of the room for reads.
//!
//! Writes made on this instance are sent to the room's task ([`Hub::mutate`]),
//! which commits whatever is queued with one store call, applies the committed
//! events to its mirror, delivers them, publishes them to the other instances
//! and answers each writer. Events committed elsewhere arrive through the bus,
//! possibly twice and out of order; the task drops what it has already
//! delivered and fills any gap from the store's event log before delivering
//! anything later (architecture invariant 3). When another instance wrote the
//! room between two of this task's batches, the store's answer to the next
//! batch carries what was missed, in order.

mod outbox;
pub mod registry;
mod room;
mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use crate::bus::DynBroker;
use crate::domain::{Number, RoomEvent, RoomKey, Version};
use crate::protocol::frames::Dialect;
use crate::store::cached::RoomCache;
use crate::store::{DynStore, Mutation, Position, StoreError};
pub use outbox::{Inbox, Outbound, Outbox, Socket, channel as outbox};
use view::View;
pub use view::{RoomBody, Snapshot};

/// Most rooms whose heads one repair query reads.
const VERIFY_BATCH: usize = 1000;

/// Tunables for room tasks.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// How long a room task lingers (still subscribed) after its last member left.
    pub linger: Duration,
    /// How many recent events each room keeps in memory for fast resumes.
    pub recent_events: usize,
    /// Per-connection outbound queue capacity; a resume that would not fit is
    /// answered with a full `sync` instead.
    pub queue_capacity: usize,
    /// How long a room without local members stays followed (subscribed, its
    /// snapshot current) after its last read.
    pub read_linger: Duration,
    /// Reads start following a room only while the hub runs fewer room tasks
    /// than this: reads of ever more rooms must not grow the instance without
    /// bound (beyond it, they are answered from the store and its cache).
    pub max_read_rooms: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            linger: Duration::from_secs(5),
            recent_events: 1000,
            queue_capacity: 1024,
            read_linger: Duration::from_secs(30),
            max_read_rooms: 1000,
        }
    }
}

/// One connection's membership in one room.
#[derive(Debug, Clone)]
pub struct Member {
    pub conn_id: u64,
    pub dialect: Dialect,
    /// Whether the member joined with a valid token for the room. A member
    /// without one is removed if the room becomes protected.
    pub authorized: bool,
    /// The connection's bounded outbound queue. When it overflows the
    /// connection closes with 1013 so the client reconnects and resumes,
    /// instead of silently missing events.
    pub outbox: Outbox,
}

/// What a new member is sent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Greeting {
    /// `join` without a version: a full `sync` in the member's dialect.
    Sync,
    /// `join` with `version: V` (V > 0): the missed events then `recovered`, or a
    /// full `sync` when they cannot all be replayed.
    Resume {
        version: Version,
        epoch: Option<String>,
    },
    /// `getHistory`: a `historyUpdate` reply.
    HistoryUpdate,
    /// `saveNumber` / `updateHistory` from a non-member: nothing; the event follows.
    Nothing,
}

/// What a writer is told once its mutation is committed.
#[derive(Debug, Clone)]
pub struct Written {
    /// The committed event; for a duplicate, the event the first attempt produced.
    pub event: RoomEvent,
    /// The mutation id had been applied before; nothing changed.
    pub duplicate: bool,
    /// The room as the writer's reply shows it.
    pub room: Saved,
}

/// The room right after a writer's own event (for a duplicate, or when this
/// instance had to reload the room meanwhile: the room after the writer's
/// batch). Shares its history with the read snapshot when it can.
#[derive(Debug, Clone)]
pub struct Saved {
    pub id: i64,
    pub version: Version,
    pub epoch: Arc<str>,
    pub protected: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Holds the history; the room's is its first `len` numbers.
    snapshot: Arc<Snapshot>,
    len: usize,
}

impl Saved {
    /// The room `snapshot` shows, cut to its first `len` numbers and named
    /// `version` (the room right after an earlier event of the same batch).
    pub fn from_snapshot(
        id: i64,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
        snapshot: Arc<Snapshot>,
        len: usize,
        version: Version,
    ) -> Self {
        Saved {
            id,
            version,
            epoch: snapshot.epoch.clone(),
            protected: snapshot.protected,
            created_at,
            updated_at,
            snapshot,
            len,
        }
    }

    /// The room's numbers, oldest first.
    pub fn history(&self) -> &[Number] {
        let numbers = self.snapshot.history.numbers();
        &numbers[..self.len.min(numbers.len())]
    }

    /// Appends [`Saved::history`] as a JSON array, copied from a rendering
    /// that the writers of one batch share.
    pub fn write_history_json(&self, out: &mut Vec<u8>) {
        self.snapshot.history_json().write_prefix(self.len, out);
    }
}

/// The answer to one [`Command::Mutate`].
type WriteReply = oneshot::Sender<Result<Written, StoreError>>;

enum Command {
    Join {
        member: Member,
        greeting: Greeting,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Leave {
        conn_id: u64,
    },
    /// A write made on this instance: committed with whatever else is queued.
    Mutate {
        mutation: Mutation,
        reply: WriteReply,
    },
    Event(RoomEvent),
    CatchUp,
    /// The periodic repair read the room's head from the store (`None`: the
    /// store has no such room): compare it with the mirror.
    Verify(Option<Position>),
    /// Someone reads the room: load the mirror so reads can use its snapshot.
    Watch,
    /// The room was created with a password: remove members without a token.
    Protected,
}

struct RoomEntry {
    tx: mpsc::UnboundedSender<Command>,
    generation: u64,
    view: Arc<View>,
}

struct HubInner {
    rooms: Mutex<HashMap<RoomKey, RoomEntry>>,
    store: DynStore,
    bus: DynBroker,
    /// Where room tasks write the state after each batch (cluster mode).
    cache: Option<RoomCache>,
    config: HubConfig,
    generations: AtomicU64,
}

/// Cheap to clone; all clones share the same rooms.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl Hub {
    /// A hub whose room tasks commit through `store`, talk to other instances
    /// through `bus`, and write each committed batch's room into `cache`.
    pub fn new(
        store: DynStore,
        bus: DynBroker,
        cache: Option<RoomCache>,
        config: HubConfig,
    ) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                rooms: Mutex::new(HashMap::new()),
                store,
                bus,
                cache,
                config,
                generations: AtomicU64::new(0),
            }),
        }
    }

    /// Adds a member to a room and sends its greeting. Returns once the member is
    /// registered, so an event committed after this returns is delivered to it.
    pub async fn join(
        &self,
        key: &RoomKey,
        member: Member,
        greeting: Greeting,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send_starting(
            key,
            Command::Join {
                member,
                greeting,
                reply,
            },
        );
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("room task stopped".into())))
    }

    /// Commits a mutation through the room's task, the only writer of the room
    /// on this instance. Returns once the store committed it (invariant 1) and
    /// the event reached the local members, the read snapshot and, usually, the
    /// other instances. A task that stops before answering (a bug) leaves the
    /// writer with `Unavailable`; a retry with the same mutation id is safe.
    pub async fn mutate(&self, mutation: Mutation) -> Result<Written, StoreError> {
        let (reply, answer) = oneshot::channel();
        let key = mutation.key.clone();
        self.send_starting(&key, Command::Mutate { mutation, reply });
        answer
            .await
            .unwrap_or_else(|_| Err(StoreError::Unavailable("room task stopped".into())))
    }

    /// Removes a member from a room (no-op if the room has no task).
    pub fn leave(&self, key: &RoomKey, conn_id: u64) {
        self.send_existing(key, Command::Leave { conn_id });
    }

    /// Hands a committed event to the room's task, if this instance has members there.
    pub fn deliver(&self, event: RoomEvent) {
        let key = event.key.clone();
        self.send_existing(&key, Command::Event(event));
    }

    /// The current snapshot of a room this instance follows, if it has one and
    /// the bus is delivering (without the bus the snapshot could fall behind
    /// writes made elsewhere).
    pub fn snapshot(&self, key: &RoomKey) -> Option<Arc<Snapshot>> {
        if !self.inner.bus.delivering() {
            return None;
        }
        let view = self.lock().get(key).map(|entry| entry.view.clone())?;
        view.read()
    }

    /// Starts following a room that is being read, so that later reads are
    /// answered from its snapshot.
    pub fn watch(&self, key: &RoomKey) {
        if self.active_rooms() >= self.inner.config.max_read_rooms {
            return;
        }
        let (tx, _) = self.room_sender(key);
        let _ = tx.send(Command::Watch);
    }

    /// A room became protected (on any instance): its members that joined
    /// without a valid token are removed and told so.
    pub fn protected(&self, key: &RoomKey) {
        self.send_existing(key, Command::Protected);
    }

    /// Compares every room this instance runs a task for with the store, in
    /// batched queries of the rooms' heads, and hands each task what the
    /// store holds. A change whose publish never arrived is then read from the
    /// event log, and a store that went back in time moves the room to a new
    /// epoch (invariant 7). Returns how many rooms were checked.
    pub async fn verify_all(&self) -> Result<usize, StoreError> {
        let keys: Vec<RoomKey> = self.lock().keys().cloned().collect();
        for chunk in keys.chunks(VERIFY_BATCH) {
            let heads: HashMap<RoomKey, Position> =
                self.inner.store.heads(chunk).await?.into_iter().collect();
            for key in chunk {
                self.send_existing(key, Command::Verify(heads.get(key).cloned()));
            }
        }
        Ok(keys.len())
    }

    /// Makes every room catch up from the store (after a bus interruption).
    pub fn catch_up_all(&self) {
        for entry in self.lock().values() {
            let _ = entry.tx.send(Command::CatchUp);
        }
    }

    /// Number of rooms with a running task.
    pub fn active_rooms(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<RoomKey, RoomEntry>> {
        // Never held across an await; poisoning would only follow a panic while
        // inserting or removing an entry, which leaves the map consistent.
        self.inner.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a command to the room's task, starting one if needed.
    fn send_starting(&self, key: &RoomKey, mut command: Command) {
        loop {
            let (tx, generation) = self.room_sender(key);
            match tx.send(command) {
                Ok(()) => return,
                // The room task retired between lookup and send; start a new one.
                Err(mpsc::error::SendError(returned)) => {
                    self.forget(key, generation);
                    command = returned;
                }
            }
        }
    }

    fn send_existing(&self, key: &RoomKey, command: Command) {
        if let Some(entry) = self.lock().get(key) {
            let _ = entry.tx.send(command);
        }
    }

    fn room_sender(&self, key: &RoomKey) -> (mpsc::UnboundedSender<Command>, u64) {
        let mut rooms = self.lock();
        if let Some(entry) = rooms.get(key) {
            return (entry.tx.clone(), entry.generation);
        }
        let generation = self.inner.generations.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let view = Arc::new(View::new());
        rooms.insert(
            key.clone(),
            RoomEntry {
                tx: tx.clone(),
                generation,
                view: view.clone(),
            },
        );
        room::spawn(self.clone(), key.clone(), generation, view, rx);
        (tx, generation)
    }

    fn forget(&self, key: &RoomKey, generation: u64) {
        let mut rooms = self.lock();
        if rooms.get(key).is_some_and(|e| e.generation == generation) {
            rooms.remove(key);
        }
    }

    /// Called by a room task with no members: retires it unless a command is
    /// already waiting. Checked under the map lock so no sender can slip in.
    fn try_retire(
        &self,
        key: &RoomKey,
        generation: u64,
        rx: &mpsc::UnboundedReceiver<Command>,
    ) -> bool {
        let mut rooms = self.lock();
        if !rx.is_empty() {
            return false;
        }
        if rooms.get(key).is_some_and(|e| e.generation == generation) {
            rooms.remove(key);
        }
        true
    }
}
