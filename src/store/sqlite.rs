//! SQLite backend for the embedded default: one file under `DATA_DIR`.
//!
//! Writes go through a pool of exactly one connection, so transactions never race
//! for SQLite's single write lock (no `SQLITE_BUSY` under load) and versions are
//! assigned strictly one after another. Reads use a separate pool; WAL mode lets
//! them run while a write is in progress.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{
    Applied, Batch, EVENT_RETENTION_AGE, EVENT_RETENTION_COUNT, Head, MUTATION_ID_WINDOW,
    MigrationInfo, MissedPlan, Mutation, Outcome, Page, Position, RoomAuth, RoomSummary, Store,
    StoreError, StoreStats, applied_alone, complete_log, decode_change, encode_change,
    expand_migrator, number_text, plan_missed, stored_key, stored_numbers, stored_version,
    went_back,
};
use crate::domain::rules::{Decision, RoomHead, Stamp, commit_time, decide};
use crate::domain::{Change, History, MutationId, Room, RoomEvent, RoomKey, Version, new_epoch};
use crate::telemetry::DbTimer;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// A room with its history, which is its `room_numbers` rows in `seq` order.
const ROOM_COLUMNS: &str = "r.id, r.key, r.version, r.epoch, r.created_at, r.updated_at, r.password_hash,
     (SELECT group_concat(n.number, ',' ORDER BY n.seq) FROM room_numbers n WHERE n.room_id = r.id) AS numbers";

/// A room without its history: what a batch needs.
const HEAD_COLUMNS: &str = "id, epoch, version, history_length, password_hash IS NOT NULL AS protected, created_at, updated_at";

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        Self::with_options(SqliteConnectOptions::new().filename(path)).await
    }

    /// Opens a database from a `sqlite:` URL.
    pub async fn open_url(url: &str) -> anyhow::Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .with_context(|| format!("invalid SQLite URL {url}"))?;
        Self::with_options(options).await
    }

    async fn with_options(options: SqliteConnectOptions) -> anyhow::Result<Self> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a committed (and therefore acknowledged) write survives power loss.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .context("opening the SQLite database")?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.read_only(false))
            .await
            .context("opening the SQLite database for reading")?;
        Ok(SqliteStore { writer, reader })
    }
}

fn room_from_row(row: &SqliteRow) -> Result<(Room, Option<String>), StoreError> {
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

fn head_from_row(row: &SqliteRow) -> Result<Head, StoreError> {
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

async fn load_head(conn: &mut SqliteConnection, key: &RoomKey) -> Result<Option<Head>, StoreError> {
    let sql = format!("SELECT {HEAD_COLUMNS} FROM rooms WHERE key = ?");
    let row = sqlx::query(&sql)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| head_from_row(&r)).transpose()
}

/// The room's logged events after `after` (up to `upto`), oldest first.
async fn read_events(
    conn: &mut SqliteConnection,
    key: &RoomKey,
    room: &Head,
    after: Version,
    upto: Option<Version>,
) -> Result<Vec<RoomEvent>, StoreError> {
    let rows = sqlx::query(
        "SELECT version, kind, payload, mutation_id, created_at FROM room_events
         WHERE room_id = ? AND version > ? AND version <= ? ORDER BY version",
    )
    .bind(room.id)
    .bind(after.to_stored())
    .bind(upto.map_or(i64::MAX, Version::to_stored))
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| event_from_row(key, &room.epoch, row))
        .collect()
}

/// The first event `id` produced in this room after `since`, if any.
async fn find_mutation(
    conn: &mut SqliteConnection,
    key: &RoomKey,
    room: &Head,
    id: &MutationId,
    since: DateTime<Utc>,
) -> Result<Option<RoomEvent>, StoreError> {
    let row = sqlx::query(
        "SELECT version, kind, payload, mutation_id, created_at FROM room_events
         WHERE room_id = ? AND mutation_id = ? AND created_at > ?
         ORDER BY version LIMIT 1",
    )
    .bind(room.id)
    .bind(id.as_str())
    .bind(since)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| event_from_row(key, &room.epoch, &r))
        .transpose()
}

