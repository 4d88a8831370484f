//! PostgreSQL backend for cluster mode: every instance shares one database, so
//! everything that must be consistent across instances is decided by PostgreSQL.
//!
//! A batch of mutations to one room is one transaction: lock the room's row
//! (writers on other instances queue there), read what the caller missed from
//! the event log, look up the batch's mutation ids in one query, let the shared
//! rules ([`crate::domain::rules::decide`]) decide each mutation in order, then
//! write the batch's row changes, its events and the room's new head, and flush
//! the commit once (invariant 2). The decisions need only the room's head
//! (version, length, protection), never its history.
//!
//! A history is stored one row per number in `room_numbers`, so an append is
//! one inserted row whatever the history's length. While the schema is only
//! expanded (a rolling upgrade from the release that kept `rooms.history`), a
//! trigger keeps that column in step and appends cost O(history) in the
//! database; once the contract migration ran they cost O(1) (see the
//! migrations and docs/operations.md).
//!
//! There is no fallback: when the database cannot be reached every operation
//! fails with [`StoreError::Unavailable`], and the pool reconnects by itself once
//! the server is back.
//!
//! Connecting (options, start-up wait, migration connection) lives in
//! `connect`; this file holds the store and its [`Store`] implementation.

mod connect;
mod failover;

pub use connect::PgOptions;
pub use failover::HostList;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnection, PgPool, PgRow};

use super::{
    Appends, Applied, Batch, EVENT_RETENTION_AGE, EVENT_RETENTION_COUNT, Head, MUTATION_ID_WINDOW,
    MigrationInfo, MissedPlan, Mutation, Outcome, Page, Position, RoomAuth, RoomSummary, Store,
    StoreError, StoreStats, applied_alone, complete_log, decode_change, encode_change,
    expand_migrator, number_text, plan_missed, stored_key, stored_numbers, stored_version,
    went_back,
};
use crate::domain::rules::{Decision, RoomHead, Stamp, commit_time, decide};
use crate::domain::{Change, MutationId, Room, RoomEvent, RoomKey, Version, new_epoch};
use crate::telemetry::DbTimer;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// A room with its history, which is its `room_numbers` rows in `seq` order.
const ROOM_COLUMNS: &str = "r.id, r.key, r.version, r.epoch, r.created_at, r.updated_at, r.password_hash,
     (SELECT string_agg(n.number, ',' ORDER BY n.seq) FROM room_numbers n WHERE n.room_id = r.id) AS numbers";

/// A room without its history: what a batch needs.
const HEAD_COLUMNS: &str = "id, epoch, version, history_length::bigint AS history_length,
     password_hash IS NOT NULL AS protected, created_at, updated_at";

/// Most event-log rows one pruning statement deletes.
const PRUNE_SLICE: i64 = 10_000;

pub struct PostgresStore {
    pool: PgPool,
    /// The hosts of `DATABASE_URL` and which one is primary now.
    primary: Arc<failover::Primary>,
    /// Follows the primary when it moves; stopped with the store.
    _watcher: failover::AbortOnDrop,
}

impl PostgresStore {
    /// The underlying pool, for tests and tools that need raw SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn room_from_row(row: &PgRow) -> Result<(Room, Option<String>), StoreError> {
    let key: String = row.try_get("key")?;
    let numbers: Option<String> = row.try_get("numbers")?;
    let version = stored_version(row.try_get("version")?)?;
    let epoch: String = row.try_get("epoch")?;
    let password_hash: Option<String> = row.try_get("password_hash")?;
    let room = Room {
        id: row.try_get("id")?,
        key: stored_key(&key)?,
        history: stored_numbers(numbers.as_deref())?,
        version,
        epoch: epoch.into(),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        protected: password_hash.is_some(),
    };
    Ok((room, password_hash))
}

