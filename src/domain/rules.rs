//! The room rules: what one mutation does to a room, decided without any I/O.
//!
//! Both stores call [`decide`] for every mutation, in order, under the room's
//! lock: they load the room's head and the mutation id's earlier event (if
//! any), ask for the decision, and persist what it says. Keeping the decision
//! here means the backends cannot drift apart on limits, de-duplication,
//! index checks or timestamps; they differ only in how they load, lock and
//! store.

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};

use super::{Change, MutationId, RoomEvent, RoomKey, Version};

/// What the rules need to know about a room: no history, only its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RoomHead {
    pub version: Version,
    /// How many numbers the history holds.
    pub length: usize,
    pub protected: bool,
}

impl RoomHead {
    /// The head after `event` (which [`decide`] produced for this head).
    pub fn after(self, change: &Change) -> RoomHead {
        let length = match change {
            Change::Added(_) => self.length + 1,
            Change::Removed(_) => self.length.saturating_sub(1),
            Change::Replaced(history) => history.len(),
        };
        RoomHead {
            version: self.version.next(),
            length,
            protected: self.protected,
        }
    }
}

/// One mutation as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Proposal<'a> {
    pub change: &'a Change,
    pub mutation_id: Option<&'a MutationId>,
    /// Configured `MAX_HISTORY`: no change may grow a history past it.
    pub max_history: usize,
    /// The writer holds a valid token for the room.
    pub authorized: bool,
}

/// Why a mutation was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this room is protected; a token is required")]
    AuthRequired,
    #[error("index {index} is out of range for a history of {len} numbers")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("history may hold at most {max} numbers")]
    HistoryTooLong { max: usize },
}

/// What a mutation comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Apply it: this is its event, with the room's next version.
    Applied(RoomEvent),
    /// Its id was applied before (within the de-duplication window): that
    /// first event stands, nothing changes.
    Duplicate(RoomEvent),
    Refused(Refusal),
}

/// Where events of one batch come from: the room's key and epoch, and the
/// commit time every event of the batch carries.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub key: RoomKey,
    pub epoch: Arc<str>,
    /// Already cut to microseconds (see [`commit_time`]).
    pub committed_at: DateTime<Utc>,
}

/// A commit time as both stores keep it: PostgreSQL stores microseconds, so
/// the time is cut there before anyone sees it, and what a write returns
/// equals what a later read returns in either store.
pub fn commit_time(now: DateTime<Utc>) -> DateTime<Utc> {
    now.trunc_subsecs(6)
}

