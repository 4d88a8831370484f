//! Both stores decide alike: the same random batches (adds, removals,
//! replacements, retried mutation ids, index and length-limit edges, protected
//! rooms with and without a token, callers that are behind) go to SQLite, to
//! PostgreSQL with the schema only expanded (the compatibility trigger in
//! place) and to PostgreSQL fully migrated, and every outcome, every missed
//! list, every head and the final histories and event logs must agree.
//!
//! The seed is fixed; `EQUIV_SEED=<n>` runs another sequence, and
//! `EQUIV_BATCHES=<n>` a longer one. A failure names the seed and the batch.

mod support;

use std::time::Duration;

use croupier::domain::{Change, History, MutationId, Number, RoomKey, Version};
use croupier::store::postgres::{PgOptions, PostgresStore};
use croupier::store::sqlite::SqliteStore;
use croupier::store::{Batch, Mutation, Outcome, Position, Store};
use support::postgres::TestPostgres;

const DEFAULT_SEED: u64 = 0x5eed_2026;
const DEFAULT_BATCHES: usize = 300;

/// xorshift64*: small, deterministic, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn number(&mut self) -> Number {
        match self.below(38) {
            37 => Number::DoubleZero,
            n => Number::Single(n as u8),
        }
    }

    fn history(&mut self, len: usize) -> History {
        History::from_numbers((0..len).map(|_| self.number()).collect())
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn options() -> PgOptions {
    PgOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(10),
        connect_attempts: 3,
    }
}

/// An outcome without what legitimately differs between stores (commit times).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Applied(Version, Change, Option<String>),
    Duplicate(Version, Change, Option<String>),
    Refused(String),
}

fn seen(outcome: &Outcome) -> Seen {
    match outcome {
        Outcome::Applied(e) => {
            assert_eq!(
                e.committed_at.timestamp_subsec_nanos() % 1000,
                0,
                "commit times are microseconds"
            );
            Seen::Applied(
                e.version,
                e.change.clone(),
                e.mutation_id.as_ref().map(|m| m.as_str().to_owned()),
            )
        }
        Outcome::Duplicate(e) => Seen::Duplicate(
            e.version,
            e.change.clone(),
            e.mutation_id.as_ref().map(|m| m.as_str().to_owned()),
        ),
        Outcome::Refused(err) => Seen::Refused(format!("{err:?}")),
    }
}

/// What a batch reply shows, comparable across stores.
type Reply = (
    Option<Vec<(Version, Change)>>,
    Vec<Seen>,
    Option<(Version, usize, bool)>,
);

fn reply(batch: &Batch) -> Reply {
    (
        batch.missed.as_ref().map(|events| {
            events
                .iter()
                .map(|e| (e.version, e.change.clone()))
                .collect()
        }),
        batch.outcomes.iter().map(seen).collect(),
        batch
            .head
            .as_ref()
            .map(|h| (h.version, h.history_length, h.protected)),
    )
}

/// One store under test, with what its caller knows of each room.
struct Subject {
    name: &'static str,
    store: Box<dyn Store>,
    known: Vec<Position>,
}

