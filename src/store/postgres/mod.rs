//! PostgreSQL backend for cluster mode: every instance shares one database, so
//! everything that must be consistent across instances is decided by PostgreSQL.
//!
//! A room's next version is assigned under the room's row lock, in the same
//! transaction that applies the mutation and logs the event (invariant 2). The
//! common case — appending a number — is a single round trip to the
//! `croupier_append_known` function (see the migrations), so the lock is
//! held only for the function body and the commit flush. Adds to one room that
//! arrive while such a call is running are sent together in the next call, which
//! applies them one after another: a hot room pays one lock hand-over and one
//! flush per group instead of per add, and its history crosses the wire only when
//! the instance does not know it yet; the first group of a new room creates it in
//! the same transaction. Everything else (removals, replacements, an add that
//! could not even fit an empty room) goes through an explicit transaction that
//! applies the shared [`next_history`] rules in Rust. Both paths make the same
//! decisions as the SQLite backend, in the same order: lock, de-duplicate,
//! validate, write.
//!
//! There is no fallback: when the database cannot be reached every operation
//! fails with [`StoreError::Unavailable`], and the pool reconnects by itself once
//! the server is back.
//!
//! The grouped-append path lives in `append`, connecting (options, start-up
//! wait, migration connection) in `connect`; this file holds the store itself,
//! the general transaction path and the rest of the [`Store`] implementation.

mod append;
mod connect;
mod failover;

pub use connect::PgOptions;
pub use failover::HostList;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;
use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgPool, PgRow};

use super::{
    Applied, EVENT_RETENTION_AGE, EVENT_RETENTION_COUNT, MUTATION_ID_WINDOW, MigrationInfo,
    Mutation, Page, RoomAuth, RoomSummary, Store, StoreError, StoreStats, decode_change,
    encode_change, next_history, stored_history, stored_key,
};
use crate::domain::{Change, MutationId, Room, RoomEvent, RoomKey, Version, new_epoch};
use crate::telemetry::DbTimer;
use append::AppendQueues;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

const ROOM_COLUMNS: &str =
    "id, key, history::text AS history, version, epoch, created_at, updated_at, password_hash";

/// Most event-log rows one pruning statement deletes.
const PRUNE_SLICE: i64 = 10_000;

pub struct PostgresStore {
    pool: PgPool,
    appends: Arc<AppendQueues>,
    /// Client-side bound for one `croupier_append_known` call (see
    /// `append::flush_appends`).
    append_timeout: Duration,
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

    /// The general path: any change, creating the room when an add or replace
    /// targets a missing one.
    async fn apply_in_transaction(
        &self,
        mutation: Mutation,
        now: DateTime<Utc>,
    ) -> Result<Applied, StoreError> {
        let lock_room = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = $1 FOR UPDATE");
        let mut tx = self.pool.begin().await?;
        let mut row = sqlx::query(&lock_room)
            .bind(mutation.key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if row.is_none() {
            if let Change::Removed(index) = mutation.change {
                tx.rollback().await?;
                return Err(StoreError::IndexOutOfRange { index, len: 0 });
            }
            let insert = format!(
                "INSERT INTO rooms (key, epoch, created_at, updated_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (key) DO NOTHING RETURNING {ROOM_COLUMNS}"
            );
            row = sqlx::query(&insert)
                .bind(mutation.key.as_str())
                .bind(new_epoch())
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if row.is_none() {
                // Another writer created it meanwhile; its insert has committed
                // (ON CONFLICT waited for it), so this statement sees the row.
                row = sqlx::query(&lock_room)
                    .bind(mutation.key.as_str())
                    .fetch_optional(&mut *tx)
                    .await?;
            }
        }
        let Some(row) = row else {
            return Err(StoreError::Internal(
                "room vanished while being created".into(),
            ));
        };
        let (room, _) = room_from_row(&row)?;
        if room.protected && !mutation.authorized {
            tx.rollback().await?;
            return Err(StoreError::AuthRequired);
        }

        if let Some(mid) = &mutation.mutation_id {
            let row = sqlx::query(
                "SELECT version, kind, payload::text AS payload, mutation_id, created_at
                 FROM room_events
                 WHERE room_id = $1 AND mutation_id = $2 AND created_at > $3
                 ORDER BY version LIMIT 1",
            )
            .bind(room.id)
            .bind(mid.as_str())
            .bind(now - MUTATION_ID_WINDOW)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                let event = event_from_row(&room.key, &room.epoch, &row)?;
                tx.rollback().await?;
                return Ok(Applied {
                    event,
                    room,
                    duplicate: true,
                });
            }
        }

        let history = match next_history(&room.history, &mutation.change, mutation.max_history) {
            Ok(history) => history,
            Err(err) => {
                tx.rollback().await?;
                return Err(err);
            }
        };
        let version = room.version + 1;
        let (kind, payload) = encode_change(&mutation.change);
        sqlx::query(
            "WITH updated AS (
                 UPDATE rooms SET history = $2::jsonb, history_length = $3, version = $4, updated_at = $5
                 WHERE id = $1
             )
             INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
             VALUES ($1, $4, $6, $7::jsonb, $8, $5)",
        )
        .bind(room.id)
        .bind(history.to_json_string())
        .bind(history.len() as i64)
        .bind(version as i64)
        .bind(now)
        .bind(kind)
        .bind(payload)
        .bind(mutation.mutation_id.as_ref().map(MutationId::as_str))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;