fn head_from_row(row: &PgRow) -> Result<Head, StoreError> {
    let version = stored_version(row.try_get("version")?)?;
    let length: i64 = row.try_get("history_length")?;
    let epoch: String = row.try_get("epoch")?;
    Ok(Head {
        id: row.try_get("id")?,
        epoch: epoch.into(),
        version,
        history_length: length as usize,
        protected: row.try_get("protected")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn event_from_row(key: &RoomKey, epoch: &str, row: &PgRow) -> Result<RoomEvent, StoreError> {
    let kind: String = row.try_get("kind")?;
    let payload: String = row.try_get("payload")?;
    let version = stored_version(row.try_get("version")?)?;
    let mutation_id: Option<String> = row.try_get("mutation_id")?;
    Ok(RoomEvent {
        key: key.clone(),
        epoch: epoch.into(),
        version,
        change: decode_change(&kind, &payload)?,
        mutation_id: mutation_id
            .map(MutationId::parse)
            .transpose()
            .map_err(|err| StoreError::Internal(format!("invalid stored mutation id: {err}")))?,
        committed_at: row.try_get("created_at")?,
    })
}

/// Locks the room's row, creating the room first when `create` and it is
/// missing. Returns its head and whether this transaction created it.
async fn lock_room(
    conn: &mut PgConnection,
    key: &RoomKey,
    create: bool,
    now: DateTime<Utc>,
) -> Result<Option<(Head, bool)>, StoreError> {
    let lock = format!("SELECT {HEAD_COLUMNS} FROM rooms WHERE key = $1 FOR UPDATE");
    if let Some(row) = sqlx::query(&lock)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(Some((head_from_row(&row)?, false)));
    }
    if !create {
        return Ok(None);
    }
    let insert = format!(
        "INSERT INTO rooms (key, epoch, created_at, updated_at) VALUES ($1, $2, $3, $3)
         ON CONFLICT (key) DO NOTHING RETURNING {HEAD_COLUMNS}"
    );
    if let Some(row) = sqlx::query(&insert)
        .bind(key.as_str())
        .bind(new_epoch())
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(Some((head_from_row(&row)?, true)));
    }
    // Another writer created it meanwhile; its insert has committed (ON
    // CONFLICT waited for it), so this statement's fresh snapshot sees the row.
    let row = sqlx::query(&lock)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::Internal("room vanished while being created".into()))?;
    Ok(Some((head_from_row(&row)?, false)))
}

/// A `heads` row: the room's key and where it stands.
fn position_from_row(row: &PgRow) -> Result<(RoomKey, Position), StoreError> {
    let key: String = row.try_get("key")?;
    let epoch: String = row.try_get("epoch")?;
    Ok((
        stored_key(&key)?,
        Position {
            epoch: Some(epoch.into()),
            version: stored_version(row.try_get("version")?)?,
            shape: None,
        },
    ))
}

/// Gives the room a new epoch (see [`went_back`]), in the caller's transaction.
async fn move_to_new_epoch(
    conn: &mut PgConnection,
    key: &RoomKey,
    id: i64,
) -> Result<Arc<str>, StoreError> {
    let epoch = new_epoch();
    sqlx::query("UPDATE rooms SET epoch = $1 WHERE id = $2")
        .bind(&epoch)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    tracing::warn!(room = %key, epoch = %epoch, "the store is behind what was delivered; the room moves to a new epoch");
    Ok(epoch.into())
}

/// The room's logged events with versions in `after + 1 ..= upto`, oldest first.
async fn read_events(
    conn: &mut PgConnection,
    key: &RoomKey,
    room: &Head,
    after: Version,
    upto: Version,
) -> Result<Vec<RoomEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT version, kind, payload::text AS payload, mutation_id, created_at FROM room_events
         WHERE room_id = $1 AND version > $2 AND version <= $3 ORDER BY version",
    )
    .bind(room.id)
    .bind(after.to_stored())
    .bind(upto.to_stored())
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| event_from_row(key, &room.epoch, row))
        .collect()
}

