//! The store seam: rooms, their histories and versions, the event log used for
//! resume and gap filling, and room password hashes.
//!
//! Two backends implement [`Store`]: SQLite (embedded default) and PostgreSQL
//! (cluster mode). Each owns its migrations under `migrations/<backend>/`.
//! Both assign a room's next version inside the same transaction that applies
//! the mutation, so concurrent writers — on any instance — can never produce a
//! duplicate or missing version (architecture invariant 2).

pub mod cached;
pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::rules::{Decision, Proposal, Refusal, RoomHead, Stamp, decide};
use crate::domain::{Change, History, MutationId, Number, Room, RoomEvent, RoomKey, Version};

/// How long a mutation id is remembered for de-duplicating retries.
pub const MUTATION_ID_WINDOW: Duration = Duration::from_secs(600);

/// What the event log keeps per room at least: the last N events...
pub const EVENT_RETENTION_COUNT: i64 = 1000;
/// ...and every event younger than this.
pub const EVENT_RETENTION_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or timed out; nothing was committed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("index {index} is out of range for a history of {len} numbers")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("history may hold at most {max} numbers")]
    HistoryTooLong { max: usize },
    /// The room is protected and the mutation carries no valid token for it.
    /// Checked where the change is applied (under the room's lock), so a room
    /// protected a moment earlier can never take an unauthorized write.
    #[error("this room is protected; a token is required")]
    AuthRequired,
    /// Anything else: a bug or corrupted data. Logged, never shown to clients.
    #[error("store error: {0}")]
    Internal(String),
}

impl StoreError {
    /// Sorts a driver error into "the database is unreachable" (503) or internal.
    pub fn from_sqlx(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err.to_string()),
            sqlx::Error::Database(db) => {
                // SQLite busy/locked; PostgreSQL read-only transaction (the node
                // became a standby in a failover), admin shutdown, cannot connect,
                // lock or statement timeout: the request may be retried later, so
                // report 503.
                let transient = matches!(
                    db.code().as_deref(),
                    Some(
                        "5" | "6"
                            | "25006"
                            | "57P01"
                            | "57P02"
                            | "57P03"
                            | "57014"
                            | "55P03"
                            | "40001"
                            | "40P01"
                    )
                );
                if transient {
                    StoreError::Unavailable(err.to_string())
                } else {
                    StoreError::Internal(err.to_string())
                }
            }
            _ => StoreError::Internal(err.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(e) => StoreError::from_sqlx(e),
            other => StoreError::Internal(other.to_string()),
        }
    }
}

impl From<Refusal> for StoreError {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::AuthRequired => StoreError::AuthRequired,
            Refusal::IndexOutOfRange { index, len } => StoreError::IndexOutOfRange { index, len },
            Refusal::HistoryTooLong { max } => StoreError::HistoryTooLong { max },
        }
    }
}

impl From<Decision> for Outcome {
    fn from(decision: Decision) -> Self {
        match decision {
            Decision::Applied(event) => Outcome::Applied(event),
            Decision::Duplicate(event) => Outcome::Duplicate(event),
            Decision::Refused(refusal) => Outcome::Refused(refusal.into()),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        StoreError::from_sqlx(err)
    }
}

/// A validated mutation on its way to the store.
#[derive(Debug, Clone)]
pub struct Mutation {
    pub key: RoomKey,
    pub change: Change,
    pub mutation_id: Option<MutationId>,
    /// Configured `MAX_HISTORY`; the store refuses to grow a history past it.
    pub max_history: usize,
    /// The writer holds a valid token for this room. Without one, the store
    /// applies the change only if the room is not protected.
    pub authorized: bool,
}

impl Mutation {
    /// The mutation as the decision function sees it.
    pub(crate) fn proposal(&self) -> Proposal<'_> {
        Proposal {
            change: &self.change,
            mutation_id: self.mutation_id.as_ref(),
            max_history: self.max_history,
            authorized: self.authorized,
        }
    }
}

/// What the store did with a mutation.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The committed event (for a duplicate: the event the first attempt produced).
    pub event: RoomEvent,
    /// The room after the mutation.
    pub room: Room,
    /// True when the mutation id had already been applied; nothing changed.
    pub duplicate: bool,
}