        let event = RoomEvent {
            key: room.key.clone(),
            epoch: room.epoch.clone(),
            version,
            change: mutation.change,
            mutation_id: mutation.mutation_id,
            committed_at: now,
        };
        let room = Room {
            history,
            version,
            updated_at: now,
            ..room
        };
        Ok(Applied {
            event,
            room,
            duplicate: false,
        })
    }
}

/// Timestamps are stored with microsecond precision; rounding first keeps what
/// `apply` returns equal to what later reads return.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

fn room_from_row(row: &PgRow) -> Result<(Room, Option<String>), StoreError> {
    let key: String = row.try_get("key")?;
    let history: String = row.try_get("history")?;
    let version: i64 = row.try_get("version")?;
    let epoch: String = row.try_get("epoch")?;
    let password_hash: Option<String> = row.try_get("password_hash")?;
    let room = Room {
        id: row.try_get("id")?,
        key: stored_key(&key)?,
        history: stored_history(&history)?,
        version: version as Version,
        epoch: epoch.into(),
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        protected: password_hash.is_some(),
    };
    Ok((room, password_hash))
}

fn event_from_row(key: &RoomKey, epoch: &str, row: &PgRow) -> Result<RoomEvent, StoreError> {
    let kind: String = row.try_get("kind")?;
    let payload: String = row.try_get("payload")?;
    let version: i64 = row.try_get("version")?;
    let mutation_id: Option<String> = row.try_get("mutation_id")?;
    Ok(RoomEvent {
        key: key.clone(),
        epoch: epoch.into(),
        version: version as Version,
        change: decode_change(&kind, &payload)?,
        mutation_id: mutation_id
            .map(MutationId::parse)
            .transpose()
            .map_err(|err| StoreError::Internal(format!("invalid stored mutation id: {err}")))?,
        committed_at: row.try_get("created_at")?,
    })
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let _t = DbTimer::new("room");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = $1");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| room_from_row(&r).map(|(room, _)| room))
            .transpose()
    }

    async fn apply(&self, mutation: Mutation) -> Result<Applied, StoreError> {
        let _t = DbTimer::new("apply");
        // Adds take the grouped single-call path, which also creates a missing
        // room; everything else, and an add that path turned away, the general
        // transaction.
        // Adds without a token take that path only for rooms known to be open:
        // it does not check protection, and a missing room may be created with
        // a password at any moment.
        if let Change::Added(number) = mutation.change
            && (mutation.authorized || self.appends.is_open(&mutation.key))
            && let Some(applied) = self.append(&mutation, number).await?
        {
            return Ok(applied);
        }
        let applied = self.apply_in_transaction(mutation, now()).await?;
        self.appends.learn(&applied.room);
        Ok(applied)
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
        .bind(after as i64)
        .fetch_all(&self.pool)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(if after == 0 { Some(Vec::new()) } else { None });
        };
        let current: i64 = first.try_get("room_version")?;
        let epoch: String = first.try_get("epoch")?;
        if after as i64 > current {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<Option<i64>, _>("version")?.is_some() {
                events.push(event_from_row(key, &epoch, row)?);
            }
        }
        // Complete only if the log still starts right after `after` and has no holes.
        let complete = events.len() as i64 == current - after as i64
            && events.first().is_none_or(|e| e.version == after + 1);
        Ok(complete.then_some(events))
    }

    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        let _t = DbTimer::new("list_rooms");
        let history_column = if page.include_history {
            "history::text AS history"
        } else {
            "NULL::text AS history"
        };
        let sql = format!(
            "SELECT id, key, history_length, created_at, updated_at, password_hash IS NOT NULL AS protected, {history_column}
             FROM rooms ORDER BY updated_at DESC, id DESC LIMIT $1 OFFSET $2"
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
                let history: Option<String> = row.try_get("history")?;
                let length: i32 = row.try_get("history_length")?;
                Ok(RoomSummary {
                    id: row.try_get("id")?,
                    key: stored_key(&key)?,
                    history_length: length as usize,
                    created_at: row.try_get("created_at")?,
                    updated_at: row.try_get("updated_at")?,
                    protected: row.try_get("protected")?,
                    history: history.as_deref().map(stored_history).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((summaries, total as u64))
    }

    async fn room_auth(&self, key: &RoomKey) -> Result<Option<RoomAuth>, StoreError> {
        let _t = DbTimer::new("room_auth");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = $1");
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
        let now = now();
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
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = $1");
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
        let result = MIGRATOR
            .run(&admin)
            .await
            .context("applying PostgreSQL migrations");
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
