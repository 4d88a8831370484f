//! The PostgreSQL store against a real server: migrations, the mutation rules
//! (checked against the SQLite backend step by step), mutation-id de-duplication,
//! concurrent writers on several pools, event-log retention, outages, and a
//! burst of writes through the Redis room cache.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use croupier::bus::redis::{RedisBusOptions, connect_client};
use croupier::domain::{Change, History, MutationId, Number, RoomKey, Version};
use croupier::store::cached::CachedStore;
use croupier::store::postgres::{PgOptions, PostgresStore};
use croupier::store::sqlite::SqliteStore;
use croupier::store::{
    Applied, DynStore, Mutation, Outcome as BatchOutcome, Page, Position, Store, StoreError,
};
use fred::prelude::*;
use sqlx::Row;
use support::postgres::TestPostgres;
use support::redis::TestRedis;

const MAX_HISTORY: usize = 10_000;

fn key(raw: &str) -> RoomKey {
    RoomKey::parse(raw).expect("valid key")
}

fn n(value: u8) -> Number {
    Number::Single(value)
}

fn history(numbers: &[u8]) -> History {
    History::from_numbers(numbers.iter().copied().map(Number::Single).collect())
}

fn mutation(room: &RoomKey, change: Change) -> Mutation {
    Mutation {
        key: room.clone(),
        change,
        mutation_id: None,
        max_history: MAX_HISTORY,
        authorized: true,
    }
}

fn with_id(mut m: Mutation, id: &str) -> Mutation {
    m.mutation_id = Some(MutationId::parse(id).unwrap());
    m
}

/// A migrated SQLite store in `dir`.
async fn migrated_sqlite(dir: &tempfile::TempDir) -> SqliteStore {
    let sqlite = SqliteStore::open(&dir.path().join("croupier.db"))
        .await
        .unwrap();
    sqlite.migrate().await.unwrap();
    sqlite
}

fn options() -> PgOptions {
    PgOptions {
        max_connections: 20,
        acquire_timeout: Duration::from_secs(2),
        statement_timeout: Duration::from_secs(5),
        connect_attempts: 3,
    }
}

/// What a caller can observe of one `apply`, comparable across backends.
type Outcome = Result<(bool, Version, Change, History, Version), String>;

fn outcome(result: Result<Applied, StoreError>) -> Outcome {
    match result {
        Ok(a) => Ok((
            a.duplicate,
            a.event.version,
            a.event.change,
            a.room.history,
            a.room.version,
        )),
        Err(e) => Err(format!("{e:?}")),
    }
}

async fn migrated_store(pg: &TestPostgres) -> PostgresStore {
    let store = PostgresStore::connect(&pg.url(), options())
        .await
        .expect("connecting");
    store.migrate().await.expect("migrating");
    store
}

/// A store on a database migrated completely, contract steps included (as
/// once no instance of the previous release runs).
async fn contracted_store(pg: &TestPostgres) -> PostgresStore {
    let store = migrated_store(pg).await;
    store.migrate_contract().await.expect("contracting");
    store
}

async fn numbers_of(store: &dyn Store, room: &RoomKey) -> Vec<Number> {
    let room = store
        .room(room)
        .await
        .expect("reading")
        .expect("room exists");
    room.history.numbers().to_vec()
}

#[tokio::test]
async fn migrations_apply_roll_back_and_apply_again() {
    let pg = TestPostgres::start_new().await;
    let store = PostgresStore::connect(&pg.url(), options())
        .await
        .expect("connecting");
    assert_eq!(store.backend(), "postgres");

    let before = store
        .migration_status()
        .await
        .expect("status on an empty database");
    assert!(!before.is_empty());
    assert!(before.iter().all(|m| !m.applied), "{before:?}");

    // `migrate` applies the expand steps only; the contract steps wait for
    // `migrate_contract` and do not stop an instance from serving.
    store.migrate().await.expect("migrating");
    let expanded = store.migration_status().await.expect("status");
    assert!(
        expanded
            .iter()
            .all(|m| m.applied != m.description.starts_with("contract")),
        "{expanded:?}"
    );
    croupier::store::ensure_current_schema(&store)
        .await
        .expect("an expanded schema is current");
    store.migrate().await.expect("migrating twice is a no-op");

    let table_exists = |name: &'static str| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                .bind(name)
                .fetch_one(&pool)
                .await
                .expect("querying the catalog")
        }
    };
    assert!(table_exists("rooms").await && table_exists("room_events").await);
    let compression: String = sqlx::query_scalar(
        "SELECT attcompression::text FROM pg_attribute
         WHERE attrelid = 'rooms'::regclass AND attname = 'history'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        compression, "l",
        "histories are lz4-compressed on a server that has lz4"
    );

    store.migrate_contract().await.expect("contracting");
    let after = store.migration_status().await.expect("status");
    assert!(after.iter().all(|m| m.applied), "{after:?}");
    store
        .migrate()
        .await
        .expect("expanding after contract is a no-op");
    let history_column: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute
                        WHERE attrelid = 'rooms'::regclass AND attname = 'history' AND NOT attisdropped)",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(!history_column, "the contract step drops rooms.history");

    assert!(store.rollback(0).await.is_err());
    assert!(store.rollback(after.len() + 1).await.is_err());
    store.rollback(1).await.expect("rolling back");
    let rolled_back = store.migration_status().await.expect("status");
    assert!(!rolled_back.last().expect("one migration").applied);
    if after.len() == 1 {
        assert!(!table_exists("rooms").await && !table_exists("room_events").await);
    }

    store.migrate_contract().await.expect("migrating again");
    assert!(
        store
            .migration_status()
            .await
            .expect("status")
            .iter()
            .all(|m| m.applied)
    );
    let room = key("after-rollback");
    let applied = store
        .apply(mutation(&room, Change::Added(n(7))))
        .await
        .expect("applying");
    assert_eq!(applied.event.version.get(), 1);
}