/// The first event each of `ids` produced in this room after `since`, in one
/// query. Runs after the row lock was granted, so it sees every event
/// committed before.
async fn find_mutations(
    conn: &mut PgConnection,
    key: &RoomKey,
    room: &Head,
    ids: Vec<&str>,
    since: DateTime<Utc>,
) -> Result<HashMap<MutationId, RoomEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (mutation_id) version, kind, payload::text AS payload, mutation_id, created_at
         FROM room_events
         WHERE room_id = $1 AND mutation_id = ANY($2) AND created_at > $3
         ORDER BY mutation_id, version",
    )
    .bind(room.id)
    .bind(ids)
    .bind(since)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| {
            let event = event_from_row(key, &room.epoch, row)?;
            let id = event
                .mutation_id
                .clone()
                .ok_or_else(|| StoreError::Internal("event without its mutation id".into()))?;
            Ok((id, event))
        })
        .collect()
}

/// Writes the row changes of a batch's applied events, in order: consecutive
/// adds as one insert, a removal as one delete at its offset, a replacement as
/// a delete of every row followed by the new rows. Only the events from the
/// last replacement on matter for the rows. `applied` pairs each event with
/// the history's length before it.
async fn write_numbers(
    conn: &mut PgConnection,
    room_id: i64,
    applied: &[(RoomEvent, usize)],
) -> Result<(), StoreError> {
    let start = applied
        .iter()
        .rposition(|(e, _)| matches!(e.change, Change::Replaced(_)))
        .unwrap_or(0);
    let mut adds: Vec<String> = Vec::new();
    for (event, length) in &applied[start..] {
        match &event.change {
            Change::Added(number) => adds.push(number_text(*number)),
            Change::Removed(index) => {
                append_numbers(conn, room_id, &mut adds).await?;
                // Counted from the nearer end: removing one of the latest
                // numbers (the usual correction) skips few rows.
                let (order, offset) = if *index < length / 2 {
                    ("ASC", *index)
                } else {
                    ("DESC", length.saturating_sub(index + 1))
                };
                let sql = format!(
                    "DELETE FROM room_numbers WHERE room_id = $1 AND seq =
                       (SELECT seq FROM room_numbers WHERE room_id = $1
                        ORDER BY seq {order} LIMIT 1 OFFSET $2)"
                );
                sqlx::query(&sql)
                    .bind(room_id)
                    .bind(offset as i64)
                    .execute(&mut *conn)
                    .await?;
            }
            Change::Replaced(history) => {
                sqlx::query("DELETE FROM room_numbers WHERE room_id = $1")
                    .bind(room_id)
                    .execute(&mut *conn)
                    .await?;
                adds = history.numbers().iter().map(|n| number_text(*n)).collect();
            }
        }
    }
    append_numbers(conn, room_id, &mut adds).await
}

/// Appends `numbers` after the room's last row (one index lookup for the
/// last `seq`, then one row each), and empties `numbers`.
async fn append_numbers(
    conn: &mut PgConnection,
    room_id: i64,
    numbers: &mut Vec<String>,
) -> Result<(), StoreError> {
    if numbers.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO room_numbers (room_id, seq, number)
         SELECT $1, last.seq + u.o, u.n
           FROM (SELECT COALESCE(max(seq), 0) AS seq FROM room_numbers WHERE room_id = $1) last,
                unnest($2::text[]) WITH ORDINALITY AS u(n, o)",
    )
    .bind(room_id)
    .bind(std::mem::take(numbers))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The room with its history, read on `conn` (inside a batch's transaction).
async fn read_room(conn: &mut PgConnection, key: &RoomKey) -> Result<Option<Room>, StoreError> {
    let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = $1");
    let row = sqlx::query(&sql)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| room_from_row(&r).map(|(room, _)| room))
        .transpose()
}

/// PostgreSQL's error code for a call of a function that does not exist.
const UNDEFINED_FUNCTION: &str = "42883";

/// A batch's rows for `room_events`, one array per column.
struct LogRows {
    versions: Vec<i64>,
    kinds: Vec<&'static str>,
    payloads: Vec<String>,
    ids: Vec<Option<String>>,
}