/// Where a caller's copy of a room stands, so the store can tell it what
/// other writers committed since.
///
/// Two positions are equal when they name the same place, the same epoch and
/// version; the shape is only a hint and takes no part.
#[derive(Debug, Clone, Default)]
pub struct Position {
    /// `None`: as far as the caller knows, the room does not exist yet.
    pub epoch: Option<Arc<str>>,
    pub version: Version,
    /// The rest of the room's head at that position, when the caller has it.
    /// A backend may then decide a batch without reading the room first, and
    /// commit it only if the room still stands exactly there; it never trusts
    /// the shape otherwise.
    pub shape: Option<Shape>,
}

impl PartialEq for Position {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch && self.version == other.version
    }
}

impl Eq for Position {}

/// A batch of appends decided on the head a caller reports, before the store
/// read the room: what a backend may commit if the room still stands there.
#[derive(Debug, Clone)]
pub struct Appends {
    pub events: Vec<RoomEvent>,
    /// Where the room stands after them.
    pub head: Position,
}

impl Appends {
    /// Decides `mutations` on `known` with [`decide`]; `None` unless the head
    /// is known whole and every mutation is an append that applies (anything
    /// else is decided on the locked room).
    pub fn on(
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
        committed_at: DateTime<Utc>,
    ) -> Option<Appends> {
        let (Some(epoch), Some(shape)) = (&known.epoch, known.shape) else {
            return None;
        };
        let stamp = Stamp {
            key: key.clone(),
            epoch: epoch.clone(),
            committed_at,
        };
        let mut head = RoomHead {
            version: known.version,
            length: shape.history_length,
            protected: shape.protected,
        };
        let mut earlier: HashMap<MutationId, RoomEvent> = HashMap::new();
        let mut events = Vec::with_capacity(mutations.len());
        for mutation in mutations {
            if !matches!(mutation.change, Change::Added(_)) {
                return None;
            }
            let proposal = mutation.proposal();
            let found = mutation.mutation_id.as_ref().and_then(|id| earlier.get(id));
            let Decision::Applied(event) = decide(&head, &proposal, found, &stamp) else {
                return None;
            };
            if let Some(id) = &event.mutation_id {
                earlier.insert(id.clone(), event.clone());
            }
            head = head.after(&event.change);
            events.push(event);
        }
        Some(Appends {
            events,
            head: Position {
                epoch: Some(epoch.clone()),
                version: head.version,
                shape: Some(Shape {
                    history_length: head.length,
                    ..shape
                }),
            },
        })
    }
}

/// What a caller last saw of a room's head besides its epoch and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub id: i64,
    pub history_length: usize,
    pub protected: bool,
}

/// A room's identity and head, without its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub id: i64,
    pub epoch: Arc<str>,
    pub version: Version,
    pub history_length: usize,
    pub protected: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Head {
    /// The head as a caller's position, shape included.
    pub fn position(&self) -> Position {
        Position {
            epoch: Some(self.epoch.clone()),
            version: self.version,
            shape: Some(Shape {
                id: self.id,
                history_length: self.history_length,
                protected: self.protected,
            }),
        }
    }
}

/// What one mutation of a batch came to.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Committed as this event.
    Applied(RoomEvent),
    /// Its mutation id was applied before, within [`MUTATION_ID_WINDOW`]: the
    /// event that first attempt produced. Nothing changed.
    Duplicate(RoomEvent),
    /// Refused by the room's rules (index, length, protection); nothing changed.
    Refused(StoreError),
}

/// What the store did with one batch of mutations to one room.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Events other writers committed after the caller's `known` position and
    /// before this batch, oldest first. `None` when they cannot all be given
    /// (another epoch, or the log no longer holds them): the caller reloads
    /// the room with [`Store::room`].
    pub missed: Option<Vec<RoomEvent>>,
    /// One per mutation, in the order given.
    pub outcomes: Vec<Outcome>,
    /// The room after the batch; `None` if it still does not exist.
    pub head: Option<Head>,
}

/// Which events after `known` a batch must report as missed, given the room's
/// epoch and version before the batch (`None`: the room does not exist).
/// Shared by both backends so they answer alike.
pub(crate) enum MissedPlan {
    /// The reply is this (nothing missed, or the caller cannot be caught up).
    Answer(Option<Vec<RoomEvent>>),
    /// Read the log for versions `after + 1 ..= upto`; complete or `None`.
    Read { after: Version, upto: Version },
}