#[tokio::test]
async fn mutations_follow_the_rules_and_errors_change_nothing() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("Рулетка 1");

    // Removing from a missing room fails and does not create it.
    let err = store
        .apply(mutation(&room, Change::Removed(0)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::IndexOutOfRange { index: 0, len: 0 }),
        "{err:?}"
    );
    assert!(store.room(&room).await.unwrap().is_none());
    assert_eq!(
        store.events_since(&room, Version::ZERO).await.unwrap(),
        Some(Vec::new())
    );
    assert_eq!(
        store.events_since(&room, Version::new(1)).await.unwrap(),
        None
    );

    // An add that cannot fit does not create the room either.
    let too_small = Mutation {
        max_history: 0,
        authorized: true,
        ..mutation(&room, Change::Added(n(1)))
    };
    let err = store.apply(too_small).await.unwrap_err();
    assert!(
        matches!(err, StoreError::HistoryTooLong { max: 0 }),
        "{err:?}"
    );
    assert!(store.room(&room).await.unwrap().is_none());

    // The first add creates the room at version 1.
    let first = store
        .apply(mutation(&room, Change::Added(Number::DoubleZero)))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert_eq!(
        (first.event.version.get(), first.room.version.get()),
        (1, 1)
    );
    assert_eq!(first.room.history.numbers(), &[Number::DoubleZero]);
    assert_eq!(first.event.change, Change::Added(Number::DoubleZero));
    assert!(!first.room.protected);
    let stored = store.room(&room).await.unwrap().expect("created");
    assert_eq!(stored, first.room, "apply returns the room as stored");

    for value in [17, 0, 36] {
        store
            .apply(mutation(&room, Change::Added(n(value))))
            .await
            .unwrap();
    }
    let full = Mutation {
        max_history: 4,
        authorized: true,
        ..mutation(&room, Change::Added(n(5)))
    };
    let err = store.apply(full).await.unwrap_err();
    assert!(
        matches!(err, StoreError::HistoryTooLong { max: 4 }),
        "{err:?}"
    );

    let err = store
        .apply(mutation(&room, Change::Removed(4)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::IndexOutOfRange { index: 4, len: 4 }),
        "{err:?}"
    );

    let too_long = Mutation {
        max_history: 3,
        authorized: true,
        ..mutation(&room, Change::Replaced(history(&[1, 2, 3, 4])))
    };
    let err = store.apply(too_long).await.unwrap_err();
    assert!(
        matches!(err, StoreError::HistoryTooLong { max: 3 }),
        "{err:?}"
    );

    let unchanged = store.room(&room).await.unwrap().unwrap();
    assert_eq!(
        unchanged.version.get(),
        4,
        "rejected mutations take no version"
    );
    assert_eq!(
        unchanged.history.numbers(),
        &[Number::DoubleZero, n(17), n(0), n(36)]
    );
    assert_eq!(unchanged.epoch, first.room.epoch);

    let removed = store
        .apply(mutation(&room, Change::Removed(1)))
        .await
        .unwrap();
    assert_eq!(removed.event.version.get(), 5);
    assert_eq!(
        removed.room.history.numbers(),
        &[Number::DoubleZero, n(0), n(36)]
    );

    let replaced = store
        .apply(mutation(&room, Change::Replaced(history(&[3, 2, 1]))))
        .await
        .unwrap();
    assert_eq!(replaced.event.version.get(), 6);
    assert_eq!(replaced.room.history, history(&[3, 2, 1]));
    let emptied = store
        .apply(mutation(&room, Change::Replaced(History::default())))
        .await
        .unwrap();
    assert!(emptied.room.history.is_empty());
    assert_eq!(store.room(&room).await.unwrap().unwrap(), emptied.room);

    // A replace creates a missing room.
    let other = key("replace-creates");
    let created = store
        .apply(mutation(&other, Change::Replaced(history(&[9]))))
        .await
        .unwrap();
    assert_eq!(
        (created.event.version.get(), created.room.history.len()),
        (1, 1)
    );

    // The event log replays to the stored history.
    let events = store
        .events_since(&room, Version::ZERO)
        .await
        .unwrap()
        .expect("complete log");
    assert_eq!(
        events.iter().map(|e| e.version.get()).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    let mut replayed = History::default();
    for event in &events {
        replayed.apply(&event.change);
    }
    assert_eq!(replayed, store.room(&room).await.unwrap().unwrap().history);
    assert_eq!(
        events[0], first.event,
        "the log holds exactly what apply returned"
    );
}

/// Tiny deterministic generator, so a failing script can be replayed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