#[tokio::test]
async fn sqlite_and_postgres_decide_every_batch_alike() {
    let seed = env_number("EQUIV_SEED", DEFAULT_SEED).max(1);
    let batches = env_number("EQUIV_BATCHES", DEFAULT_BATCHES as u64) as usize;
    println!("EQUIV_SEED={seed} EQUIV_BATCHES={batches}");
    let mut rng = Rng(seed);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = SqliteStore::open(&dir.path().join("equivalence.db"))
        .await
        .unwrap();
    sqlite.migrate().await.unwrap();
    let pg = TestPostgres::start_new().await;
    let expanded = PostgresStore::connect(&pg.create_database("expanded").await, options())
        .await
        .unwrap();
    expanded.migrate().await.unwrap();
    let contracted = PostgresStore::connect(&pg.create_database("contracted").await, options())
        .await
        .unwrap();
    contracted.migrate_contract().await.unwrap();

    let keys: Vec<RoomKey> = ["open", "protected", "late", "стол"]
        .iter()
        .map(|k| RoomKey::parse(k).unwrap())
        .collect();
    let mut subjects = vec![
        Subject {
            name: "sqlite",
            store: Box::new(sqlite),
            known: vec![Position::default(); keys.len()],
        },
        Subject {
            name: "postgres (expanded)",
            store: Box::new(expanded),
            known: vec![Position::default(); keys.len()],
        },
        Subject {
            name: "postgres (contracted)",
            store: Box::new(contracted),
            known: vec![Position::default(); keys.len()],
        },
    ];
    // One protected room from the start.
    for subject in &mut subjects {
        let auth = subject
            .store
            .create_room(&keys[1], Some("$argon2id$not-checked-here".into()))
            .await
            .unwrap();
        assert!(auth.room.protected);
    }
    let ids = ["a", "b", "c", "d", "e", "f"];

    for round in 0..batches {
        let room = rng.below(keys.len() as u64) as usize;
        let key = &keys[room];
        // Mostly small limits, so histories run into them.
        let limit = [0, 1, 3, 6, 6, 8, 8, 8][rng.below(8) as usize];
        let size = 1 + rng.below(6) as usize;
        // Mostly up to date, as a room task is; sometimes behind.
        let lag = if rng.chance(30) { 1 + rng.below(3) } else { 0 };
        let forget = rng.chance(10);
        let (lie, lie_about_length) = (rng.chance(15), rng.chance(50));
        let mutations: Vec<Mutation> = (0..size)
            .map(|_| {
                let change = match rng.below(10) {
                    0..=5 => Change::Added(rng.number()),
                    6 | 7 => Change::Removed(rng.below(10) as usize),
                    _ => {
                        let len = rng.below(limit as u64 + 2) as usize;
                        Change::Replaced(rng.history(len))
                    }
                };
                let mutation_id = rng
                    .chance(40)
                    .then(|| MutationId::parse(ids[rng.below(ids.len() as u64) as usize]).unwrap());
                Mutation {
                    key: key.clone(),
                    change,
                    mutation_id,
                    max_history: limit,
                    authorized: rng.chance(60),
                }
            })
            .collect();

        let mut replies = Vec::new();
        for subject in &mut subjects {
            // A caller that is behind, or one that knows nothing.
            let known = if forget {
                Position::default()
            } else {
                let mut known = subject.known[room].clone();
                known.version = Version::new(known.version.get().saturating_sub(lag));
                // A shape that does not match the room must never be trusted.
                if let Some(shape) = known.shape.as_mut().filter(|_| lie) {
                    if lie_about_length {
                        shape.history_length += 1;
                    } else {
                        shape.protected = !shape.protected;
                    }
                }
                known
            };
            let batch = subject
                .store
                .apply_batch(key, &known, &mutations)
                .await
                .unwrap_or_else(|e| {
                    panic!("seed {seed} batch {round}: {} failed: {e}", subject.name)
                });
            assert_eq!(batch.outcomes.len(), mutations.len());
            if let Some(head) = &batch.head {
                // With the whole head, as a room task knows it: the backends
                // may then commit appends without reading the room first.
                subject.known[room] = head.position();
            }
            replies.push(reply(&batch));
        }
        for (subject, got) in subjects.iter().zip(&replies).skip(1) {
            assert_eq!(
                got, &replies[0],
                "seed {seed} batch {round} on {key}: {} differs from {}\n{mutations:?}",
                subject.name, subjects[0].name
            );
        }
    }

    for key in &keys {
        let mut rooms = Vec::new();
        for subject in &subjects {
            let room = subject.store.room(key).await.unwrap();
            let log = subject
                .store
                .events_since(key, Version::ZERO)
                .await
                .unwrap();
            rooms.push((
                room.map(|r| (r.history, r.version, r.protected)),
                log.map(|events| {
                    events
                        .into_iter()
                        .map(|e| (e.version, e.change, e.mutation_id))
                        .collect::<Vec<_>>()
                }),
            ));
        }
        for (subject, got) in subjects.iter().zip(&rooms).skip(1) {
            assert_eq!(
                got, &rooms[0],
                "seed {seed}: room {key} on {} differs from {}",
                subject.name, subjects[0].name
            );
        }
        if let (Some((history, version, _)), _) = &rooms[0] {
            println!("{key}: version {version}, {} numbers", history.len());
        }
    }
}
