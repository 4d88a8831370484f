//! Read views: the current state of a room this instance follows, readable
//! without a store round trip or a message to the room task.
//!
//! The room task keeps its mirror current from ordered events and publishes a
//! [`Snapshot`] after every change. Every write made on this instance goes
//! through that task, which publishes the new snapshot before it answers the
//! writer, so a read that follows an acknowledged write here never sees an
//! older version. Writes on other instances arrive over the bus (a
//! sub-millisecond lag on an idle cluster), exactly as they reach members.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::{History, Number, Room, RoomKey, Version};

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
    /// The history as a JSON array with every prefix at hand, for the replies
    /// to the writers of a batch; rendered on first use.
    history_json: OnceLock<HistoryJson>,
}

impl Snapshot {
    pub fn new(version: Version, epoch: Arc<str>, protected: bool, history: History) -> Self {
        Snapshot {
            version,
            epoch,
            protected,
            history,
            body: OnceLock::new(),
            history_json: OnceLock::new(),
        }
    }

    /// The history rendered for writers' replies (see [`HistoryJson`]).
    pub fn history_json(&self) -> &HistoryJson {
        self.history_json
            .get_or_init(|| HistoryJson::of(&self.history))
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

/// A history rendered as a JSON array once, with where each number ends, so
/// that the array of any prefix (a writer's room right after its own add) is a
/// copy of a slice rather than a serialization of its own: the writers of one
/// batch share a single rendering whatever the history's length.
#[derive(Debug)]
pub struct HistoryJson {
    text: String,
    /// `ends[i]`: the length of the text up to and including the i-th number
    /// (`ends[0]` is just the opening bracket).
    ends: Vec<usize>,
}

impl HistoryJson {
    fn of(history: &History) -> Self {
        let numbers = history.numbers();
        let mut text = String::with_capacity(numbers.len() * 3 + 2);
        let mut ends = Vec::with_capacity(numbers.len() + 1);
        text.push('[');
        ends.push(text.len());
        for (i, number) in numbers.iter().enumerate() {
            if i > 0 {
                text.push(',');
            }
            match number {
                Number::Single(n) => text.push_str(&n.to_string()),
                Number::DoubleZero => text.push_str("\"00\""),
            }
            ends.push(text.len());
        }
        HistoryJson { text, ends }
    }

    /// Appends the JSON array of the first `len` numbers (all of them if
    /// there are fewer).
    pub fn write_prefix(&self, len: usize, out: &mut Vec<u8>) {
        let end = self.ends[len.min(self.ends.len() - 1)];
        out.extend_from_slice(&self.text.as_bytes()[..end]);
        out.push(b']');
    }
}

/// The reply of `GET /api/roulette/{key}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RoomBody<'a> {
    pub key: &'a RoomKey,
    pub history: &'a History,
    #[schema(value_type = u64)]
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
    /// What reads are answered with; `None` while the task cannot vouch for
    /// the room's state (not loaded, or it lost track).
    current: RwLock<Option<Arc<Snapshot>>>,
    /// One more than the milliseconds after `origin` of the latest read, 0
    /// before the first: a room task without members keeps running while its
    /// room is being read, and one that only took writes retires soon.
    last_read: AtomicU64,
    origin: Instant,
}

impl View {
    pub(super) fn new() -> Self {
        View {
            current: RwLock::new(None),
            last_read: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    pub(super) fn read(&self) -> Option<Arc<Snapshot>> {
        self.touch();
        self.current()
    }

    /// The published snapshot, without counting as a read.
    pub(super) fn current(&self) -> Option<Arc<Snapshot>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn touch(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.last_read.store(now + 1, Ordering::Relaxed);
    }

    /// Time since the last read; `Duration::MAX` if the room was never read.
    pub(super) fn idle(&self) -> Duration {
        let last = self.last_read.load(Ordering::Relaxed);
        if last == 0 {
            return Duration::MAX;
        }
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        Duration::from_millis(now.saturating_sub(last))
    }

    /// Whether reads already see `version` (or later) of `epoch`.
    pub(super) fn shows(&self, epoch: &str, version: Version) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|s| &*s.epoch == epoch && s.version >= version)
    }

    /// The room task's update: the task is the only writer of the room on
    /// this instance, so its snapshot is always the newest this instance has.
    pub(super) fn publish(&self, snapshot: Arc<Snapshot>) {
        *self.lock() = Some(snapshot);
    }

    /// Withdraws the snapshot: the task no longer follows the room's state.
    pub(super) fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Option<Arc<Snapshot>>> {
        // Poisoning would mean a panic while swapping an `Option`, which leaves
        // the state consistent.
        self.current.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(epoch: &str, version: u64) -> Arc<Snapshot> {
        Arc::new(Snapshot::new(
            Version::new(version),
            epoch.into(),
            false,
            History::default(),
        ))
    }

    fn shown(view: &View) -> Option<(String, Version)> {
        view.read().map(|s| (s.epoch.to_string(), s.version))
    }

    #[test]
    fn the_task_publishes_and_withdraws() {
        let view = View::new();
        assert_eq!(shown(&view), None);
        view.publish(snap("e", 1));
        let (one, two) = (Version::new(1), Version::new(2));
        assert!(view.shows("e", one) && !view.shows("e", two) && !view.shows("f", one));
        view.publish(snap("new", 1));
        assert_eq!(shown(&view), Some(("new".into(), one)));
        view.clear();
        assert_eq!(shown(&view), None);
    }

    #[test]
    fn a_room_never_read_is_idle_from_the_start() {
        let view = View::new();
        assert_eq!(view.idle(), Duration::MAX);
        assert_eq!(view.current().map(|s| s.version), None);
        assert_eq!(view.idle(), Duration::MAX, "current() is not a read");
        view.read();
        assert!(view.idle() < Duration::from_secs(1));
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