/// Decides from the heads alone whether the caller is caught up, cannot be
/// caught up (another epoch, or ahead of the room), or needs the log read.
pub(crate) fn plan_missed(known: &Position, room: Option<(&str, Version)>) -> MissedPlan {
    match room {
        None if known.epoch.is_none() && known.version == Version::ZERO => {
            MissedPlan::Answer(Some(Vec::new()))
        }
        Some((epoch, version)) if known.epoch.as_deref() == Some(epoch) => {
            if known.version == version {
                MissedPlan::Answer(Some(Vec::new()))
            } else if known.version > version {
                MissedPlan::Answer(None)
            } else {
                MissedPlan::Read {
                    after: known.version,
                    upto: version,
                }
            }
        }
        _ => MissedPlan::Answer(None),
    }
}

/// Whether the store went back in time behind a caller: the same epoch, but
/// the caller saw a version the store no longer has (an asynchronous failover
/// or a restore lost the newest commits). The room must then move to a new
/// epoch before anything is committed, so that no version is ever given two
/// different meanings for clients that saw the lost one.
pub(crate) fn went_back(known: &Position, epoch: &str, version: Version) -> bool {
    known.epoch.as_deref() == Some(epoch) && known.version > version
}

/// The log's events after `after`, if they are exactly `after + 1 ..= upto`.
/// ([`plan_missed`] only asks for a read with `after < upto`.)
pub(crate) fn complete_log(
    events: Vec<RoomEvent>,
    after: Version,
    upto: Version,
) -> Option<Vec<RoomEvent>> {
    let mut expected = after;
    let complete = events.len() as u64 == upto.since(after)
        && events.iter().all(|event| {
            expected = expected.next();
            event.version == expected
        });
    complete.then_some(events)
}

/// The [`Applied`] of a batch of one mutation, given the room as it stood
/// after it.
pub(crate) fn applied_alone(batch: Batch, room: Option<Room>) -> Result<Applied, StoreError> {
    let (event, duplicate) = match batch.outcomes.into_iter().next() {
        Some(Outcome::Applied(event)) => (event, false),
        Some(Outcome::Duplicate(event)) => (event, true),
        Some(Outcome::Refused(err)) => return Err(err),
        None => return Err(StoreError::Internal("a batch of one had no outcome".into())),
    };
    let room = room.ok_or_else(|| StoreError::Internal("an applied room is missing".into()))?;
    Ok(Applied {
        event,
        room,
        duplicate,
    })
}

/// One row of `GET /api/roulette/sessions`.
#[derive(Debug, Clone)]
pub struct RoomSummary {
    pub id: i64,
    pub key: RoomKey,
    pub history_length: usize,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub protected: bool,
    pub history: Option<History>,
}

/// Pagination for room listings.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: u32,
    pub offset: u64,
    pub include_history: bool,
}

/// Totals for the admin stats endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub rooms: u64,
    pub average_history_length: f64,
}

/// One migration as the admin API and `migration-status` show it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
    pub applied: bool,
}

/// A room's password state, for `/api/rooms/auth` and token checks.
#[derive(Debug, Clone)]
pub struct RoomAuth {
    pub room: Room,
    /// The argon2id PHC string; `None` for an unprotected room.
    pub password_hash: Option<String>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs and health output.
    fn backend(&self) -> &'static str;

    /// The room, or `None` if it was never created.
    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError>;

    /// Applies one mutation: [`Store::apply_batch`] with that mutation alone,
    /// then the room as it is afterwards.
    ///
    /// Kept for callers that still want the whole room back. Both backends read
    /// the room inside the batch's transaction; this default (for wrappers)
    /// reads it after the commit, so under concurrent writers it may already
    /// include later changes. An error or a refusal changes nothing.
    async fn apply(&self, mutation: Mutation) -> Result<Applied, StoreError> {
        let key = mutation.key.clone();
        let batch = self
            .apply_batch(&key, &Position::default(), std::slice::from_ref(&mutation))
            .await?;
        let room = self.room(&key).await?;
        applied_alone(batch, room)
    }

    /// How many times the store moved to another primary since start. After
    /// an asynchronous failover the store may have lost commits that a cache
    /// in front of it still holds, so a cache stops trusting itself when this
    /// changes.
    fn failovers(&self) -> u64 {
        0
    }

    /// The room as the database holds it, past any cache in front of it: for
    /// when a cached copy may be wrong (a store that went back in time, a
    /// room in another epoch). A cache refreshes itself from the answer.
    async fn room_fresh(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        self.room(key).await
    }

