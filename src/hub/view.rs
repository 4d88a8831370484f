//! Read views: the current state of a room this instance follows, readable
//! without a store round trip or a message to the room task.
//!
//! The room task keeps its mirror current from ordered events and publishes a
//! [`Snapshot`] after every change; a writer on this instance also offers the
//! room it just committed, so a read that follows an acknowledged write here
//! never sees an older version. Writes on other instances arrive over the bus
//! (a sub-millisecond lag on an idle cluster), exactly as they reach members.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{History, Room, RoomKey, Version};

/// One version of a room as a reader sees it.
#[derive(Debug)]
pub struct Snapshot {
    pub version: Version,
    pub epoch: Arc<str>,
    /// Protection is fixed when a room is created, so it travels with the
    /// snapshot for the token check.
    pub protected: bool,
    pub history: History,
    /// `GET /api/roulette/{key}` reply body, rendered on first use.
    body: OnceLock<Bytes>,
}

impl Snapshot {
    pub fn new(version: Version, epoch: Arc<str>, protected: bool, history: History) -> Self {
        Snapshot {
            version,
            epoch,
            protected,
            history,
            body: OnceLock::new(),
        }
    }

    /// The JSON reply of a room read, serialized once per version.
    pub fn body(&self, key: &RoomKey) -> Bytes {
        self.body
            .get_or_init(|| {
                let reply = RoomBody {
                    key,
                    history: &self.history,
                    version: self.version,
                    epoch: Some(&self.epoch),
                };
                // Plain data into a Vec: serialization cannot fail.
                Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
            })
            .clone()
    }
}

/// The reply of `GET /api/roulette/{key}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomBody<'a> {
    pub key: &'a RoomKey,
    pub history: &'a History,
    pub version: Version,
    /// Absent for a room that was never created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<&'a str>,
}

impl From<Room> for Snapshot {
    fn from(room: Room) -> Self {
        Snapshot::new(room.version, room.epoch, room.protected, room.history)
    }
}

/// Shared between a room task (the writer of snapshots) and readers.
#[derive(Debug)]
pub(super) struct View {
    state: RwLock<State>,
    /// Milliseconds after `origin` of the latest read: a room task without
    /// members keeps running while its room is being read.
    last_read: AtomicU64,
    origin: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// What reads are answered with; `None` while the task cannot vouch for
    /// the room's state (not loaded, or it lost track).
    current: Option<Arc<Snapshot>>,
    /// The latest room a writer on this instance committed. The task may not
    /// have handled that event yet when it publishes, and a read after the
    /// writer's acknowledgement must not see an older version.
    offered: Option<Arc<Snapshot>>,
}

fn newer(candidate: &Snapshot, than: Option<&Arc<Snapshot>>) -> bool {
    than.is_some_and(|old| old.epoch == candidate.epoch && old.version < candidate.version)
}

impl View {
    pub(super) fn new() -> Self {
        View {
            state: RwLock::new(State::default()),
            last_read: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    pub(super) fn read(&self) -> Option<Arc<Snapshot>> {
        self.touch();
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    pub(super) fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_read.store(now, Ordering::Relaxed);
    }

    /// Time since the last read.
    pub(super) fn idle(&self) -> Duration {
        let last = self.last_read.load(Ordering::Relaxed);
        let now = self.origin.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(last))
    }

    /// Whether reads already see `version` (or later) of `epoch`.
    pub(super) fn shows(&self, epoch: &str, version: Version) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .as_ref()
            .is_some_and(|s| &*s.epoch == epoch && s.version >= version)
    }

    /// The room task's update. The task is the authority on the room, except
    /// that a writer's offer of a later version of the same epoch is newer.
    pub(super) fn publish(&self, snapshot: Arc<Snapshot>) {
        let mut state = self.lock();
        let offered = state.offered.clone();
        state.current = match offered {
            Some(offered) if newer(&offered, Some(&snapshot)) => Some(offered),
            _ => Some(snapshot),
        };
    }

    /// A writer's offer of the room it just committed on this instance.
    pub(super) fn offer(&self, snapshot: Arc<Snapshot>) {
        let mut state = self.lock();
        if newer(&snapshot, state.current.as_ref()) {
            state.current = Some(snapshot.clone());
        }
        let replaces = state
            .offered
            .as_ref()
            .is_none_or(|old| old.epoch != snapshot.epoch || old.version < snapshot.version);
        if replaces {
            state.offered = Some(snapshot);
        }
    }

    /// Withdraws the snapshot: the task no longer follows the room's state.
    pub(super) fn clear(&self) {
        self.lock().current = None;
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        // Poisoning would mean a panic while swapping an `Option`, which leaves
        // the state consistent.
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(epoch: &str, version: Version) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(
            version,
            epoch.into(),
            false,
            History::default(),
        ))
    }

    fn shown(view: &View) -> Option<(String, Version)> {
        view.read().map(|s| (s.epoch.to_string(), s.version))
    }

    #[test]
    fn a_writer_offer_overtakes_the_task_until_it_catches_up() {
        let view = View::new();
        view.publish(snap("e", 1));
        view.offer(snap("e", 3));
        assert_eq!(shown(&view), Some(("e".into(), 3)));
        // The task is still handling version 2: the read must not go back.
        view.publish(snap("e", 2));
        assert_eq!(shown(&view), Some(("e".into(), 3)));
        view.publish(snap("e", 4));
        assert_eq!(shown(&view), Some(("e".into(), 4)));
    }

    #[test]
    fn an_offer_never_fills_a_view_the_task_does_not_follow() {
        let view = View::new();
        view.offer(snap("e", 5));
        assert_eq!(shown(&view), None);
        view.publish(snap("e", 2));
        assert_eq!(
            shown(&view),
            Some(("e".into(), 5)),
            "a loaded mirror older than the offered write"
        );
        view.clear();
        view.offer(snap("e", 6));
        assert_eq!(shown(&view), None);
    }

    #[test]
    fn a_new_epoch_from_the_task_replaces_everything() {
        let view = View::new();
        view.publish(snap("old", 9));
        view.offer(snap("old", 10));
        view.publish(snap("new", 1));
        assert_eq!(shown(&view), Some(("new".into(), 1)));
    }

    #[test]
    fn the_body_is_rendered_once_per_snapshot() {
        let key = RoomKey::parse("t").expect("key");
        let snapshot = snap("e", 7);
        let first = snapshot.body(&key);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&first).expect("json"),
            serde_json::json!({"key": "t", "history": [], "version": 7, "epoch": "e"})
        );
        assert_eq!(first.as_ptr(), snapshot.body(&key).as_ptr());
    }
}
