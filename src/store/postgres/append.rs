//! The grouped-append path: adds are queued per room and sent together in
//! `croupier_append_known` calls, one call at a time per room.
//!
//! Concurrent adds to one room are serialised by the room's row lock
//! anyway, and each would pay for its own lock hand-over and commit flush. So an
//! instance sends them one call at a time per room: while a call runs, newly
//! arriving adds wait in the room's queue, and the next call carries all of them
//! (in arrival order). Under load that turns one commit per add into one commit
//! per group, without changing any outcome: the function applies the group item by
//! item exactly as separate calls would, and every caller is answered only after
//! the commit that contains its add.
//!
//! Every caller is answered with the room as its add left it, history included,
//! but the history does not travel with every call: the instance remembers the
//! room as its last call left it, tells the function which (id, epoch, version)
//! that was, and gets back only what it lacks (see the migration). Each caller's
//! history is then the remembered one, plus anything added meanwhile, plus the
//! group's applied adds up to its own. The task sending a room's calls also keeps
//! one pooled connection while the room has adds waiting, which spares the pool's
//! liveness check on every hand-out and return.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Row};
use tokio::sync::oneshot;

use super::{PostgresStore, now};
use crate::domain::{
    Change, History, MutationId, Number, Room, RoomEvent, RoomKey, Version, new_epoch,
};
use crate::store::{
    Applied, MUTATION_ID_WINDOW, Mutation, StoreError, decode_change, stored_history,
};

/// Most adds one `croupier_append_known` call carries.
const MAX_APPEND_BATCH: usize = 256;

/// How many rooms without waiting adds keep their last known state. Each costs
/// its history (two bytes a number); rooms beyond this are forgotten least
/// recently used first, and their next call simply brings the history back.
const KNOWN_IDLE_ROOMS: usize = 32;

impl PostgresStore {
    /// Queues an add for its room's next `croupier_append_known` call and waits
    /// for the outcome; `None` if the room does not exist and the call did not
    /// create it (no add of the group fits an empty room).
    pub(super) async fn append(
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
            let mut queues = self.appends.lock();
            queues.tick += 1;
            let tick = queues.tick;
            let room = queues.rooms.entry(mutation.key.clone()).or_default();
            room.queue.push(pending);
            room.used = tick;
            !std::mem::replace(&mut room.flushing, true)
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
}

/// An add waiting for its room's next `croupier_append_known` call.
struct PendingAppend {
    number: Number,
    mutation_id: Option<MutationId>,
    max_history: usize,
    reply: oneshot::Sender<Result<Option<Applied>, StoreError>>,
}

/// Per room: adds waiting, whether a task started by [`PostgresStore::append`]
/// is sending them, and the room as this instance's last call left it.
#[derive(Default)]
pub(super) struct AppendQueues {
    inner: Mutex<Queues>,
}

#[derive(Default)]
struct Queues {
    rooms: HashMap<RoomKey, RoomAppends>,
    /// Counts queued adds; orders rooms by last use for forgetting.
    tick: u64,
    /// Rooms seen to exist without a password. A room's protection is fixed
    /// when it is created, so an add without a token may take the grouped path
    /// (which does not check protection) only for these; any other goes
    /// through the general transaction, which checks it under the row lock.
    open: HashSet<RoomKey>,
}

/// Most rooms remembered as open; the set starts over beyond it (forgetting
/// only costs a general transaction for the next add without a token).
const KNOWN_OPEN_ROOMS: usize = 4096;

#[derive(Default)]
struct RoomAppends {
    queue: Vec<PendingAppend>,
    /// A task is sending this room's calls.
    flushing: bool,
    /// The room after this instance's last call, if it is remembered. Always a
    /// true past state of the room, so it stays usable when calls fail.
    known: Option<Room>,
    used: u64,
}

impl AppendQueues {
    /// Whether `key` is known to exist unprotected.
    pub(super) fn is_open(&self, key: &RoomKey) -> bool {
        self.lock().open.contains(key)
    }

    /// Remembers that `room` exists unprotected (or, if it is protected, nothing).
    pub(super) fn learn(&self, room: &Room) {
        if room.protected {
            return;
        }
        let mut queues = self.lock();
        if queues.open.len() >= KNOWN_OPEN_ROOMS && !queues.open.contains(&room.key) {
            queues.open.clear();
        }
        queues.open.insert(room.key.clone());
    }

