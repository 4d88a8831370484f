//! PostgreSQL backend for cluster mode: every instance shares one database, so
//! everything that must be consistent across instances is decided by PostgreSQL.
//!
//! A room's next version is assigned under the room's row lock, in the same
//! transaction that applies the mutation and logs the event (invariant 2). The
//! common case — appending a number to an existing room — is a single round trip
//! to the `croupier_append` function (see the migration), so the lock is held only
//! for the function body and the commit flush. Adds to one room that arrive while
//! such a call is running are sent together in the next call, which applies them
//! one after another: a hot room pays one lock hand-over and one flush per group
//! instead of per add. Everything else (room creation, removals, replacements)
//! goes through an explicit transaction that applies the shared [`next_history`]
//! rules in Rust. Both paths make the same decisions as the SQLite backend, in the
//! same order: lock, de-duplicate, validate, write.
//!
//! There is no fallback: when the database cannot be reached every operation
//! fails with [`StoreError::Unavailable`], and the pool reconnects by itself once
//! the server is back.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::oneshot;

use super::{
    Applied, EVENT_RETENTION_AGE, EVENT_RETENTION_COUNT, MUTATION_ID_WINDOW, MigrationInfo,
    Mutation, Page, RoomAuth, RoomSummary, Store, StoreError, StoreStats, decode_change,
    encode_change, next_history, stored_history, stored_key,
};
use crate::domain::{
    Change, History, MutationId, Number, Room, RoomEvent, RoomKey, Version, new_epoch,
};
use crate::telemetry::DbTimer;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

const ROOM_COLUMNS: &str =
    "id, key, history::text AS history, version, epoch, created_at, updated_at, password_hash";

/// Longest wait between two connection attempts at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// Most event-log rows one pruning statement deletes.
const PRUNE_SLICE: i64 = 10_000;

/// Most adds one `croupier_append` call carries.
const MAX_APPEND_BATCH: usize = 256;

/// Connection settings for [`PostgresStore::connect`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pool size of this instance.
    pub max_connections: u32,
    /// How long an operation waits for a pooled connection (or for a new one to be
    /// established) before it fails with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Server-side limit for one statement, including time spent waiting for a
    /// room's lock. Also bounds how long a session may sit idle inside a
    /// transaction, so a stalled instance cannot keep a room locked.
    pub statement_timeout: Duration,
    /// How many times start-up tries to reach the server before giving up.
    pub connect_attempts: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 20,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            connect_attempts: 30,
        }
    }
}

pub struct PostgresStore {
    pool: PgPool,
    appends: Arc<AppendQueues>,
    /// Client-side bound for one `croupier_append` call (see [`flush_appends`]).
    append_timeout: Duration,
    /// For migrations: the same server and credentials, without the timeouts.
    admin: PgConnectOptions,
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL), waiting with
    /// exponential backoff while the server is unreachable (e.g. still starting
    /// next to this instance). Errors that waiting cannot fix — bad credentials,
    /// a missing database — fail at once.
    pub async fn connect(url: &str, options: PgOptions) -> anyhow::Result<Self> {
        // The URL may hold a password: it is never logged or put into an error.
        let admin = PgConnectOptions::from_str(url)
            .context("invalid PostgreSQL URL")?
            .application_name("croupier");
        let timeout_ms = options.statement_timeout.as_millis();
        let connect = admin.clone().options([
            ("statement_timeout", format!("{timeout_ms}ms")),
            (
                "idle_in_transaction_session_timeout",
                format!("{timeout_ms}ms"),
            ),
        ]);
        wait_for_server(&connect, &options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // Pings an idle connection before handing it out, so connections that
            // died with a server restart are replaced instead of failing a request.
            .test_before_acquire(true)
            .connect_lazy_with(connect);
        // Waiting for a connection, then the statement's own limit, then slack.
        let statement_limit = match options.statement_timeout {
            Duration::ZERO => Duration::from_secs(60),
            limit => limit,
        };
        let append_timeout = options.acquire_timeout + statement_limit + Duration::from_secs(1);
        Ok(PostgresStore {
            pool,
            appends: Arc::default(),
            append_timeout,
            admin,
        })
    }

    /// The underlying pool, for tests and tools that need raw SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A connection of its own for migrations, which may take longer than a
    /// statement is allowed to and may wait for another instance's migration lock.
    /// (A one-connection pool: the migrator's API is easiest to use with a pool.)
    async fn admin_pool(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.admin.clone())
            .await
            .context("connecting to PostgreSQL to migrate")
    }

    /// Queues an add for its room's next `croupier_append` call and waits for the
    /// outcome; `None` if the room does not exist yet.
    async fn append(
        &self,
        mutation: &Mutation,
        number: Number,
    ) -> Result<Option<Applied>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = PendingAppend {
            number,
            mutation_id: mutation.mutation_id.clone(),
            max_history: mutation.max_history,
            reply,
        };
        let start_flusher = {
            let mut rooms = self.appends.lock();
            match rooms.entry(mutation.key.clone()) {
                Entry::Occupied(mut queue) => {
                    queue.get_mut().push(pending);
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(vec![pending]);
                    true
                }
            }
        };
        if start_flusher {
            let task = flush_appends(
                self.pool.clone(),
                self.appends.clone(),
                mutation.key.clone(),
                self.append_timeout,
            );
            tokio::spawn(task);
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::Internal(
                "the append task stopped before answering".into(),
            ))
        })
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