/// Decides one mutation against the room's `head`.
///
/// `earlier` is the first event the mutation's id produced within the
/// de-duplication window, if it has one (the store looks it up, including
/// events of its own batch that are not committed yet).
///
/// The checks run in a fixed order: protection first (a retry without a token
/// on a room protected meanwhile is refused, not answered with the old event),
/// then the id, then index and length. A refused mutation leaves no trace, so
/// its id may be used again.
pub fn decide(
    head: &RoomHead,
    proposal: &Proposal<'_>,
    earlier: Option<&RoomEvent>,
    stamp: &Stamp,
) -> Decision {
    if head.protected && !proposal.authorized {
        return Decision::Refused(Refusal::AuthRequired);
    }
    if let Some(event) = earlier {
        return Decision::Duplicate(event.clone());
    }
    let max = proposal.max_history;
    let refusal = match proposal.change {
        Change::Added(_) if head.length >= max => Some(Refusal::HistoryTooLong { max }),
        Change::Removed(index) if *index >= head.length => Some(Refusal::IndexOutOfRange {
            index: *index,
            len: head.length,
        }),
        Change::Replaced(history) if history.len() > max => Some(Refusal::HistoryTooLong { max }),
        _ => None,
    };
    if let Some(refusal) = refusal {
        return Decision::Refused(refusal);
    }
    Decision::Applied(RoomEvent {
        key: stamp.key.clone(),
        epoch: stamp.epoch.clone(),
        version: head.version.next(),
        change: proposal.change.clone(),
        mutation_id: proposal.mutation_id.cloned(),
        committed_at: stamp.committed_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{History, Number};

    fn stamp() -> Stamp {
        Stamp {
            key: RoomKey::parse("rules").unwrap(),
            epoch: "e1".into(),
            committed_at: commit_time(Utc::now()),
        }
    }

    fn head(version: u64, length: usize, protected: bool) -> RoomHead {
        RoomHead {
            version: Version::new(version),
            length,
            protected,
        }
    }

    fn proposal<'a>(change: &'a Change, id: Option<&'a MutationId>, max: usize) -> Proposal<'a> {
        Proposal {
            change,
            mutation_id: id,
            max_history: max,
            authorized: true,
        }
    }

    fn history(len: usize) -> History {
        History::from_numbers(vec![Number::Single(1); len])
    }

    #[test]
    fn an_applied_change_takes_the_next_version_and_the_batch_time() {
        let stamp = stamp();
        let id = MutationId::parse("m1").unwrap();
        let add = Change::Added(Number::DoubleZero);
        let Decision::Applied(event) = decide(
            &head(4, 2, false),
            &proposal(&add, Some(&id), 10),
            None,
            &stamp,
        ) else {
            panic!("applied");
        };
        assert_eq!(event.version, Version::new(5));
        assert_eq!(event.change, add);
        assert_eq!(event.mutation_id, Some(id));
        assert_eq!(event.committed_at, stamp.committed_at);
        assert_eq!((event.key, event.epoch), (stamp.key, stamp.epoch));
    }

    #[test]
    fn length_limits_hold_at_their_edges() {
        let s = stamp();
        let add = Change::Added(Number::Single(3));
        assert!(matches!(
            decide(&head(0, 9, false), &proposal(&add, None, 10), None, &s),
            Decision::Applied(_)
        ));
        assert_eq!(
            decide(&head(0, 10, false), &proposal(&add, None, 10), None, &s),
            Decision::Refused(Refusal::HistoryTooLong { max: 10 })
        );
        assert_eq!(
            decide(&head(0, 0, false), &proposal(&add, None, 0), None, &s),
            Decision::Refused(Refusal::HistoryTooLong { max: 0 })
        );
        let exact = Change::Replaced(history(10));
        let over = Change::Replaced(history(11));
        assert!(matches!(
            decide(&head(3, 50, false), &proposal(&exact, None, 10), None, &s),
            Decision::Applied(_)
        ));
        assert_eq!(
            decide(&head(3, 0, false), &proposal(&over, None, 10), None, &s),
            Decision::Refused(Refusal::HistoryTooLong { max: 10 })
        );
        // Emptying is always allowed, even with a limit of 0.
        let empty = Change::Replaced(History::default());
        assert!(matches!(
            decide(&head(3, 5, false), &proposal(&empty, None, 0), None, &s),
            Decision::Applied(_)
        ));
    }

    #[test]
    fn indexes_must_point_into_the_history() {
        let s = stamp();
        let last = Change::Removed(4);
        let past = Change::Removed(5);
        assert!(matches!(
            decide(&head(1, 5, false), &proposal(&last, None, 10), None, &s),
            Decision::Applied(_)
        ));
        assert_eq!(
            decide(&head(1, 5, false), &proposal(&past, None, 10), None, &s),
            Decision::Refused(Refusal::IndexOutOfRange { index: 5, len: 5 })
        );
        assert_eq!(
            decide(
                &RoomHead::default(),
                &proposal(&Change::Removed(0), None, 10),
                None,
                &s
            ),
            Decision::Refused(Refusal::IndexOutOfRange { index: 0, len: 0 })
        );
    }

    #[test]
    fn a_known_id_returns_its_first_event_and_wins_over_the_limits() {
        let s = stamp();
        let id = MutationId::parse("again").unwrap();
        let first = RoomEvent {
            key: s.key.clone(),
            epoch: s.epoch.clone(),
            version: Version::new(2),
            change: Change::Added(Number::Single(7)),
            mutation_id: Some(id.clone()),
            committed_at: s.committed_at - chrono::Duration::seconds(5),
        };
        // Full room, wrong index: still the earlier event.
        for change in [Change::Added(Number::Single(8)), Change::Removed(99)] {
            assert_eq!(
                decide(
                    &head(9, 10, false),
                    &proposal(&change, Some(&id), 10),
                    Some(&first),
                    &s
                ),
                Decision::Duplicate(first.clone())
            );
        }
    }

    #[test]
    fn protection_comes_before_everything_else() {
        let s = stamp();
        let id = MutationId::parse("x").unwrap();
        let add = Change::Added(Number::Single(1));
        let earlier = RoomEvent {
            key: s.key.clone(),
            epoch: s.epoch.clone(),
            version: Version::new(1),
            change: add.clone(),
            mutation_id: Some(id.clone()),
            committed_at: s.committed_at,
        };
        let unauthorized = Proposal {
            authorized: false,
            ..proposal(&add, Some(&id), 10)
        };
        assert_eq!(
            decide(&head(1, 1, true), &unauthorized, Some(&earlier), &s),
            Decision::Refused(Refusal::AuthRequired)
        );
        assert!(matches!(
            decide(&head(1, 1, false), &unauthorized, None, &s),
            Decision::Applied(_)
        ));
        assert!(matches!(
            decide(&head(1, 1, true), &proposal(&add, None, 10), None, &s),
            Decision::Applied(_)
        ));
    }

    #[test]
    fn heads_follow_their_changes() {
        let h = head(3, 2, true);
        assert_eq!(h.after(&Change::Added(Number::Single(0))), head(4, 3, true));
        assert_eq!(h.after(&Change::Removed(0)), head(4, 1, true));
        assert_eq!(h.after(&Change::Replaced(history(7))), head(4, 7, true));
    }

    #[test]
    fn commit_times_are_microseconds() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            commit_time(t).to_rfc3339(),
            "2026-01-02T03:04:05.123456+00:00"
        );
    }
}
