//! The grouped-append path: adds to an existing room are queued per room and
//! sent together in `croupier_append` calls, one call at a time per room.
//!
//! Concurrent adds to one room are serialised by the room's row lock
//! anyway, and each would pay for its own lock hand-over and commit flush. So an
//! instance sends them one call at a time per room: while a call runs, newly
//! arriving adds wait in the room's queue, and the next call carries all of them
//! (in arrival order). Under load that turns one commit per add into one commit
//! per group, without changing any outcome: the function applies the group item by
//! item exactly as separate calls would, and every caller is answered only after
//! the commit that contains its add.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use super::{PostgresStore, now};
use crate::domain::{Change, History, MutationId, Number, Room, RoomEvent, RoomKey, Version};
use crate::store::{
    Applied, MUTATION_ID_WINDOW, Mutation, StoreError, decode_change, stored_history,
};

/// Most adds one `croupier_append` call carries.
const MAX_APPEND_BATCH: usize = 256;

impl PostgresStore {
    /// Queues an add for its room's next `croupier_append` call and waits for the
    /// outcome; `None` if the room does not exist yet.
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
}

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
pub(super) struct AppendQueues {
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