#[tokio::test]
async fn postgres_accepts_and_rejects_exactly_what_sqlite_does() {
    let pg = TestPostgres::start_new().await;
    let postgres = migrated_store(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated_sqlite(&dir).await;

    let keys = [key("a"), key("b b"), key("ключ")];
    let mut rng = XorShift(0x5eed_cafe_f00d);
    for step in 0..400 {
        let room = &keys[rng.below(keys.len() as u64) as usize];
        let number = |rng: &mut XorShift| match rng.below(38) {
            37 => Number::DoubleZero,
            v => n(v as u8),
        };
        let change = match rng.below(10) {
            0..=5 => Change::Added(number(&mut rng)),
            6..=7 => Change::Removed(rng.below(7) as usize),
            _ => {
                let len = rng.below(8);
                Change::Replaced(History::from_numbers(
                    (0..len).map(|_| number(&mut rng)).collect(),
                ))
            }
        };
        let mut m = Mutation {
            max_history: 6,
            authorized: true,
            ..mutation(room, change)
        };
        if rng.below(3) == 0 {
            m.mutation_id = Some(MutationId::parse(format!("id-{}", rng.below(12))).unwrap());
        }
        let from_sqlite = outcome(sqlite.apply(m.clone()).await);
        let from_postgres = outcome(postgres.apply(m.clone()).await);
        assert_eq!(from_postgres, from_sqlite, "step {step}: {m:?}");
    }
    for room in &keys {
        let a = sqlite
            .room(room)
            .await
            .unwrap()
            .map(|r| (r.history, r.version));
        let b = postgres
            .room(room)
            .await
            .unwrap()
            .map(|r| (r.history, r.version));
        assert_eq!(a, b);
        let log = |events: Option<Vec<croupier::domain::RoomEvent>>| {
            events.map(|es| {
                es.into_iter()
                    .map(|e| (e.version, e.change, e.mutation_id))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            log(postgres.events_since(room, Version::ZERO).await.unwrap()),
            log(sqlite.events_since(room, Version::ZERO).await.unwrap())
        );
    }
}

/// Two instances appending to the same rooms, with removals and replacements in
/// between: each answer must be what SQLite gives applying the same sequence, so
/// whatever an instance remembered of a room from its own last append (still
/// current, behind by the other's adds, or outdated by a removal or
/// replacement), it answers with the right history.
#[tokio::test]
async fn two_instances_appending_agree_with_sqlite() {
    let pg = TestPostgres::start_new().await;
    let instances = [migrated_store(&pg).await, migrated_store(&pg).await];
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated_sqlite(&dir).await;

    let keys = [key("a"), key("b")];
    let mut rng = XorShift(0x0dd_ba11_5eed);
    for step in 0..500 {
        let room = &keys[rng.below(keys.len() as u64) as usize];
        let change = match rng.below(12) {
            0..=8 => Change::Added(n(rng.below(37) as u8)),
            9 => Change::Removed(rng.below(4) as usize),
            _ => Change::Replaced(history(&[7, 8])),
        };
        let mut m = Mutation {
            max_history: 25,
            authorized: true,
            ..mutation(room, change)
        };
        if rng.below(4) == 0 {
            m.mutation_id = Some(MutationId::parse(format!("id-{}", rng.below(30))).unwrap());
        }
        let instance = &instances[rng.below(2) as usize];
        let from_sqlite = outcome(sqlite.apply(m.clone()).await);
        let from_postgres = outcome(instance.apply(m.clone()).await);
        assert_eq!(from_postgres, from_sqlite, "step {step}: {m:?}");
    }
    for room in &keys {
        let truth = instances[0].room(room).await.unwrap().expect("room exists");
        let expected = sqlite.room(room).await.unwrap().expect("room exists");
        assert_eq!(
            (truth.history, truth.version),
            (expected.history, expected.version)
        );
    }
}

/// One row of `croupier_append_known`: what it sent back besides the outcomes.
#[derive(Debug, PartialEq)]
struct AppendReply {
    /// `None` (like `outcomes`) when the room does not exist.
    version_before: Option<i64>,
    length_before: Option<i64>,
    history_before: Option<String>,
    added_since_known: Option<String>,
    outcomes: Option<Vec<String>>,
}

/// Calls the append function directly, inside a transaction that is rolled
/// back, as an instance remembering `known` = (id, epoch, version) would; it
/// may create a missing room with `new_epoch` if a limit above 0 allows.
async fn append_known(
    store: &PostgresStore,
    room: &str,
    known: Option<(i64, &str, i64)>,
    limit: i64,
    new_epoch: Option<&str>,
) -> AppendReply {
    let mut tx = store.pool().begin().await.unwrap();
    let row = sqlx::query(
        "SELECT version_before, length_before, history_before, added_since_known, outcomes
         FROM croupier_append_known($1, '[5, \"00\"]', '{NULL, NULL}', ARRAY[$2, $2],
                                    now(), now() - interval '10 minutes', $3, $4, $5, $6)",
    )
    .bind(room)
    .bind(limit)
    .bind(known.map(|k| k.0))
    .bind(known.map(|k| k.1))
    .bind(known.map(|k| k.2))
    .bind(new_epoch)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    AppendReply {
        version_before: row.get("version_before"),
        length_before: row.get("length_before"),
        history_before: row.get("history_before"),
        added_since_known: row.get("added_since_known"),
        outcomes: row.get("outcomes"),
    }
}

#[tokio::test]
async fn the_append_function_sends_only_what_the_caller_lacks() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("known");
    for value in [1, 2, 3] {
        store
            .apply(mutation(&room, Change::Added(n(value))))
            .await
            .unwrap();
    }
    let at3 = store.room(&room).await.unwrap().unwrap();
    let (id, epoch) = (at3.id, at3.epoch.to_string());
    let reply = |history: Option<&str>, added: Option<&str>| AppendReply {
        version_before: Some(3),
        length_before: Some(3),
        history_before: history.map(str::to_owned),
        added_since_known: added.map(str::to_owned),
        outcomes: Some(vec!["applied".into(), "applied".into()]),
    };

    // Knowing the current version: nothing to send.
    assert_eq!(
        append_known(&store, "known", Some((id, &epoch, 3)), 100, None).await,
        reply(None, None)
    );
    // Behind by adds only: just those numbers.
    assert_eq!(
        append_known(&store, "known", Some((id, &epoch, 1)), 100, None).await,
        reply(None, Some("[2, 3]"))
    );
    // Knowing nothing, another room id, another epoch, or a version the room
    // never reached: the whole history.
    for known in [
        None,
        Some((id + 1, epoch.as_str(), 3)),
        Some((id, "another-epoch", 3)),
        Some((id, epoch.as_str(), 4)),
    ] {
        assert_eq!(
            append_known(&store, "known", known, 100, None).await,
            reply(Some("[1, 2, 3]"), None),
            "{known:?}"
        );
    }
    // Behind a removal: the whole history.
    store
        .apply(mutation(&room, Change::Removed(0)))
        .await
        .unwrap();
    store
        .apply(mutation(&room, Change::Added(n(4))))
        .await
        .unwrap();
    let behind_removal = append_known(&store, "known", Some((id, &epoch, 3)), 100, None).await;
    assert_eq!(
        (
            behind_removal.version_before,
            behind_removal.history_before.as_deref(),
            behind_removal.added_since_known
        ),
        (Some(5), Some("[2, 3, 4]"), None)
    );
    // Behind adds whose events were pruned: the whole history.
    sqlx::query("DELETE FROM room_events WHERE version = 5")
        .execute(store.pool())
        .await
        .unwrap();
    let behind_pruned = append_known(&store, "known", Some((id, &epoch, 4)), 100, None).await;
    assert_eq!(
        (
            behind_pruned.history_before.as_deref(),
            behind_pruned.added_since_known
        ),
        (Some("[2, 3, 4]"), None)
    );
    // A missing room is created with the adds, unless nothing could be added to
    // it or no epoch was given; then the caller's general path decides.
    assert_eq!(
        append_known(&store, "nobody", None, 100, Some("fresh")).await,
        AppendReply {
            version_before: Some(0),
            length_before: Some(0),
            history_before: Some("[]".into()),
            added_since_known: None,
            outcomes: Some(vec!["applied".into(), "applied".into()]),
        }
    );
    for (limit, new_epoch) in [(0, Some("fresh")), (100, None)] {
        let reply = append_known(&store, "nobody", None, limit, new_epoch).await;
        assert_eq!((reply.version_before, reply.outcomes), (None, None));
    }
    assert!(store.room(&key("nobody")).await.unwrap().is_none());
}

/// The expand step keeps `rooms.history` in step: rolling it back leaves every
/// room and event in place and the previous releases' append functions working
/// on them, and migrating forward again copies the histories into rows and
/// continues the same rooms. The contract step rolls back to the same state
/// (after the newer one-call append function, which is undone first).
#[tokio::test]
async fn the_room_numbers_migrations_roll_back_and_forward_over_live_data() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("survivor");
    for value in [10, 20, 30] {
        store
            .apply(mutation(&room, Change::Added(n(value))))
            .await
            .unwrap();
    }
    store
        .apply(mutation(&room, Change::Removed(1)))
        .await
        .unwrap();
    let before = store.room(&room).await.unwrap().unwrap();
    let function_exists = |name: &'static str| {
        let pool = store.pool().clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = $1)",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(function_exists("croupier_history_sync").await);
    assert!(function_exists("croupier_append_at").await);

    // The newest step first (the one-call append), then the rows.
    store.rollback(2).await.expect("rolling back");
    let status = store.migration_status().await.unwrap();
    assert_eq!(
        status.iter().map(|m| m.applied).collect::<Vec<_>>(),
        [true, true, false, false, false]
    );
    assert!(!function_exists("croupier_history_sync").await);
    assert!(!function_exists("croupier_append_at").await);
    assert!(function_exists("croupier_append_known").await);
    let (stored, version): (String, i64) =
        sqlx::query_as("SELECT history::text, version FROM rooms WHERE key = $1")
            .bind(room.as_str())
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!((stored.as_str(), version), ("[10, 30]", 4));
    // The previous release's append still works on the same data.
    let history: String = sqlx::query_scalar(
        "SELECT room_history FROM croupier_append($1, '[36]', '{NULL}', '{100}',
                                                 now(), now() - interval '10 minutes')",
    )
    .bind(room.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(history, "[10, 30, 36]");

    store.migrate().await.expect("migrating forward again");
    let applied = store
        .apply(mutation(&room, Change::Added(Number::DoubleZero)))
        .await
        .unwrap();
    assert_eq!(applied.event.version.get(), 6);
    assert_eq!(
        applied.room.history.numbers(),
        &[n(10), n(30), n(36), Number::DoubleZero]
    );
    assert_eq!(store.room(&room).await.unwrap().unwrap(), applied.room);
    assert_eq!(
        store
            .events_since(&room, Version::ZERO)
            .await
            .unwrap()
            .map(|events| events.len()),
        Some(6)
    );

    // Contract, and back: the column returns with the rows' history.
    store.migrate_contract().await.expect("contracting");
    assert!(!function_exists("croupier_append_known").await);
    assert_eq!(store.room(&room).await.unwrap().unwrap(), applied.room);
    store
        .rollback(2)
        .await
        .expect("undoing the one-call append and the contract step");
    let stored: String = sqlx::query_scalar("SELECT history::text FROM rooms WHERE key = $1")
        .bind(room.as_str())
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, r#"[10, 30, 36, "00"]"#);
    assert!(function_exists("croupier_append_known").await);
    assert_eq!(store.room(&room).await.unwrap().unwrap(), applied.room);
    assert_ne!(before, applied.room);
}