/// Tries to open one connection until it works, backing off exponentially while
/// the server is unreachable.
async fn wait_for_server(connect: &PgConnectOptions, options: &PgOptions) -> anyhow::Result<()> {
    let attempts = options.connect_attempts.max(1);
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        let outcome =
            tokio::time::timeout(options.acquire_timeout, PgConnection::connect_with(connect))
                .await;
        match outcome {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
                return Ok(());
            }
            Ok(Err(err)) => match StoreError::from_sqlx(err) {
                StoreError::Unavailable(msg) => last_error = msg,
                other => anyhow::bail!("connecting to PostgreSQL: {other}"),
            },
            Err(_) => {
                last_error = format!("no answer within {:?}", options.acquire_timeout);
            }
        }
        if attempt == attempts {
            tracing::warn!(attempt, attempts, error = %last_error, "PostgreSQL is unreachable; giving up");
            break;
        }
        tracing::warn!(
            attempt,
            attempts,
            error = %last_error,
            retry_in_ms = backoff.as_millis() as u64,
            "PostgreSQL is unreachable; retrying"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
    }
    anyhow::bail!("PostgreSQL still unreachable after {attempts} attempt(s): {last_error}")
}

// Appends. Concurrent adds to one room are serialised by the room's row lock
// anyway, and each would pay for its own lock hand-over and commit flush. So an
// instance sends them one call at a time per room: while a call runs, newly
// arriving adds wait in the room's queue, and the next call carries all of them
// (in arrival order). Under load that turns one commit per add into one commit
// per group, without changing any outcome: the function applies the group item by
// item exactly as separate calls would, and every caller is answered only after
// the commit that contains its add.

/// An add waiting for its room's next `croupier_append` call.
struct PendingAppend {
    number: Number,
    mutation_id: Option<MutationId>,
    max_history: usize,
    reply: oneshot::Sender<Result<Option<Applied>, StoreError>>,
}

/// Adds waiting, per room. A room has an entry exactly while a task started by
/// [`PostgresStore::append`] is sending its calls; the task removes the entry once
/// it finds it empty.
#[derive(Default)]
struct AppendQueues {
    rooms: Mutex<HashMap<RoomKey, Vec<PendingAppend>>>,
}

impl AppendQueues {
    /// A std mutex: it is held only to push or drain a queue, never across `.await`.
    fn lock(&self) -> MutexGuard<'_, HashMap<RoomKey, Vec<PendingAppend>>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes a room's entry if its task ends early (a panic, or a runtime shutting
/// down), so that later adds start a new task instead of waiting forever.
/// Dropping the queued replies makes their callers fail with an internal error.
struct FlusherGuard<'a> {
    queues: &'a AppendQueues,
    key: &'a RoomKey,
    finished: bool,
}

impl Drop for FlusherGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.queues.lock().remove(self.key);
        }
    }
}

/// Sends the room's queued adds, a group per call, until the queue is empty.
///
/// Every add of this instance's room waits on this task, so a call gets a
/// client-side deadline as well: the server's statement timeout cannot help when
/// its answer never arrives (a network partition leaves the socket open).
async fn flush_appends(pool: PgPool, queues: Arc<AppendQueues>, key: RoomKey, limit: Duration) {
    let mut guard = FlusherGuard {
        queues: &queues,
        key: &key,
        finished: false,
    };
    loop {
        let batch: Vec<PendingAppend> = {
            let mut rooms = queues.lock();
            match rooms.get_mut(&key) {
                Some(queue) if !queue.is_empty() => {
                    let take = queue.len().min(MAX_APPEND_BATCH);
                    queue.drain(..take).collect()
                }
                _ => {
                    rooms.remove(&key);
                    guard.finished = true;
                    return;
                }
            }
        };
        let outcome = tokio::time::timeout(limit, call_append(&pool, &key, &batch))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unavailable(format!(
                    "no answer from PostgreSQL within {limit:?}"
                )))
            });
        let results = match outcome {
            Ok(results) => results,
            Err(err) => batch.iter().map(|_| Err(copy_error(&err))).collect(),
        };
        for (pending, result) in batch.into_iter().zip(results) {
            // The caller may have gone away; the add is committed all the same.
            let _ = pending.reply.send(result);
        }
    }
}