    /// Applies mutations to one room, in order, in one transaction: the room's
    /// lock is taken and the commit flushed once for all of them. Each mutation
    /// gets the outcome it would have had alone (its own version and event, or
    /// its refusal), decided by [`crate::domain::rules::decide`]. A missing room
    /// is created by the first add or replace that applies. An error means
    /// nothing of the batch was committed.
    ///
    /// `known` is where the caller's copy of the room stands; the reply says
    /// what other writers committed after it (see [`Batch::missed`]).
    async fn apply_batch(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
    ) -> Result<Batch, StoreError>;

    /// The epoch and version of each of these rooms that exists, in one cheap
    /// query: the periodic repair compares them with what this instance holds.
    async fn heads(&self, keys: &[RoomKey]) -> Result<Vec<(RoomKey, Position)>, StoreError>;

    /// Moves the room to a new epoch if the store went back in time behind
    /// `seen` (see [`went_back`]); returns whether it did. Another writer may
    /// have done so first, or the room may have moved on meanwhile: then
    /// nothing changes and the caller simply reloads.
    async fn fork_epoch(&self, key: &RoomKey, seen: &Position) -> Result<bool, StoreError>;

    /// Events with versions after `after`, oldest first, if the log still holds
    /// every one of them; `None` when some were pruned (the caller sends a full sync).
    async fn events_since(
        &self,
        key: &RoomKey,
        after: Version,
    ) -> Result<Option<Vec<RoomEvent>>, StoreError>;

    /// Rooms by most recent activity, and the total count.
    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError>;

    /// The room and its password hash, if the room exists.
    async fn room_auth(&self, key: &RoomKey) -> Result<Option<RoomAuth>, StoreError>;

    /// Creates the room with this password hash unless it exists; returns the
    /// room as it now is (an existing room keeps its own password state).
    async fn create_room(
        &self,
        key: &RoomKey,
        password_hash: Option<String>,
    ) -> Result<RoomAuth, StoreError>;

    /// Deletes event-log entries that are both older than the retention age and
    /// beyond the retention count of their room. Returns how many were removed.
    async fn prune_events(&self) -> Result<u64, StoreError>;

    /// Room totals for the admin API.
    async fn stats(&self) -> Result<StoreStats, StoreError>;

    /// A round trip to the database, for health checks.
    async fn ping(&self) -> Result<Duration, StoreError>;

    /// Every known migration and whether it is applied.
    async fn migration_status(&self) -> Result<Vec<MigrationInfo>, StoreError>;

    /// Applies pending expand migrations: everything except the contract
    /// steps (see [`is_contract`]), so instances of the previous release keep
    /// working during a rolling upgrade.
    async fn migrate(&self) -> anyhow::Result<()>;

    /// Applies every pending migration, contract steps included. Only once no
    /// instance of the previous release runs any more (docs/operations.md).
    async fn migrate_contract(&self) -> anyhow::Result<()> {
        anyhow::bail!(
            "the {} store cannot apply contract migrations here",
            self.backend()
        )
    }

    /// Reverts the newest `steps` applied migrations.
    async fn rollback(&self, steps: usize) -> anyhow::Result<()>;
}

pub type DynStore = Arc<dyn Store>;

/// Encodes a change for the event log as (kind, JSON payload).
pub fn encode_change(change: &Change) -> (&'static str, String) {
    let payload = match change {
        Change::Added(n) => n.to_json().to_string(),
        Change::Removed(i) => i.to_string(),
        Change::Replaced(h) => h.to_json_string(),
    };
    (change.kind(), payload)
}