/// A batch gives each mutation the outcome it would have had alone: the same
/// script as one PostgreSQL batch and as SQLite applying it one by one.
#[tokio::test]
async fn a_batch_matches_one_by_one_application() {
    let pg = TestPostgres::start_new().await;
    let postgres = Arc::new(migrated_store(&pg).await);
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated_sqlite(&dir).await;
    let room = key("grouped");

    let add = |value: u8, id: Option<&str>, max: usize| {
        let m = Mutation {
            max_history: max,
            authorized: true,
            ..mutation(&room, Change::Added(n(value)))
        };
        match id {
            Some(id) => with_id(m, id),
            None => m,
        }
    };
    let setup = [add(1, Some("old"), 10), add(2, None, 10)];
    let script = vec![
        add(3, None, 10),        // the call that waits for the lock
        add(4, Some("x"), 10),   // applied
        add(5, Some("x"), 10),   // duplicate of the item just before, same call
        add(6, Some("old"), 10), // duplicate of an earlier call
        add(7, None, 5),         // fits exactly: 4 numbers before it
        add(8, None, 5),         // too long now
        add(9, Some("y"), 5),    // too long as well, and so not remembered...
        add(10, Some("y"), 10),  // ...so this one applies
        add(11, Some("x"), 0),   // duplicate wins over the length rule
        add(12, None, 10),
    ];
    for m in setup {
        sqlite.apply(m.clone()).await.unwrap();
        postgres.apply(m).await.unwrap();
    }

    let batch = postgres
        .apply_batch(&room, &Position::default(), &script)
        .await
        .unwrap();
    assert_eq!(batch.outcomes.len(), script.len());
    for (got, m) in batch.outcomes.into_iter().zip(script) {
        let from_postgres = match got {
            BatchOutcome::Applied(e) => Ok((false, e.version, e.change)),
            BatchOutcome::Duplicate(e) => Ok((true, e.version, e.change)),
            BatchOutcome::Refused(err) => Err(format!("{err:?}")),
        };
        let from_sqlite = outcome(sqlite.apply(m.clone()).await)
            .map(|(duplicate, version, change, _, _)| (duplicate, version, change));
        assert_eq!(from_postgres, from_sqlite, "{m:?}");
    }
    let stored = postgres.room(&room).await.unwrap().unwrap();
    assert_eq!(
        stored.history.numbers(),
        &[n(1), n(2), n(3), n(4), n(7), n(10), n(12)]
    );
    assert_eq!(stored.version.get(), 7);
    assert_eq!(
        sqlite.room(&room).await.unwrap().unwrap().history,
        stored.history
    );

    // One transaction: every event of the batch has the same commit time.
    let events = postgres
        .events_since(&room, Version::new(2))
        .await
        .unwrap()
        .expect("complete");
    let times: Vec<_> = events.iter().map(|e| e.committed_at).collect();
    assert!(times.iter().all(|t| *t == times[0]), "{times:?}");
}

