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
use sqlx::{Row, SqlitePool};

use super::{
    Applied, EVENT_RETENTION_AGE, EVENT_RETENTION_COUNT, MUTATION_ID_WINDOW, MigrationInfo,
    Mutation, Page, RoomAuth, RoomSummary, Store, StoreError, StoreStats, decode_change,
    encode_change, next_history, stored_history, stored_key,
};
use crate::domain::{Change, MutationId, Room, RoomEvent, RoomKey, Version, new_epoch};
use crate::telemetry::DbTimer;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

const ROOM_COLUMNS: &str =
    "id, key, history, version, epoch, created_at, updated_at, password_hash";

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

fn event_from_row(key: &RoomKey, epoch: &str, row: &SqliteRow) -> Result<RoomEvent, StoreError> {
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
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let _t = DbTimer::new("room");
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = ?");
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| room_from_row(&r).map(|(room, _)| room))
            .transpose()
    }

    async fn apply(&self, mutation: Mutation) -> Result<Applied, StoreError> {
        let _t = DbTimer::new("apply");
        let mut tx = self.writer.begin().await?;
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = ?");
        let existing = sqlx::query(&sql)
            .bind(mutation.key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let now = Utc::now();
        let room = match existing {
            Some(row) => room_from_row(&row)?.0,
            None => {
                if let Change::Removed(index) = mutation.change {
                    return Err(StoreError::IndexOutOfRange { index, len: 0 });
                }
                let epoch = new_epoch();
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO rooms (key, epoch, created_at, updated_at) VALUES (?, ?, ?, ?) RETURNING id",
                )
                .bind(mutation.key.as_str())
                .bind(&epoch)
                .bind(now)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                Room {
                    id,
                    key: mutation.key.clone(),
                    history: Default::default(),
                    version: 0,
                    epoch: epoch.into(),
                    created_at: now,
                    updated_at: now,
                    protected: false,
                }
            }
        };
        // Checked in the write transaction, so a room protected a moment ago
        // can never take a write without its token.
        if room.protected && !mutation.authorized {
            tx.rollback().await?;
            return Err(StoreError::AuthRequired);
        }

        if let Some(mid) = &mutation.mutation_id {
            let since = now - MUTATION_ID_WINDOW;
            let row = sqlx::query(
                "SELECT version, kind, payload, mutation_id, created_at FROM room_events
                 WHERE room_id = ? AND mutation_id = ? AND created_at > ?",
            )
            .bind(room.id)
            .bind(mid.as_str())
            .bind(since)
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

        let history = next_history(&room.history, &mutation.change, mutation.max_history)?;
        let version = room.version + 1;
        sqlx::query(
            "UPDATE rooms SET history = ?, history_length = ?, version = ?, updated_at = ? WHERE id = ?",
        )
        .bind(history.to_json_string())
        .bind(history.len() as i64)
        .bind(version as i64)
        .bind(now)
        .bind(room.id)
        .execute(&mut *tx)
        .await?;
        let (kind, payload) = encode_change(&mutation.change);
        sqlx::query(
            "INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(room.id)
        .bind(version as i64)
        .bind(kind)
        .bind(payload)
        .bind(mutation.mutation_id.as_ref().map(MutationId::as_str))
        .bind(now)
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
            return Ok(if after == 0 { Some(Vec::new()) } else { None });
        };
        let room_id: i64 = room.try_get("id")?;
        let current: i64 = room.try_get("version")?;
        let epoch: String = room.try_get("epoch")?;
        if after as i64 > current {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT version, kind, payload, mutation_id, created_at FROM room_events
             WHERE room_id = ? AND version > ? ORDER BY version",
        )
        .bind(room_id)
        .bind(after as i64)
        .fetch_all(&mut *tx)
        .await?;
        let events = rows
            .iter()
            .map(|row| event_from_row(key, &epoch, row))
            .collect::<Result<Vec<_>, _>>()?;
        // Complete only if the log still starts right after `after` and has no holes.
        let complete = events.len() as i64 == current - after as i64
            && events.first().is_none_or(|e| e.version == after + 1);
        Ok(complete.then_some(events))
    }

    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        let _t = DbTimer::new("list_rooms");
        let history_column = if page.include_history {
            "history"
        } else {
            "NULL AS history"
        };
        let sql = format!(
            "SELECT id, key, history_length, created_at, updated_at, password_hash IS NOT NULL AS protected, {history_column}
             FROM rooms ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?"
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
                let history: Option<String> = row.try_get("history")?;
                let length: i64 = row.try_get("history_length")?;
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
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = ?");
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
        let sql = format!("SELECT {ROOM_COLUMNS} FROM rooms WHERE key = ?");
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