impl LogRows {
    fn of<'a>(events: impl ExactSizeIterator<Item = &'a RoomEvent>) -> LogRows {
        let mut rows = LogRows {
            versions: Vec::with_capacity(events.len()),
            kinds: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
            ids: Vec::with_capacity(events.len()),
        };
        for event in events {
            let (kind, payload) = encode_change(&event.change);
            rows.versions.push(event.version.to_stored());
            rows.kinds.push(kind);
            rows.payloads.push(payload);
            rows.ids
                .push(event.mutation_id.as_ref().map(|m| m.as_str().to_owned()));
        }
        rows
    }
}

impl PostgresStore {
    /// Commits a batch of appends with one call of `croupier_append_at` (see
    /// its migration) when the caller knows the room's whole head and every
    /// append applies on it ([`Appends::on`]). `None` when it is not taken
    /// (unknown or moved head, another kind of change, a refusal or a retried
    /// id, a database without the function), and then nothing changed: the
    /// general path reads and locks the room and decides again from what it
    /// finds.
    async fn append_at_known_head(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
        now: DateTime<Utc>,
    ) -> Result<Option<Batch>, StoreError> {
        let Some(Appends { events, head }) = Appends::on(key, known, mutations, now) else {
            return Ok(None);
        };
        let (Some(epoch), Some(shape), Some(after)) = (&known.epoch, known.shape, head.shape)
        else {
            return Ok(None);
        };
        let log = LogRows::of(events.iter());
        let ids: Vec<&str> = events
            .iter()
            .filter_map(|e| e.mutation_id.as_ref().map(MutationId::as_str))
            .collect();
        let numbers: Vec<String> = events
            .iter()
            .filter_map(|e| match e.change {
                Change::Added(number) => Some(number_text(number)),
                _ => None,
            })
            .collect();
        let _t = DbTimer::new("append_at");
        let committed = sqlx::query_scalar::<_, Option<DateTime<Utc>>>(
            "SELECT croupier_append_at($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
        )
        .bind(shape.id)
        .bind(&**epoch)
        .bind(known.version.to_stored())
        .bind(shape.history_length as i32)
        .bind(shape.protected)
        .bind(ids)
        .bind(now - MUTATION_ID_WINDOW)
        .bind(now)
        .bind(numbers)
        .bind(after.history_length as i32)
        .bind(head.version.to_stored())
        .bind(log.versions)
        .bind(log.kinds)
        .bind(log.payloads)
        .bind(log.ids)
        .fetch_one(&self.pool)
        .await;
        let created_at = match committed {
            Ok(Some(created_at)) => created_at,
            Ok(None) => return Ok(None),
            // Rolled back to before the function existed: the general path
            // does the same work.
            Err(sqlx::Error::Database(err))
                if err.code().as_deref() == Some(UNDEFINED_FUNCTION) =>
            {
                return Ok(None);
            }
            Err(err) => return Err(err.into()),
        };
        Ok(Some(Batch {
            missed: Some(Vec::new()),
            outcomes: events.into_iter().map(Outcome::Applied).collect(),
            head: Some(Head {
                id: shape.id,
                epoch: epoch.clone(),
                version: head.version,
                history_length: after.history_length,
                protected: shape.protected,
                created_at,
                updated_at: now,
            }),
        }))
    }
}