#[tokio::test]
async fn a_mutation_id_is_applied_once_within_the_window() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("retries");

    // First attempt creates the room; the retry must not apply again.
    let first = store
        .apply(with_id(mutation(&room, Change::Added(n(4))), "m-1"))
        .await
        .unwrap();
    let retry = store
        .apply(with_id(mutation(&room, Change::Added(n(4))), "m-1"))
        .await
        .unwrap();
    assert!(!first.duplicate && retry.duplicate);
    assert_eq!(retry.event, first.event);
    assert_eq!(retry.room, first.room);

    // A retry carrying a different change still reports the first attempt's event.
    let odd = store
        .apply(with_id(mutation(&room, Change::Removed(0)), "m-1"))
        .await
        .unwrap();
    assert!(odd.duplicate);
    assert_eq!(odd.event.change, Change::Added(n(4)));

    // Ids are per room, and other paths de-duplicate as well.
    let elsewhere = store
        .apply(with_id(mutation(&key("other"), Change::Added(n(4))), "m-1"))
        .await
        .unwrap();
    assert!(!elsewhere.duplicate);
    let replaced = store
        .apply(with_id(
            mutation(&room, Change::Replaced(history(&[1, 2]))),
            "m-2",
        ))
        .await
        .unwrap();
    let again = store
        .apply(with_id(
            mutation(&room, Change::Replaced(history(&[5]))),
            "m-2",
        ))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.event, replaced.event);
    assert_eq!(numbers_of(&store, &room).await, vec![n(1), n(2)]);

    // A duplicate is recognised before the length rule, like SQLite does.
    let tight = Mutation {
        max_history: 2,
        authorized: true,
        ..with_id(mutation(&room, Change::Added(n(9))), "m-1")
    };
    assert!(store.apply(tight).await.unwrap().duplicate);

    // Once the first attempt is older than the window, the id applies again.
    sqlx::query("UPDATE room_events SET created_at = created_at - interval '11 minutes' WHERE mutation_id = 'm-1'")
        .execute(store.pool())
        .await
        .unwrap();
    let late = store
        .apply(with_id(mutation(&room, Change::Added(n(4))), "m-1"))
        .await
        .unwrap();
    assert!(!late.duplicate);
    assert_eq!(late.event.version.get(), 3);
    assert_eq!(numbers_of(&store, &room).await, vec![n(1), n(2), n(4)]);
}