/// Decodes an event-log row written by [`encode_change`].
pub fn decode_change(kind: &str, payload: &str) -> Result<Change, StoreError> {
    let bad = || StoreError::Internal(format!("corrupt event log entry: {kind} {payload}"));
    let value: serde_json::Value = serde_json::from_str(payload).map_err(|_| bad())?;
    match kind {
        "add" => Number::from_json(&value)
            .map(Change::Added)
            .map_err(|_| bad()),
        "remove" => value
            .as_u64()
            .map(|i| Change::Removed(i as usize))
            .ok_or_else(bad),
        "replace" => History::from_json(&value, usize::MAX)
            .map(Change::Replaced)
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Parses a key read back from the database.
pub fn stored_key(raw: &str) -> Result<RoomKey, StoreError> {
    RoomKey::parse(raw).map_err(|_| StoreError::Internal(format!("invalid stored key {raw:?}")))
}

/// Parses a version read back from a BIGINT column (never negative).
pub fn stored_version(raw: i64) -> Result<Version, StoreError> {
    Version::from_stored(raw)
        .map_err(|_| StoreError::Internal(format!("invalid stored version {raw}")))
}

/// How `room_numbers` stores a number: `"0"`..`"36"` or `"00"`.
pub fn number_text(number: Number) -> String {
    match number {
        Number::Single(n) => n.to_string(),
        Number::DoubleZero => "00".to_owned(),
    }
}

/// Parses a history read back from `room_numbers` as one comma-separated
/// string, oldest first (`None`: no numbers).
pub fn stored_numbers(raw: Option<&str>) -> Result<History, StoreError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(History::default());
    };
    raw.split(',')
        .map(|item| match item {
            "00" => Ok(Number::DoubleZero),
            _ => item
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= 36)
                .map(Number::Single)
                .ok_or_else(|| StoreError::Internal(format!("corrupt stored number {item:?}"))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(History::from_numbers)
}

/// Whether a migration is a contract step: it removes what only the previous
/// release needs, so `croupier migrate` leaves it for `croupier migrate
/// --contract`. Contract migrations are named `<version>_contract_<what>`.
pub fn is_contract(description: &str) -> bool {
    description.starts_with("contract")
}

/// The expand part of `migrator`: every migration but the contract steps,
/// tolerating contract steps that are already applied.
pub fn expand_migrator(migrator: &sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    sqlx::migrate::Migrator {
        migrations: migrator
            .iter()
            .filter(|m| !is_contract(&m.description))
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ignore_missing: true,
        locking: migrator.locking,
        no_tx: migrator.no_tx,
    }
}

/// Lists a migrator's migrations with their applied state.
pub fn migration_report(
    migrator: &sqlx::migrate::Migrator,
    applied: &[sqlx::migrate::AppliedMigration],
) -> Vec<MigrationInfo> {
    migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| MigrationInfo {
            version: m.version,
            description: m.description.to_string(),
            applied: applied.iter().any(|a| a.version == m.version),
        })
        .collect()
}

/// The version to undo down to so that the newest `steps` applied migrations are reverted.
pub fn rollback_target(
    applied: &[sqlx::migrate::AppliedMigration],
    steps: usize,
) -> anyhow::Result<i64> {
    let mut versions: Vec<i64> = applied.iter().map(|a| a.version).collect();
    versions.sort_unstable();
    if steps == 0 || steps > versions.len() {
        anyhow::bail!(
            "cannot roll back {steps} migration(s): {} applied",
            versions.len()
        );
    }
    Ok(versions
        .len()
        .checked_sub(steps + 1)
        .map_or(0, |i| versions[i]))
}

/// Refuses to serve on a schema older than this binary expects (cluster mode:
/// migrations are applied by `croupier migrate` before instances roll).
pub async fn ensure_current_schema(store: &dyn Store) -> anyhow::Result<()> {
    let pending: Vec<_> = store
        .migration_status()
        .await
        .map_err(|e| anyhow::anyhow!("reading the schema version: {e}"))?
        .into_iter()
        // A pending contract step is normal while the previous release may
        // still run; this release works before and after it.
        .filter(|m| !m.applied && !is_contract(&m.description))
        .collect();
    if let Some(first) = pending.first() {
        anyhow::bail!(
            "database schema is out of date: {} migration(s) pending, first {} ({}); run `croupier migrate` first",
            pending.len(),
            first.version,
            first.description
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repair compares the heads it reads (no shape) with what a room
    /// task holds (with one): the same place must compare equal.
    #[test]
    fn positions_are_equal_by_epoch_and_version_alone() {
        let bare = Position {
            epoch: Some("e".into()),
            version: Version::new(3),
            shape: None,
        };
        let shaped = Position {
            shape: Some(Shape {
                id: 1,
                history_length: 3,
                protected: false,
            }),
            ..bare.clone()
        };
        assert_eq!(bare, shaped);
        assert_ne!(
            bare,
            Position {
                version: Version::new(4),
                ..shaped.clone()
            }
        );
        assert_ne!(
            bare,
            Position {
                epoch: Some("f".into()),
                ..shaped
            }
        );
    }
}