    /// A std mutex: it is held only to push, take or put back, never across `.await`.
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Queues {
    /// Called when a room's task ends: the room stays only to remember its state,
    /// and only the most recently used idle rooms do.
    fn retire(&mut self, key: &RoomKey) {
        if self.rooms.get(key).is_some_and(|room| room.known.is_none()) {
            self.rooms.remove(key);
        }
        let idle = self.rooms.values().filter(|room| !room.flushing).count();
        if idle > KNOWN_IDLE_ROOMS {
            let oldest = self
                .rooms
                .iter()
                .filter(|(_, room)| !room.flushing)
                .min_by_key(|(_, room)| room.used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.rooms.remove(&oldest);
            }
        }
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
            self.queues.lock().rooms.remove(self.key);
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
    let mut conn: Option<PoolConnection<Postgres>> = None;
    loop {
        let (batch, known) = {
            let mut rooms = queues.lock();
            let Some(room) = rooms.rooms.get_mut(&key) else {
                guard.finished = true;
                return;
            };
            if room.queue.is_empty() {
                room.flushing = false;
                rooms.retire(&key);
                guard.finished = true;
                return;
            }
            let take = room.queue.len().min(MAX_APPEND_BATCH);
            let batch: Vec<PendingAppend> = room.queue.drain(..take).collect();
            (batch, room.known.take())
        };
        let call = async {
            let conn = match &mut conn {
                Some(conn) => conn,
                slot => slot.insert(pool.acquire().await?),
            };
            call_append(conn, &key, &batch, known.as_ref()).await
        };
        let outcome = tokio::time::timeout(limit, call).await;
        let (results, known) = match outcome {
            Ok(Ok((results, after))) => (results, after.or(known)),
            Ok(Err(err)) => {
                // Hand the connection back; the pool checks it before reuse. The
                // remembered room goes too: if the failure was an answer that did
                // not add up, the next call then starts from the whole history.
                conn = None;
                (batch.iter().map(|_| Err(copy_error(&err))).collect(), None)
            }
            Err(_) => {
                // Its state is unknown after an abandoned call: never reuse it.
                if let Some(mut stuck) = conn.take() {
                    stuck.close_on_drop();
                }
                let err =
                    StoreError::Unavailable(format!("no answer from PostgreSQL within {limit:?}"));
                (batch.iter().map(|_| Err(copy_error(&err))).collect(), known)
            }
        };
        if let Some(room) = queues.lock().rooms.get_mut(&key) {
            room.known = known;
        }
        for (pending, result) in batch.into_iter().zip(results) {
            // The caller may have gone away; the add is committed all the same.
            let _ = pending.reply.send(result);
        }
    }
}

/// What one call returns: an outcome per add, in order, and the room after the
/// call (`None` when the room does not exist and was not created).
type CallOutcome = (Vec<Result<Option<Applied>, StoreError>>, Option<Room>);

/// One `croupier_append_known` call for a group of adds.
async fn call_append(
    conn: &mut PgConnection,
    key: &RoomKey,
    batch: &[PendingAppend],
    known: Option<&Room>,
) -> Result<CallOutcome, StoreError> {
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
    let row = sqlx::query(
        "SELECT * FROM croupier_append_known($1, $2::jsonb, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(key.as_str())
    .bind(format!("[{}]", numbers.join(",")))
    .bind(ids)
    .bind(limits)
    .bind(now)
    .bind(now - MUTATION_ID_WINDOW)
    .bind(known.map(|room| room.id))
    .bind(known.map(|room| &*room.epoch))
    .bind(known.and_then(|room| i64::try_from(room.version).ok()))
    .bind(new_epoch())
    .fetch_one(conn)
    .await?;
    if !row.try_get::<bool, _>("room_found")? {
        return Ok((batch.iter().map(|_| Ok(None)).collect(), None));
    }

    let corrupt =
        || StoreError::Internal("croupier_append_known returned an inconsistent result".into());
    let version_before: i64 = row.try_get("version_before")?;
    let length_before: i64 = row.try_get("length_before")?;
    let updated_before: DateTime<Utc> = row.try_get("updated_at_before")?;
    let outcomes: Vec<String> = row.try_get("outcomes")?;
    let room_versions: Vec<i64> = row.try_get("room_versions")?;
    let event_versions: Vec<Option<i64>> = row.try_get("event_versions")?;
    let event_kinds: Vec<Option<String>> = row.try_get("event_kinds")?;
    let event_payloads: Vec<Option<String>> = row.try_get("event_payloads")?;
    let event_times: Vec<Option<DateTime<Utc>>> = row.try_get("event_times")?;
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

    // The history before the call: sent whole, or what this instance knew plus
    // the adds made since by others, or exactly what it knew.
    let mut numbers: Vec<Number> = match row.try_get::<Option<String>, _>("history_before")? {
        Some(history) => stored_history(&history)?.numbers().to_vec(),
        None => {
            let known = known.ok_or_else(corrupt)?;
            let mut numbers = Vec::with_capacity(known.history.len() + batch.len());
            numbers.extend_from_slice(known.history.numbers());
            if let Some(added) = row.try_get::<Option<String>, _>("added_since_known")? {
                numbers.extend_from_slice(stored_history(&added)?.numbers());
            }
            numbers
        }
    };
    if i64::try_from(numbers.len()).ok() != Some(length_before) {
        return Err(corrupt());
    }
    // Then the group's own adds; `ends[i]` is the history's length once item i
    // had been handled.
    let mut ends = Vec::with_capacity(batch.len());
    for (i, pending) in batch.iter().enumerate() {
        if outcomes[i] == "applied" {
            numbers.push(pending.number);
        }
        let grown = numbers.len() - usize::try_from(length_before).map_err(|_| corrupt())?;
        if room_versions[i] != version_before + grown as i64 {
            return Err(corrupt());
        }
        ends.push(numbers.len());
    }

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
    let room_after = |i: usize| Room {
        history: History::from_numbers(numbers[..ends[i]].to_vec()),
        version: room_versions[i] as Version,
        updated_at: if room_versions[i] > version_before {
            now
        } else {
            updated_before
        },
        ..template.clone()
    };

    let mut results = Vec::with_capacity(batch.len());
    for (i, pending) in batch.iter().enumerate() {
        let result = match outcomes[i].as_str() {
            "applied" => {
                let room = room_after(i);
                Ok(Some(Applied {
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
                }))
            }
            "duplicate" => match (
                &event_versions[i],
                &event_kinds[i],
                &event_payloads[i],
                event_times[i],
            ) {
                (Some(version), Some(kind), Some(payload), Some(committed_at)) => {
                    decode_change(kind, payload).map(|change| {
                        let room = room_after(i);
                        Some(Applied {
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
                        })
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
    let after = batch.len().checked_sub(1).map(room_after);
    Ok((results, after))
}

/// The same failure for every add of a group whose call failed.
fn copy_error(err: &StoreError) -> StoreError {
    match err {
        StoreError::Unavailable(msg) => StoreError::Unavailable(msg.clone()),
        other => StoreError::Internal(other.to_string()),
    }
}