#[tokio::test]
async fn concurrent_retries_of_one_mutation_apply_once() {
    let pg = TestPostgres::start_new().await;
    let stores: Vec<Arc<PostgresStore>> = {
        let mut stores = Vec::new();
        for _ in 0..3 {
            stores.push(Arc::new(migrated_store(&pg).await));
        }
        stores
    };
    let room = key("contended-retries");
    for round in 0..5 {
        let before = stores[0]
            .room(&room)
            .await
            .unwrap()
            .map_or(0, |r| r.version.get());
        let mut tasks = Vec::new();
        for i in 0..30 {
            let store = stores[i % 3].clone();
            let m = if i % 3 == 0 {
                mutation(&room, Change::Added(n(1)))
            } else {
                with_id(
                    mutation(&room, Change::Added(n(2))),
                    &format!("retry-{round}"),
                )
            };
            tasks.push(tokio::spawn(async move { store.apply(m).await }));
        }
        let mut retried = Vec::new();
        for task in tasks {
            let applied = task.await.unwrap().expect("no errors under contention");
            if applied.event.mutation_id.is_some() {
                retried.push(applied);
            }
        }
        assert_eq!(
            retried.iter().filter(|a| !a.duplicate).count(),
            1,
            "round {round}"
        );
        let versions: HashSet<_> = retried.iter().map(|a| a.event.version).collect();
        assert_eq!(versions.len(), 1, "every retry reports the same event");
        let after = stores[0].room(&room).await.unwrap().unwrap().version.get();
        assert_eq!(
            after,
            before + 10 + 1,
            "10 plain adds and one de-duplicated add"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_three_pools_get_every_version_once() {
    const WRITERS: usize = 50;
    const ADDS: usize = 40;
    const BATCH: usize = 8;
    let pg = TestPostgres::start_new().await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        // Three pools, as three instances would have.
        stores.push(Arc::new(contracted_store(&pg).await));
    }
    let room = key("busy table");

    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = stores[writer % stores.len()].clone();
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(ADDS);
            // As a room task sends what queued up meanwhile: several adds
            // per transaction.
            for first in (0..ADDS).step_by(BATCH) {
                let batch: Vec<Mutation> = (first..(first + BATCH).min(ADDS))
                    .map(|i| {
                        let number = n(((writer * ADDS + i) % 37) as u8);
                        mutation(&room, Change::Added(number))
                    })
                    .collect();
                let done = store
                    .apply_batch(&room, &Position::default(), &batch)
                    .await
                    .unwrap_or_else(|e| panic!("writer {writer} batch at {first}: {e}"));
                let mut last = Version::ZERO;
                for (outcome, m) in done.outcomes.iter().zip(&batch) {
                    let BatchOutcome::Applied(event) = outcome else {
                        panic!("writer {writer}: {outcome:?}");
                    };
                    assert_eq!(event.change, m.change);
                    last = event.version;
                    let Change::Added(number) = m.change else {
                        unreachable!()
                    };
                    mine.push((event.version, number, History::default()));
                }
                assert_eq!(done.head.map(|h| h.version), Some(last));
            }
            mine
        }));
    }
    let mut acknowledged = Vec::new();
    for task in tasks {
        let mine = task.await.expect("writer task");
        assert!(
            mine.windows(2).all(|w| w[0].0 < w[1].0),
            "a writer's adds keep their order"
        );
        acknowledged.extend(mine);
    }
    let elapsed = started.elapsed();
    let total = WRITERS * ADDS;
    println!(
        "{total} appends by {WRITERS} writers on 3 pools in {elapsed:.2?}: {:.0} appends/s",
        total as f64 / elapsed.as_secs_f64()
    );

    acknowledged.sort_by_key(|(version, _, _)| *version);
    let versions: Vec<u64> = acknowledged.iter().map(|(v, _, _)| v.get()).collect();
    assert_eq!(
        versions,
        (1..=total as u64).collect::<Vec<_>>(),
        "versions 1..N, no gap, no duplicate"
    );

    let stored = stores[1].room(&room).await.unwrap().expect("room exists");
    assert_eq!(stored.version.get(), total as u64);
    let expected: Vec<Number> = acknowledged.iter().map(|(_, number, _)| *number).collect();
    assert_eq!(
        stored.history.numbers(),
        expected.as_slice(),
        "position i holds version i+1's number"
    );
    let events = stores[2]
        .events_since(&room, Version::ZERO)
        .await
        .unwrap()
        .expect("log is complete");
    assert_eq!(events.len(), total);
    for (event, (version, number, _)) in events.iter().zip(&acknowledged) {
        assert_eq!(
            (event.version, &event.change),
            (*version, &Change::Added(*number))
        );
    }
    let tail = stores[0]
        .events_since(&room, Version::new(1234))
        .await
        .unwrap()
        .expect("tail is complete");
    assert_eq!(tail.len(), total - 1234);
    assert_eq!(tail.first().map(|e| e.version.get()), Some(1235));
    assert_eq!(
        stores[0]
            .events_since(&room, Version::new(total as u64))
            .await
            .unwrap(),
        Some(Vec::new())
    );
    assert_eq!(
        stores[0]
            .events_since(&room, Version::new(total as u64).next())
            .await
            .unwrap(),
        None
    );

    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM room_events")
        .fetch_one(stores[0].pool())
        .await
        .unwrap();
    assert_eq!(rows, total as i64, "rows stored == acknowledgements");
}

#[tokio::test]
async fn events_since_is_none_once_pruning_removed_needed_events() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("long-lived");
    let count = 1005_u64; // EVENT_RETENTION_COUNT + 5
    for i in 0..count {
        store
            .apply(mutation(&room, Change::Added(n((i % 37) as u8))))
            .await
            .unwrap();
    }
    assert_eq!(
        store.prune_events().await.unwrap(),
        0,
        "everything is young"
    );

    // Age versions 1..=3 (beyond the newest 1000, so prunable) and 6..=10 (old but
    // among the newest 1000, so kept). Versions 4 and 5 stay young, so they are kept.
    sqlx::query(
        "UPDATE room_events SET created_at = created_at - interval '1 hour'
         WHERE version <= 3 OR version BETWEEN 6 AND 10",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(store.prune_events().await.unwrap(), 3);
    assert_eq!(store.prune_events().await.unwrap(), 0);

    assert_eq!(
        store.events_since(&room, Version::ZERO).await.unwrap(),
        None
    );
    assert_eq!(
        store.events_since(&room, Version::new(2)).await.unwrap(),
        None
    );
    let from_three = store
        .events_since(&room, Version::new(3))
        .await
        .unwrap()
        .expect("4.. are all there");
    assert_eq!(from_three.len() as u64, count - 3);
    assert_eq!(from_three[0].version.get(), 4);
    assert_eq!(
        store
            .events_since(&room, Version::new(count))
            .await
            .unwrap(),
        Some(Vec::new())
    );
    assert_eq!(
        store
            .events_since(&room, Version::new(count).next())
            .await
            .unwrap(),
        None
    );

    // A backlog larger than one pruning statement handles is removed completely.
    let bulk = key("bulk");
    store
        .apply(mutation(&bulk, Change::Added(n(1))))
        .await
        .unwrap();
    sqlx::query(
        "WITH room AS (UPDATE rooms SET version = 25000 WHERE key = 'bulk' RETURNING id)
         INSERT INTO room_events (room_id, version, kind, payload, created_at)
         SELECT room.id, v, 'add', '1', now() - interval '1 hour'
         FROM room, generate_series(2, 25000) AS v",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(
        store.prune_events().await.unwrap(),
        23_999,
        "2..=24000; 1 is young"
    );
    assert_eq!(
        store
            .events_since(&bulk, Version::new(24_000))
            .await
            .unwrap()
            .map(|e| e.len()),
        Some(1000)
    );
    assert_eq!(
        store
            .events_since(&bulk, Version::new(23_999))
            .await
            .unwrap(),
        None
    );

    // Pruning never touches another room's young log.
    let other = key("fresh");
    store
        .apply(mutation(&other, Change::Added(n(1))))
        .await
        .unwrap();
    assert_eq!(store.prune_events().await.unwrap(), 0);
    assert_eq!(
        store
            .events_since(&other, Version::ZERO)
            .await
            .unwrap()
            .map(|e| e.len()),
        Some(1)
    );
}