/// One `croupier_append` call for a group of adds; one outcome per add, in order.
async fn call_append(
    pool: &PgPool,
    key: &RoomKey,
    batch: &[PendingAppend],
) -> Result<Vec<Result<Option<Applied>, StoreError>>, StoreError> {
    let now = now();
    let numbers: Vec<String> = batch
        .iter()
        .map(|p| p.number.to_json().to_string())
        .collect();
    let ids: Vec<Option<&str>> = batch
        .iter()
        .map(|p| p.mutation_id.as_ref().map(MutationId::as_str))
        .collect();
    let limits: Vec<i64> = batch
        .iter()
        .map(|p| i64::try_from(p.max_history).unwrap_or(i64::MAX))
        .collect();
    let row = sqlx::query("SELECT * FROM croupier_append($1, $2::jsonb, $3, $4, $5, $6)")
        .bind(key.as_str())
        .bind(format!("[{}]", numbers.join(",")))
        .bind(ids)
        .bind(limits)
        .bind(now)
        .bind(now - MUTATION_ID_WINDOW)
        .fetch_one(pool)
        .await?;
    if !row.try_get::<bool, _>("room_found")? {
        return Ok(batch.iter().map(|_| Ok(None)).collect());
    }

    let history: String = row.try_get("room_history")?;
    let history = stored_history(&history)?;
    let version_before: i64 = row.try_get("version_before")?;
    let updated_before: DateTime<Utc> = row.try_get("updated_at_before")?;
    let outcomes: Vec<String> = row.try_get("outcomes")?;
    let room_versions: Vec<i64> = row.try_get("room_versions")?;
    let event_versions: Vec<Option<i64>> = row.try_get("event_versions")?;
    let event_kinds: Vec<Option<String>> = row.try_get("event_kinds")?;
    let event_payloads: Vec<Option<String>> = row.try_get("event_payloads")?;
    let event_times: Vec<Option<DateTime<Utc>>> = row.try_get("event_times")?;
    let corrupt = || StoreError::Internal("croupier_append returned an inconsistent result".into());
    let lengths = [
        room_versions.len(),
        event_versions.len(),
        event_kinds.len(),
        event_payloads.len(),
        event_times.len(),
    ];
    if outcomes.len() != batch.len() || lengths.iter().any(|&n| n != batch.len()) {
        return Err(corrupt());
    }
    // Only adds happen inside one call, so the room after item i is the final
    // history cut to the length it had then.
    let added = room_versions.last().map_or(0, |v| v - version_before);
    let length_before = usize::try_from(added)
        .ok()
        .and_then(|added| history.len().checked_sub(added))
        .ok_or_else(corrupt)?;
    let template = Room {
        id: row.try_get("room_id")?,
        key: key.clone(),
        history: History::default(),
        version: 0,
        epoch: row.try_get::<String, _>("room_epoch")?.into(),
        created_at: row.try_get("room_created_at")?,
        updated_at: updated_before,
        protected: row.try_get("room_protected")?,
    };

    // The room as it was once item i had been handled.
    let room_after = |i: usize| -> Result<Room, StoreError> {
        let version = room_versions[i];
        let grown = usize::try_from(version - version_before).map_err(|_| corrupt())?;
        let numbers = history
            .numbers()
            .get(..length_before + grown)
            .ok_or_else(corrupt)?;
        Ok(Room {
            history: History::from_numbers(numbers.to_vec()),
            version: version as Version,
            updated_at: if grown > 0 { now } else { updated_before },
            ..template.clone()
        })
    };

    let mut results = Vec::with_capacity(batch.len());
    for (i, pending) in batch.iter().enumerate() {
        let result = match outcomes[i].as_str() {
            "applied" => room_after(i).map(|room| {
                Some(Applied {
                    event: RoomEvent {
                        key: key.clone(),
                        epoch: room.epoch.clone(),
                        version: room.version,
                        change: Change::Added(pending.number),
                        mutation_id: pending.mutation_id.clone(),
                        committed_at: now,
                    },
                    room,
                    duplicate: false,
                })
            }),
            "duplicate" => match (
                &event_versions[i],
                &event_kinds[i],
                &event_payloads[i],
                event_times[i],
            ) {
                (Some(version), Some(kind), Some(payload), Some(committed_at)) => {
                    let change = decode_change(kind, payload);
                    change.and_then(|change| {
                        let room = room_after(i)?;
                        Ok(Some(Applied {
                            event: RoomEvent {
                                key: key.clone(),
                                epoch: room.epoch.clone(),
                                version: *version as Version,
                                change,
                                mutation_id: pending.mutation_id.clone(),
                                committed_at,
                            },
                            room,
                            duplicate: true,
                        }))
                    })
                }
                _ => Err(corrupt()),
            },
            "too_long" => Err(StoreError::HistoryTooLong {
                max: pending.max_history,
            }),
            _ => Err(corrupt()),
        };
        results.push(result);
    }
    Ok(results)
}

/// The same failure for every add of a group whose call failed.
fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(msg) => StoreError::Unavailable(msg.clone()),
        other => StoreError::Internal(other.to_string()),
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
        mutation_id: mutation_id.map(MutationId::new),
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
        // Adds to an existing room take the grouped single-call path; everything
        // else, and the add that creates a room, the general transaction.
        if let Change::Added(number) = mutation.change
            && let Some(applied) = self.append(&mutation, number).await?
        {
            return Ok(applied);
        }
        self.apply_in_transaction(mutation, now()).await
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