/// Writes an applied event: its change to `room_numbers` and itself to the
/// log. `length` is the history's length before it. An append is one row,
/// whatever the history's length.
async fn persist(
    conn: &mut SqliteConnection,
    room_id: i64,
    length: usize,
    event: &RoomEvent,
) -> Result<(), StoreError> {
    match &event.change {
        Change::Added(number) => {
            sqlx::query(
                "INSERT INTO room_numbers (room_id, seq, number)
                 SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2 FROM room_numbers WHERE room_id = ?1",
            )
            .bind(room_id)
            .bind(number_text(*number))
            .execute(&mut *conn)
            .await?;
        }
        Change::Removed(index) => {
            // Counted from the nearer end: removing one of the latest numbers
            // (the usual correction) skips few rows.
            let (order, offset) = if *index < length / 2 {
                ("ASC", *index)
            } else {
                ("DESC", length.saturating_sub(index + 1))
            };
            let sql = format!(
                "DELETE FROM room_numbers WHERE room_id = ?1 AND seq =
                   (SELECT seq FROM room_numbers WHERE room_id = ?1 ORDER BY seq {order} LIMIT 1 OFFSET ?2)"
            );
            sqlx::query(&sql)
                .bind(room_id)
                .bind(offset as i64)
                .execute(&mut *conn)
                .await?;
        }
        Change::Replaced(history) => {
            sqlx::query("DELETE FROM room_numbers WHERE room_id = ?")
                .bind(room_id)
                .execute(&mut *conn)
                .await?;
            insert_numbers(conn, room_id, history).await?;
        }
    }
    let (kind, payload) = encode_change(&event.change);
    sqlx::query(
        "INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(room_id)
    .bind(event.version.to_stored())
    .bind(kind)
    .bind(payload)
    .bind(event.mutation_id.as_ref().map(MutationId::as_str))
    .bind(event.committed_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Inserts a whole history as rows 1..=n of an empty room.
async fn insert_numbers(
    conn: &mut SqliteConnection,
    room_id: i64,
    history: &History,
) -> Result<(), StoreError> {
    if history.is_empty() {
        return Ok(());
    }
    let texts: Vec<String> = history.numbers().iter().map(|n| number_text(*n)).collect();
    let json = serde_json::to_string(&texts).map_err(|e| StoreError::Internal(e.to_string()))?;
    sqlx::query(
        "INSERT INTO room_numbers (room_id, seq, number)
         SELECT ?, j.key + 1, j.value FROM json_each(?) j",
    )
    .bind(room_id)
    .bind(json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn event_from_row(key: &RoomKey, epoch: &str, row: &SqliteRow) -> Result<RoomEvent, StoreError> {
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

/// The room with its history, read on `conn` (inside a batch's transaction).
async fn read_room(conn: &mut SqliteConnection, key: &RoomKey) -> Result<Option<Room>, StoreError> {
    let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = ?");
    let row = sqlx::query(&sql)
        .bind(key.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| room_from_row(&r).map(|(room, _)| room))
        .transpose()
}

impl SqliteStore {
    /// [`Store::apply_batch`]; `with_room` also reads the room (history
    /// included) in the same transaction, for [`Store::apply`].
    async fn run_batch(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
        with_room: bool,
    ) -> Result<(Batch, Option<Room>), StoreError> {
        let _t = DbTimer::new("apply_batch");
        // The writer pool's single connection is SQLite's write lock for this
        // process: nothing else writes between this load and the commit.
        let mut tx = self.writer.begin().await?;
        let mut room = load_head(&mut tx, key).await?;
        if let Some(head) = &mut room
            && went_back(known, &head.epoch, head.version)
        {
            let epoch = new_epoch();
            sqlx::query("UPDATE rooms SET epoch = ? WHERE id = ?")
                .bind(&epoch)
                .bind(head.id)
                .execute(&mut *tx)
                .await?;
            tracing::warn!(room = %key, epoch = %epoch, "the store is behind what was delivered; the room moves to a new epoch");
            head.epoch = epoch.into();
        }
        let missed = match plan_missed(known, room.as_ref().map(|r| (&*r.epoch, r.version))) {
            MissedPlan::Answer(answer) => answer,
            MissedPlan::Read { after, upto } => match &room {
                Some(r) => {
                    let events = read_events(&mut tx, key, r, after, Some(upto)).await?;
                    complete_log(events, after, upto)
                }
                None => None,
            },
        };
        let now = commit_time(Utc::now());
        let creates = mutations
            .iter()
            .any(|m| matches!(m.change, Change::Added(_) | Change::Replaced(_)));
        let created = room.is_none() && creates;
        if created {
            // Created up front so events can name its epoch; rolled back below
            // if no mutation applies after all.
            let epoch = new_epoch();
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO rooms (key, epoch, created_at, updated_at) VALUES (?, ?, ?, ?) RETURNING id",
            )
            .bind(key.as_str())
            .bind(&epoch)
            .bind(now)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            room = Some(Head {
                id,
                epoch: epoch.into(),
                version: Version::ZERO,
                history_length: 0,
                protected: false,
                created_at: now,
                updated_at: now,
            });
        }
        let stamp = Stamp {
            key: key.clone(),
            epoch: room.as_ref().map_or_else(|| "".into(), |r| r.epoch.clone()),
            committed_at: now,
        };
        let mut head = room.as_ref().map_or_else(RoomHead::default, |r| RoomHead {
            version: r.version,
            length: r.history_length,
            protected: r.protected,
        });
        let since = now - MUTATION_ID_WINDOW;
        let mut outcomes = Vec::with_capacity(mutations.len());
        for mutation in mutations {
            let earlier = match (&mutation.mutation_id, &room) {
                // Sees this batch's own events too: they are in this transaction.
                (Some(id), Some(r)) => find_mutation(&mut tx, key, r, id, since).await?,
                _ => None,
            };
            let proposal = mutation.proposal();
            let decision = decide(&head, &proposal, earlier.as_ref(), &stamp);
            if let Decision::Applied(event) = &decision {
                let Some(r) = &room else {
                    return Err(StoreError::Internal(
                        "a change applied to a room that was not created".into(),
                    ));
                };
                persist(&mut tx, r.id, head.length, event).await?;
                head = head.after(&event.change);
            }
            outcomes.push(Outcome::from(decision));
        }

        let Some(before) = room else {
            tx.rollback().await?;
            let batch = Batch {
                missed,
                outcomes,
                head: None,
            };
            return Ok((batch, None));
        };
        if head.version == before.version {
            // Nothing applied: nothing to commit (and a room created for this
            // batch is not kept).
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
        sqlx::query(
            "UPDATE rooms SET history_length = ?, version = ?, updated_at = ? WHERE id = ?",
        )
        .bind(head.length as i64)
        .bind(head.version.to_stored())
        .bind(now)
        .bind(before.id)
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
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let _t = DbTimer::new("room");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = ?");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.reader)
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
        let list = serde_json::to_string(&keys)
            .map_err(|e| StoreError::Internal(format!("encoding room keys: {e}")))?;
        let rows = sqlx::query(
            "SELECT key, epoch, version FROM rooms WHERE key IN (SELECT value FROM json_each(?))",
        )
        .bind(list)
        .fetch_all(&self.reader)
        .await?;
        rows.iter()
            .map(|row| {
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
            })
            .collect()
    }

    async fn fork_epoch(&self, key: &RoomKey, seen: &Position) -> Result<bool, StoreError> {
        let _t = DbTimer::new("fork_epoch");
        let Some(epoch) = seen.epoch.as_deref() else {
            return Ok(false);
        };
        let moved =
            sqlx::query("UPDATE rooms SET epoch = ? WHERE key = ? AND epoch = ? AND version < ?")
                .bind(new_epoch())
                .bind(key.as_str())
                .bind(epoch)
                .bind(seen.version.to_stored())
                .execute(&self.writer)
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
        let mut tx = self.reader.begin().await?;
        let room = sqlx::query("SELECT id, version, epoch FROM rooms WHERE key = ?")
            .bind(key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(room) = room else {
            return Ok(if after == Version::ZERO {
                Some(Vec::new())
            } else {
                None
            });
        };
        let room_id: i64 = room.try_get("id")?;
        let current = stored_version(room.try_get("version")?)?;
        let epoch: String = room.try_get("epoch")?;
        if after > current {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT version, kind, payload, mutation_id, created_at FROM room_events
             WHERE room_id = ? AND version > ? ORDER BY version",
        )
        .bind(room_id)
        .bind(after.to_stored())
        .fetch_all(&mut *tx)
        .await?;
        let events = rows
            .iter()
            .map(|row| event_from_row(key, &epoch, row))
            .collect::<Result<Vec<_>, _>>()?;
        // Complete only if the log still starts right after `after` and has no holes.
        let complete = events.len() as u64 == current.since(after)
            && events.first().is_none_or(|e| e.version == after.next());
        Ok(complete.then_some(events))
    }

    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        let _t = DbTimer::new("list_rooms");
        let history_column = if page.include_history {
            "(SELECT group_concat(n.number, ',' ORDER BY n.seq) FROM room_numbers n WHERE n.room_id = r.id)"
        } else {
            "NULL"
        };
        let sql = format!(
            "SELECT r.id, r.key, r.history_length, r.created_at, r.updated_at,
                    r.password_hash IS NOT NULL AS protected, {history_column} AS numbers
             FROM rooms r ORDER BY r.updated_at DESC, r.id DESC LIMIT ? OFFSET ?"
        );
        let rows = sqlx::query(&sql)
            .bind(i64::from(page.limit))
            .bind(page.offset as i64)
            .fetch_all(&self.reader)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rooms")
            .fetch_one(&self.reader)
            .await?;
        let summaries = rows
            .iter()
            .map(|row| {
                let key: String = row.try_get("key")?;
                let numbers: Option<String> = row.try_get("numbers")?;
                let length: i64 = row.try_get("history_length")?;
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
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = ?");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.reader)
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
        let now = Utc::now();
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO rooms (key, epoch, password_hash, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key.as_str())
        .bind(new_epoch())
        .bind(password_hash)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms r WHERE r.key = ?");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        let (room, password_hash) = room_from_row(&row)?;
        Ok(RoomAuth {
            room,
            password_hash,
        })
    }

    async fn prune_events(&self) -> Result<u64, StoreError> {
        let _t = DbTimer::new("prune_events");
        let cutoff: DateTime<Utc> = Utc::now() - EVENT_RETENTION_AGE;
        let result = sqlx::query(
            "DELETE FROM room_events WHERE created_at < ? AND version <=
               (SELECT r.version - ? FROM rooms r WHERE r.id = room_events.room_id)",
        )
        .bind(cutoff)
        .bind(EVENT_RETENTION_COUNT)
        .execute(&self.writer)
        .await?;
        Ok(result.rows_affected())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let _t = DbTimer::new("stats");
        let row = sqlx::query(
            "SELECT COUNT(*) AS rooms, COALESCE(AVG(history_length), 0.0) AS average FROM rooms",
        )
        .fetch_one(&self.reader)
        .await?;
        let rooms: i64 = row.try_get("rooms")?;
        Ok(StoreStats {
            rooms: rooms as u64,
            average_history_length: row.try_get("average")?,
        })
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(started.elapsed())
    }

    async fn migration_status(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        let mut conn = self.writer.acquire().await?;
        conn.ensure_migrations_table().await?;
        let applied = conn.list_applied_migrations().await?;
        Ok(super::migration_report(&MIGRATOR, &applied))
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        // The embedded database has one instance, so its schema changes are
        // never split into expand and contract; this applies everything.
        expand_migrator(&MIGRATOR)
            .run(&self.writer)
            .await
            .context("applying SQLite migrations")
    }

    async fn migrate_contract(&self) -> anyhow::Result<()> {
        MIGRATOR
            .run(&self.writer)
            .await
            .context("applying SQLite migrations")
    }

    async fn rollback(&self, steps: usize) -> anyhow::Result<()> {
        let mut conn = self.writer.acquire().await?;
        conn.ensure_migrations_table().await?;
        let applied = conn.list_applied_migrations().await?;
        // The writer pool has one connection, and the migrator needs it.
        drop(conn);
        let target = super::rollback_target(&applied, steps)?;
        MIGRATOR
            .undo(&self.writer, target)
            .await
            .context("reverting SQLite migrations")
    }
}