#[tokio::test]
async fn rooms_list_authenticate_and_count() {
    let pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;

    let locked = key("locked");
    let created = store
        .create_room(&locked, Some("$argon2id$fake".into()))
        .await
        .unwrap();
    assert!(created.room.protected);
    assert_eq!(created.room.version.get(), 0);
    let again = store.create_room(&locked, None).await.unwrap();
    assert_eq!(
        again.password_hash.as_deref(),
        Some("$argon2id$fake"),
        "an existing room keeps its password"
    );
    assert_eq!(again.room, created.room);
    let auth = store.room_auth(&locked).await.unwrap().expect("exists");
    assert_eq!(auth.password_hash.as_deref(), Some("$argon2id$fake"));
    assert!(store.room_auth(&key("nobody")).await.unwrap().is_none());

    for (name, numbers) in [
        ("one", &[1_u8][..]),
        ("two", &[1, 2]),
        ("three", &[1, 2, 3]),
    ] {
        store
            .apply(mutation(&key(name), Change::Replaced(history(numbers))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // An add to the protected room keeps it protected and makes it the most recent.
    let added = store
        .apply(mutation(&locked, Change::Added(n(8))))
        .await
        .unwrap();
    assert!(added.room.protected);

    let page = Page {
        limit: 10,
        offset: 0,
        include_history: false,
    };
    let (rooms, total) = store.list_rooms(page).await.unwrap();
    assert_eq!(total, 4);
    let names: Vec<&str> = rooms.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(names, ["locked", "three", "two", "one"]);
    assert!(rooms.iter().all(|r| r.history.is_none()));
    assert_eq!(
        rooms.iter().map(|r| r.history_length).collect::<Vec<_>>(),
        [1, 3, 2, 1]
    );
    assert_eq!(
        rooms.iter().map(|r| r.protected).collect::<Vec<_>>(),
        [true, false, false, false]
    );

    let (second_page, total) = store
        .list_rooms(Page {
            limit: 2,
            offset: 1,
            include_history: true,
        })
        .await
        .unwrap();
    assert_eq!(total, 4);
    assert_eq!(second_page.len(), 2);
    assert_eq!(second_page[0].key.as_str(), "three");
    assert_eq!(second_page[0].history, Some(history(&[1, 2, 3])));

    let stats = store.stats().await.unwrap();
    assert_eq!(stats.rooms, 4);
    assert!((stats.average_history_length - 7.0 / 4.0).abs() < 1e-9);
    assert!(store.ping().await.unwrap() < Duration::from_secs(1));
}

#[tokio::test]
async fn an_outage_is_unavailable_and_the_same_store_recovers() {
    let mut pg = TestPostgres::start_new().await;
    let opts = PgOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_secs(2),
        connect_attempts: 1,
    };
    let store = PostgresStore::connect(&pg.url(), opts).await.unwrap();
    store.migrate().await.unwrap();
    let room = key("outage");
    store
        .apply(mutation(&room, Change::Added(n(1))))
        .await
        .unwrap();

    pg.stop().await;
    for attempt in 0..2 {
        let started = Instant::now();
        let err = store
            .apply(mutation(&room, Change::Added(n(2))))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Unavailable(_)),
            "attempt {attempt}: {err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "failed fast: {:?}",
            started.elapsed()
        );
    }
    assert!(matches!(
        store.room(&room).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.apply(mutation(&room, Change::Removed(0))).await,
        Err(StoreError::Unavailable(_))
    ));

    pg.start().await;
    let applied = store
        .apply(mutation(&room, Change::Added(n(3))))
        .await
        .expect("the same pool works again after the restart");
    assert_eq!(
        applied.event.version.get(),
        2,
        "nothing was committed during the outage"
    );
    assert_eq!(numbers_of(&store, &room).await, vec![n(1), n(3)]);
}

#[tokio::test]
async fn acknowledged_appends_survive_a_crash() {
    let mut pg = TestPostgres::start_new().await;
    let store = migrated_store(&pg).await;
    let room = key("crash");
    for i in 0..200_u8 {
        store
            .apply(mutation(&room, Change::Added(n(i % 37))))
            .await
            .unwrap();
    }
    pg.stop_immediately().await;
    pg.start().await;
    let after = store.room(&room).await.unwrap().expect("room survived");
    assert_eq!(after.version.get(), 200);
    assert_eq!(after.history.len(), 200);
    assert_eq!(
        store
            .events_since(&room, Version::ZERO)
            .await
            .unwrap()
            .map(|e| e.len()),
        Some(200)
    );
}