impl PostgresStore {
    /// [`Store::apply_batch`]; `with_room` also reads the room (history
    /// included) in the same transaction, for [`Store::apply`].
    async fn run_batch(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
        with_room: bool,
    ) -> Result<(Batch, Option<Room>), StoreError> {
        let now = commit_time(Utc::now());
        if !with_room
            && let Some(batch) = self
                .append_at_known_head(key, known, mutations, now)
                .await?
        {
            return Ok((batch, None));
        }
        let _t = DbTimer::new("apply_batch");
        let creates = mutations
            .iter()
            .any(|m| matches!(m.change, Change::Added(_) | Change::Replaced(_)));
        let mut tx = self.pool.begin().await?;
        // Created up front when a mutation may need it, so events can name its
        // epoch; rolled back below if no mutation applies after all.
        let mut locked = lock_room(&mut tx, key, creates, now).await?;
        if let Some((head, false)) = &mut locked
            && went_back(known, &head.epoch, head.version)
        {
            head.epoch = move_to_new_epoch(&mut tx, key, head.id).await?;
        }
        let existing = locked
            .as_ref()
            .filter(|(_, created)| !created)
            .map(|(head, _)| (&*head.epoch, head.version));
        let missed = match plan_missed(known, existing) {
            MissedPlan::Answer(answer) => answer,
            MissedPlan::Read { after, upto } => match &locked {
                Some((room, _)) => {
                    let events = read_events(&mut tx, key, room, after, upto).await?;
                    complete_log(events, after, upto)
                }
                None => None,
            },
        };

        let mut earlier = HashMap::new();
        if let Some((room, false)) = &locked {
            let mut ids: Vec<&str> = mutations
                .iter()
                .filter_map(|m| m.mutation_id.as_ref().map(MutationId::as_str))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            if !ids.is_empty() {
                let since = now - MUTATION_ID_WINDOW;
                earlier = find_mutations(&mut tx, key, room, ids, since).await?;
            }
        }

        let stamp = Stamp {
            key: key.clone(),
            epoch: locked
                .as_ref()
                .map_or_else(|| "".into(), |(r, _)| r.epoch.clone()),
            committed_at: now,
        };
        let mut head = locked
            .as_ref()
            .map_or_else(RoomHead::default, |(r, _)| RoomHead {
                version: r.version,
                length: r.history_length,
                protected: r.protected,
            });
        let mut outcomes = Vec::with_capacity(mutations.len());
        let mut applied: Vec<(RoomEvent, usize)> = Vec::new();
        for mutation in mutations {
            let proposal = mutation.proposal();
            let found = mutation.mutation_id.as_ref().and_then(|id| earlier.get(id));
            let decision = decide(&head, &proposal, found, &stamp);
            if let Decision::Applied(event) = &decision {
                if let Some(id) = &event.mutation_id {
                    // A retry later in this batch finds this event, as it
                    // would find a committed one.
                    earlier.insert(id.clone(), event.clone());
                }
                applied.push((event.clone(), head.length));
                head = head.after(&event.change);
            }
            outcomes.push(Outcome::from(decision));
        }

        let Some((before, created)) = locked else {
            tx.rollback().await?;
            let batch = Batch {
                missed,
                outcomes,
                head: None,
            };
            return Ok((batch, None));
        };
        if applied.is_empty() {
            // Nothing to commit (and a room created for this batch is not kept).
            let room = if with_room && !created {
                read_room(&mut tx, key).await?
            } else {
                None
            };
            tx.rollback().await?;
            let batch = Batch {
                missed,
                outcomes,
                head: (!created).then_some(before),
            };
            return Ok((batch, room));
        }
        // The rows first, the head afterwards: while the schema is only
        // expanded, the head's UPDATE rebuilds `rooms.history` from the rows.
        write_numbers(&mut tx, before.id, &applied).await?;
        let log = LogRows::of(applied.iter().map(|(event, _)| event));
        sqlx::query(
            "WITH logged AS (
                 INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
                 SELECT $1, e.version, e.kind, e.payload::jsonb, e.mutation_id, $6
                   FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[])
                        AS e(version, kind, payload, mutation_id)
             )
             UPDATE rooms SET history_length = $7, version = $8, updated_at = $6 WHERE id = $1",
        )
        .bind(before.id)
        .bind(log.versions)
        .bind(log.kinds)
        .bind(log.payloads)
        .bind(log.ids)
        .bind(now)
        .bind(head.length as i32)
        .bind(head.version.to_stored())
        .execute(&mut *tx)
        .await?;
        let room = if with_room {
            read_room(&mut tx, key).await?
        } else {
            None
        };
        tx.commit().await?;
        let batch = Batch {
            missed,
            outcomes,
            head: Some(Head {
                version: head.version,
                history_length: head.length,
                updated_at: now,
                ..before
            }),
        };
        Ok((batch, room))
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn failovers(&self) -> u64 {
        self.primary.failovers()
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let _t = DbTimer::new("room");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = $1");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| room_from_row(&r).map(|(room, _)| room))
            .transpose()
    }

    async fn apply(&self, mutation: Mutation) -> Result<Applied, StoreError> {
        let key = mutation.key.clone();
        let one = std::slice::from_ref(&mutation);
        let (batch, room) = self
            .run_batch(&key, &Position::default(), one, true)
            .await?;
        applied_alone(batch, room)
    }

    async fn apply_batch(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
    ) -> Result<Batch, StoreError> {
        Ok(self.run_batch(key, known, mutations, false).await?.0)
    }

    async fn heads(&self, keys: &[RoomKey]) -> Result<Vec<(RoomKey, Position)>, StoreError> {
        let _t = DbTimer::new("heads");
        let keys: Vec<&str> = keys.iter().map(RoomKey::as_str).collect();
        let rows = sqlx::query("SELECT key, epoch, version FROM rooms WHERE key = ANY($1)")
            .bind(&keys)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(position_from_row).collect()
    }

    async fn fork_epoch(&self, key: &RoomKey, seen: &Position) -> Result<bool, StoreError> {
        let _t = DbTimer::new("fork_epoch");
        let Some(epoch) = seen.epoch.as_deref() else {
            return Ok(false);
        };
        let moved = sqlx::query(
            "UPDATE rooms SET epoch = $1 WHERE key = $2 AND epoch = $3 AND version < $4",
        )
        .bind(new_epoch())
        .bind(key.as_str())
        .bind(epoch)
        .bind(seen.version.to_stored())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(moved > 0)
    }

    async fn events_since(
        &self,
        key: &RoomKey,
        after: Version,
    ) -> Result<Option<Vec<RoomEvent>>, StoreError> {
        let _t = DbTimer::new("events_since");
        // One statement, so the room's version and its events come from the same
        // snapshot even while writers keep appending.
        let rows = sqlx::query(
            "SELECT r.version AS room_version, r.epoch, e.version, e.kind,
                    e.payload::text AS payload, e.mutation_id, e.created_at
             FROM rooms r
             LEFT JOIN room_events e ON e.room_id = r.id AND e.version > $2
             WHERE r.key = $1
             ORDER BY e.version",
        )
        .bind(key.as_str())
        .bind(after.to_stored())
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(if after == Version::ZERO {
                Some(Vec::new())
            } else {
                None
            });
        };
        let current = stored_version(first.try_get("room_version")?)?;
        let epoch: String = first.try_get("epoch")?;
        if after > current {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>("version")?.is_some() {
                events.push(event_from_row(key, &epoch, row)?);
            }
        }
        // Complete only if the log still starts right after `after` and has no holes.
        let complete = events.len() as u64 == current.since(after)
            && events.first().is_none_or(|e| e.version == after.next());
        Ok(complete.then_some(events))
    }

    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        let _t = DbTimer::new("list_rooms");
        let history_column = if page.include_history {
            "(SELECT string_agg(n.number, ',' ORDER BY n.seq) FROM room_numbers n WHERE n.room_id = r.id)"
        } else {
            "NULL::text"
        };
        let sql = format!(
            "SELECT r.id, r.key, r.history_length, r.created_at, r.updated_at,
                    r.password_hash IS NOT NULL AS protected, {history_column} AS numbers
             FROM rooms r ORDER BY r.updated_at DESC, r.id DESC LIMIT $1 OFFSET $2"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::from(page.limit))
            .bind(i64::try_from(page.offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rooms")
            .fetch_one(&self.pool)
            .await?;
        let summaries = rows
            .iter()
            .map(|row| {
                let key: String = row.try_get("key")?;
                let numbers: Option<String> = row.try_get("numbers")?;
                let length: i32 = row.try_get("history_length")?;
                Ok(RoomSummary {
                    id: row.try_get("id")?,
                    key: stored_key(&key)?,
                    history_length: length as usize,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                    protected: row.try_get("protected")?,
                    history: page
                        .include_history
                        .then(|| stored_numbers(numbers.as_deref()))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((summaries, total as u64))
    }

    async fn room_auth(&self, key: &RoomKey) -> Result<Option<RoomAuth>, StoreError> {
        let _t = DbTimer::new("room_auth");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = $1");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            room_from_row(&r).map(|(room, password_hash)| RoomAuth {
                room,
                password_hash,
            })
        })
        .transpose()
    }

    async fn create_room(
        &self,
        key: &RoomKey,
        password_hash: Option<String>,
    ) -> Result<RoomAuth, StoreError> {
        let _t = DbTimer::new("create_room");
        let now = commit_time(Utc::now());
        // Two statements on purpose: if a concurrent request inserts the same key,
        // ON CONFLICT waits for it to commit and the SELECT (a fresh snapshot)
        // then returns that room with its own password state.
        sqlx::query(
            "INSERT INTO rooms (key, epoch, password_hash, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $4) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key.as_str())
        .bind(new_epoch())
        .bind(password_hash)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = $1");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_one(&self.pool)
            .await?;
        let (room, password_hash) = room_from_row(&row)?;
        Ok(RoomAuth {
            room,
            password_hash,
        })
    }

    async fn prune_events(&self) -> Result<u64, StoreError> {
        let _t = DbTimer::new("prune_events");
        let cutoff: DateTime<Utc> = Utc::now() - EVENT_RETENTION_AGE;
        // In slices, so that a large backlog never runs into the statement timeout
        // and no statement holds many row locks for long.
        let mut removed = 0;
        loop {
            let result = sqlx::query(
                "DELETE FROM room_events WHERE (room_id, version) IN (
                     SELECT e.room_id, e.version FROM room_events e JOIN rooms r ON r.id = e.room_id
                     WHERE e.created_at < $1 AND e.version <= r.version - $2
                     LIMIT $3
                 )",
            )
            .bind(cutoff)
            .bind(EVENT_RETENTION_COUNT)
            .bind(PRUNE_SLICE)
            .execute(&self.pool)
            .await?;
            removed += result.rows_affected();
            if result.rows_affected() < PRUNE_SLICE as u64 {
                return Ok(removed);
            }
        }
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let _t = DbTimer::new("stats");
        let row = sqlx::query(
            "SELECT COUNT(*) AS rooms, COALESCE(AVG(history_length), 0)::float8 AS average FROM rooms",
        )
        .fetch_one(&self.pool)
        .await?;
        let rooms: i64 = row.try_get("rooms")?;
        Ok(StoreStats {
            rooms: rooms as u64,
            average_history_length: row.try_get("average")?,
        })
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(started.elapsed())
    }

    async fn migration_status(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        // Read-only: every instance calls this at start-up, so it must not race
        // the others creating the bookkeeping table.
        let mut conn = self.pool.acquire().await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
        let applied = if exists {
            conn.list_applied_migrations().await?
        } else {
            Vec::new()
        };
        Ok(super::migration_report(&MIGRATOR, &applied))
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        // The migrator holds an advisory lock, so instances migrating at once are safe.
        let admin = self.admin_pool().await?;
        let result = expand_migrator(&MIGRATOR)
            .run(&admin)
            .await
            .context("applying PostgreSQL migrations");
        admin.close().await;
        result
    }

    async fn migrate_contract(&self) -> anyhow::Result<()> {
        let admin = self.admin_pool().await?;
        let result = MIGRATOR
            .run(&admin)
            .await
            .context("applying PostgreSQL migrations, contract steps included");
        admin.close().await;
        result
    }

    async fn rollback(&self, steps: usize) -> anyhow::Result<()> {
        let admin = self.admin_pool().await?;
        let result = async {
            let mut conn = admin.acquire().await?;
            conn.ensure_migrations_table().await?;
            let applied = conn.list_applied_migrations().await?;
            drop(conn);
            let target = super::rollback_target(&applied, steps)?;
            MIGRATOR
                .undo(&admin, target)
                .await
                .context("reverting PostgreSQL migrations")
        }
        .await;
        admin.close().await;
        result
    }
}