#[tokio::test]
async fn connect_waits_for_a_starting_server_but_not_for_a_wrong_database() {
    let mut pg = TestPostgres::start_new().await;
    pg.stop().await;

    let url = pg.url();
    let connecting = tokio::spawn(async move {
        let opts = PgOptions {
            connect_attempts: 30,
            ..PgOptions::default()
        };
        PostgresStore::connect(&url, opts).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "connect keeps retrying while the server is down"
    );
    pg.start().await;
    let store = tokio::time::timeout(Duration::from_secs(20), connecting)
        .await
        .expect("connect returns once the server is up")
        .unwrap()
        .expect("connected");
    store.ping().await.expect("usable");

    // Nothing listening and few attempts: gives up quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let opts = PgOptions {
        connect_attempts: 3,
        ..PgOptions::default()
    };
    let err = PostgresStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/x"), opts)
        .await
        .err()
        .expect("nothing is listening");
    assert!(err.to_string().contains("3 attempt"), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A database that does not exist is not an outage: no retrying.
    let started = Instant::now();
    let opts = PgOptions {
        connect_attempts: 30,
        ..PgOptions::default()
    };
    let result = PostgresStore::connect(&pg.url_for("missing"), opts).await;
    assert!(result.is_err());
    assert!(started.elapsed() < Duration::from_secs(3), "failed at once");
}

/// A burst of adds to one room through the Redis cache, on two instances: each
/// writer returns only once the cache holds its state or a newer one (so an
/// acknowledged add is never missing from what other instances read), and the
/// cache ends at the newest state although most states were never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_the_cache_leaves_every_acknowledged_add_readable() {
    const WRITERS: usize = 30;
    const ADDS: usize = 10;
    let pg = TestPostgres::start_new().await;
    let redis = TestRedis::start_new().await;
    let client = || async {
        connect_client(&redis.url(), &RedisBusOptions::default())
            .await
            .expect("connecting to Redis")
    };
    let mut instances = Vec::new();
    for _ in 0..2 {
        let inner: DynStore = Arc::new(migrated_store(&pg).await);
        let cached = CachedStore::new(inner, client().await, Duration::from_secs(60), 10_000);
        instances.push(Arc::new(cached));
    }
    let raw = client().await;
    let room = key("cached burst");
    let cache_key = format!("croupier:cache:room:{room}");
    instances[0]
        .apply(mutation(&room, Change::Added(n(0))))
        .await
        .unwrap();

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = instances[writer % 2].clone();
        let (raw, room, cache_key) = (raw.clone(), room.clone(), cache_key.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..ADDS {
                let number = n(((writer + i) % 37) as u8);
                let applied = store
                    .apply(mutation(&room, Change::Added(number)))
                    .await
                    .unwrap();
                let cached: Option<String> = raw.hget(&cache_key, "version").await.unwrap();
                let cached: u64 = cached.expect("cached").parse().unwrap();
                assert!(
                    cached >= applied.room.version.get(),
                    "cache at {cached} after version {} was acknowledged",
                    applied.room.version
                );
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }

    let truth = instances[0]
        .room(&room)
        .await
        .unwrap()
        .expect("room exists");
    assert_eq!(truth.version.get(), (WRITERS * ADDS + 1) as u64);
    let cached: Option<String> = raw.hget(&cache_key, "version").await.unwrap();
    assert_eq!(cached, Some(truth.version.to_string()));
    let hits = instances[1].cache_stats().hits;
    assert_eq!(instances[1].room(&room).await.unwrap(), Some(truth));
    assert_eq!(
        instances[1].cache_stats().hits,
        hits + 1,
        "served from Redis"
    );
    assert!(!instances[0].is_stale() && !instances[1].is_stale());
}

/// Protection is checked where the change is applied, in both backends and
/// for every kind of change: a room created with a password between a
/// writer's check and its write still refuses a writer without a token.
#[tokio::test]
async fn a_protected_room_refuses_writers_without_a_token_in_both_backends() {
    let pg = TestPostgres::start_new().await;
    let postgres = migrated_store(&pg).await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = migrated_sqlite(&dir).await;
    let stores: [(&str, &dyn Store); 2] = [("postgres", &postgres), ("sqlite", &sqlite)];
    for (name, store) in stores {
        let open = key("open-table");
        let locked = key("locked-table");
        // The open room is written to first without a token, so the
        // PostgreSQL store learns it is open and may group its adds.
        let first = Mutation {
            authorized: false,
            ..mutation(&open, Change::Added(n(1)))
        };
        store.apply(first).await.unwrap();
        store
            .create_room(
                &locked,
                Some("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into()),
            )
            .await
            .unwrap();
        for change in [
            Change::Added(n(5)),
            Change::Removed(0),
            Change::Replaced(history(&[1, 2])),
        ] {
            let without = Mutation {
                authorized: false,
                ..mutation(&locked, change.clone())
            };
            assert!(
                matches!(store.apply(without).await, Err(StoreError::AuthRequired)),
                "{name}: {change:?} without a token"
            );
        }
        let room = store.room(&locked).await.unwrap().expect("room");
        assert_eq!(
            (room.version.get(), room.history.len()),
            (0, 0),
            "{name}: unchanged"
        );
        let with = mutation(&locked, Change::Added(n(7)));
        assert_eq!(
            store.apply(with).await.unwrap().room.history.len(),
            1,
            "{name}"
        );
        for _ in 0..3 {
            let add = Mutation {
                authorized: false,
                ..mutation(&open, Change::Added(n(2)))
            };
            store.apply(add).await.unwrap();
        }
        assert_eq!(
            store
                .room(&open)
                .await
                .unwrap()
                .expect("open")
                .version
                .get(),
            4,
            "{name}"
        );
    }
}
