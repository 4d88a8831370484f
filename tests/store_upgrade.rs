//! A rolling upgrade on PostgreSQL: the database is migrated by this release
//! (`croupier migrate`, expand steps only) while instances of the previous
//! release still run. Their SQL entry points — `croupier_append_known` (and
//! the older `croupier_append`), reading `rooms.history`, and the general
//! transaction's UPDATE of `rooms.history` — must keep giving correct results
//! interleaved with this release's batches; then, after `migrate --contract`,
//! this release alone works on the same rooms.

mod support;

use std::time::Duration;

use croupier::domain::{Change, History, Number, RoomKey, Version};
use croupier::store::postgres::{PgOptions, PostgresStore};
use croupier::store::{Mutation, Outcome, Position, Shape, Store};
use serde_json::Value;
use sqlx::{PgPool, Row};
use support::postgres::TestPostgres;

const MAX_HISTORY: usize = 10_000;

fn options() -> PgOptions {
    PgOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(10),
        connect_attempts: 3,
    }
}

fn mutation(key: &RoomKey, change: Change) -> Mutation {
    Mutation {
        key: key.clone(),
        change,
        mutation_id: None,
        max_history: MAX_HISTORY,
        authorized: true,
    }
}

fn json_numbers(numbers: &[Number]) -> Value {
    Value::Array(numbers.iter().map(|n| n.to_json()).collect())
}

/// The room as the previous release reads it: `rooms.history`, its length and
/// version.
async fn old_read(pool: &PgPool, key: &RoomKey) -> (Value, i64, i64) {
    let row =
        sqlx::query("SELECT history::text AS h, history_length, version FROM rooms WHERE key = $1")
            .bind(key.as_str())
            .fetch_one(pool)
            .await
            .expect("the previous release reads the room");
    let history: String = row.get("h");
    let length: i32 = row.get("history_length");
    (
        serde_json::from_str(&history).unwrap(),
        i64::from(length),
        row.get("version"),
    )
}

/// What the previous release's grouped append returned.
struct OldAppend {
    outcomes: Vec<String>,
    room_versions: Vec<i64>,
    added_since_known: Option<String>,
    history_before: Option<String>,
}

/// The previous release's hot path: one `croupier_append_known` call.
async fn old_append_known(
    pool: &PgPool,
    key: &RoomKey,
    numbers: &[Number],
    known: Option<(i64, &str, i64)>,
) -> OldAppend {
    let row = sqlx::query(
        "SELECT outcomes, room_versions, added_since_known, history_before
         FROM croupier_append_known($1, $2::jsonb, $3::text[], $4::bigint[], now(),
                                    now() - interval '10 minutes', $5, $6, $7, $8)",
    )
    .bind(key.as_str())
    .bind(json_numbers(numbers).to_string())
    .bind(vec![None::<String>; numbers.len()])
    .bind(vec![MAX_HISTORY as i64; numbers.len()])
    .bind(known.map(|k| k.0))
    .bind(known.map(|k| k.1))
    .bind(known.map(|k| k.2))
    .bind(Some("old-epoch"))
    .fetch_one(pool)
    .await
    .expect("croupier_append_known");
    OldAppend {
        outcomes: row.get("outcomes"),
        room_versions: row.get("room_versions"),
        added_since_known: row.get("added_since_known"),
        history_before: row.get("history_before"),
    }
}

/// The previous release's general transaction: lock, read `rooms.history`,
/// write the new history whole, log the event.
async fn old_general(pool: &PgPool, key: &RoomKey, change: Change) {
    let mut tx = pool.begin().await.unwrap();
    let row =
        sqlx::query("SELECT id, history::text AS h, version FROM rooms WHERE key = $1 FOR UPDATE")
            .bind(key.as_str())
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let id: i64 = row.get("id");
    let version: i64 = row.get::<i64, _>("version") + 1;
    let mut history = History::from_stored(row.get::<String, _>("h").as_str()).unwrap();
    history.apply(&change);
    let (kind, payload) = croupier::store::encode_change(&change);
    sqlx::query(
        "WITH updated AS (
             UPDATE rooms SET history = $2::jsonb, history_length = $3, version = $4, updated_at = $5
             WHERE id = $1
         )
         INSERT INTO room_events (room_id, version, kind, payload, mutation_id, created_at)
         VALUES ($1, $4, $6, $7::jsonb, $8, $5)",
    )
    .bind(id)
    .bind(history.to_json_string())
    .bind(history.len() as i64)
    .bind(version)
    .bind(chrono::Utc::now())
    .bind(kind)
    .bind(payload)
    .bind(None::<String>)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Both views of the room — the previous release's column and this release's
/// rows — hold `expected` at `version`.
async fn check(
    store: &PostgresStore,
    key: &RoomKey,
    expected: &[Number],
    version: u64,
    step: &str,
) {
    let (history, length, stored_version) = old_read(store.pool(), key).await;
    assert_eq!(
        (history, length, stored_version),
        (
            json_numbers(expected),
            expected.len() as i64,
            version as i64
        ),
        "{step}: rooms.history as the previous release reads it"
    );
    let room = store.room(key).await.unwrap().expect("room exists");
    assert_eq!(
        (room.history.numbers(), room.version.get()),
        (expected, version),
        "{step}: the room as this release reads it"
    );
    let log = store
        .events_since(key, Version::ZERO)
        .await
        .unwrap()
        .expect("complete log");
    let mut replayed = History::default();
    for event in &log {
        replayed.apply(&event.change);
    }
    assert_eq!(
        replayed.numbers(),
        expected,
        "{step}: the log replays to the room"
    );
}

#[tokio::test]
async fn the_previous_release_and_this_one_share_an_expanded_database() {
    let pg = TestPostgres::start_new().await;
    let store = PostgresStore::connect(&pg.url(), options()).await.unwrap();
    store.migrate().await.expect("expand");
    let key = RoomKey::parse("rolling").unwrap();
    let pool = store.pool().clone();
    let n = Number::Single;

    // The previous release creates the room with its grouped append.
    let first = old_append_known(&pool, &key, &[n(1), n(2)], None).await;
    assert_eq!(first.outcomes, ["applied", "applied"]);
    let mut expected = vec![n(1), n(2)];
    let mut version = 2;
    check(&store, &key, &expected, version, "old create").await;
    let room = store.room(&key).await.unwrap().unwrap();
    let (id, epoch) = (room.id, room.epoch.to_string());

    // This release appends, removes and replaces in batches.
    let batch = store
        .apply_batch(
            &key,
            // With the whole head known, so the appends are committed by one
            // call: on an expanded schema that too keeps `rooms.history` in step.
            &Position {
                epoch: Some(room.epoch.clone()),
                version: Version::new(1),
                shape: Some(Shape {
                    id,
                    history_length: room.history.len(),
                    protected: room.protected,
                }),
            },
            &[
                mutation(&key, Change::Added(Number::DoubleZero)),
                mutation(&key, Change::Added(n(36))),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        batch.missed.map(|m| m.len()),
        Some(1),
        "the previous release's events are in the log for this one"
    );
    expected.extend([Number::DoubleZero, n(36)]);
    version += 2;
    check(&store, &key, &expected, version, "new adds").await;

    // The previous release, knowing the room at version 2, is told only the
    // numbers added since (from the log), and appends after them.
    let old = old_append_known(&pool, &key, &[n(7)], Some((id, &epoch, 2))).await;
    assert_eq!(old.outcomes, ["applied"]);
    assert_eq!(old.room_versions, [5]);
    assert_eq!(old.added_since_known.as_deref(), Some(r#"["00", 36]"#));
    assert_eq!(old.history_before, None);
    expected.push(n(7));
    version += 1;
    check(
        &store,
        &key,
        &expected,
        version,
        "old append after new adds",
    )
    .await;

    // A removal by this release, then the previous release's general path
    // removes too (rewriting the column), then this release appends.
    store
        .apply(mutation(&key, Change::Removed(1)))
        .await
        .unwrap();
    expected.remove(1);
    version += 1;
    check(&store, &key, &expected, version, "new removal").await;
    old_general(&pool, &key, Change::Removed(0)).await;
    expected.remove(0);
    version += 1;
    check(&store, &key, &expected, version, "old removal").await;
    let added = store
        .apply(mutation(&key, Change::Added(n(9))))
        .await
        .unwrap();
    expected.push(n(9));
    version += 1;
    assert_eq!(added.room.history.numbers(), expected.as_slice());
    check(
        &store,
        &key,
        &expected,
        version,
        "new add after old removal",
    )
    .await;

    // Behind a removal the previous release gets the whole history back.
    let old = old_append_known(&pool, &key, &[n(10)], Some((id, &epoch, 5))).await;
    assert_eq!(
        old.history_before,
        Some(json_numbers(&expected).to_string().replace(',', ", "))
    );
    expected.push(n(10));
    version += 1;
    check(
        &store,
        &key,
        &expected,
        version,
        "old append behind a removal",
    )
    .await;

    // Replacements both ways, and the older croupier_append.
    let replacement: Vec<Number> = (0..30).map(|i| n(i % 37)).collect();
    old_general(
        &pool,
        &key,
        Change::Replaced(History::from_numbers(replacement.clone())),
    )
    .await;
    expected = replacement;
    version += 1;
    check(&store, &key, &expected, version, "old replacement").await;
    let history: String = sqlx::query_scalar(
        "SELECT room_history FROM croupier_append($1, '[\"00\"]', '{NULL}', '{100}',
                                                 now(), now() - interval '10 minutes')",
    )
    .bind(key.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    expected.push(Number::DoubleZero);
    version += 1;
    assert_eq!(
        serde_json::from_str::<Value>(&history).unwrap(),
        json_numbers(&expected)
    );
    check(&store, &key, &expected, version, "oldest append").await;
    let short = vec![n(3), n(4)];
    store
        .apply(mutation(
            &key,
            Change::Replaced(History::from_numbers(short.clone())),
        ))
        .await
        .unwrap();
    expected = short;
    version += 1;
    check(&store, &key, &expected, version, "new replacement").await;

    // Interleaved bursts: old appends, new batches mixing everything.
    for round in 0..20u8 {
        let old = old_append_known(&pool, &key, &[n(round), n(36 - round)], None).await;
        assert_eq!(old.outcomes, ["applied", "applied"]);
        expected.extend([n(round), n(36 - round)]);
        version += 2;
        let index = usize::from(round) % expected.len();
        let batch = store
            .apply_batch(
                &key,
                &Position::default(),
                &[
                    mutation(&key, Change::Added(n(round))),
                    mutation(&key, Change::Removed(index)),
                    mutation(&key, Change::Added(Number::DoubleZero)),
                ],
            )
            .await
            .unwrap();
        assert!(
            batch
                .outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Applied(_))),
            "{:?}",
            batch.outcomes
        );
        expected.push(n(round));
        expected.remove(index);
        expected.push(Number::DoubleZero);
        version += 3;
        check(&store, &key, &expected, version, &format!("round {round}")).await;

        // Appends on the head that batch left, as a room task sends them:
        // committed by one call, which keeps `rooms.history` in step too.
        let known = batch.head.expect("the room exists").position();
        let appends =
            [n(round + 1), n(round + 2)].map(|number| mutation(&key, Change::Added(number)));
        let batch = store.apply_batch(&key, &known, &appends).await.unwrap();
        assert!(
            batch
                .outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Applied(_)))
        );
        assert_eq!(batch.missed.map(|m| m.len()), Some(0));
        expected.extend([n(round + 1), n(round + 2)]);
        version += 2;
        check(
            &store,
            &key,
            &expected,
            version,
            &format!("round {round}, one call"),
        )
        .await;
    }

    // A room the previous release's general path creates: its insert leaves
    // the default empty history, then its UPDATE fills it.
    let other = RoomKey::parse("made by the old release").unwrap();
    sqlx::query(
        "INSERT INTO rooms (key, epoch, created_at, updated_at) VALUES ($1, 'e', now(), now())",
    )
    .bind(other.as_str())
    .execute(&pool)
    .await
    .unwrap();
    old_general(&pool, &other, Change::Added(n(5))).await;
    check(&store, &other, &[n(5)], 1, "old general create").await;

    // Contract once the previous release is gone: this release keeps every
    // room and works alone, and the old entry points are gone.
    store.migrate_contract().await.expect("contract");
    let room = store.room(&key).await.unwrap().unwrap();
    assert_eq!(
        (room.history.numbers(), room.version.get()),
        (expected.as_slice(), version)
    );
    let applied = store
        .apply(mutation(&key, Change::Added(n(11))))
        .await
        .unwrap();
    expected.push(n(11));
    assert_eq!(applied.room.history.numbers(), expected.as_slice());
    assert_eq!(applied.event.version, room.version.next());
    let batch = store
        .apply_batch(
            &key,
            &Position {
                epoch: Some(room.epoch.clone()),
                version: room.version,
                shape: None,
            },
            &[mutation(&key, Change::Removed(0))],
        )
        .await
        .unwrap();
    assert_eq!(batch.missed.map(|m| m.len()), Some(1));
    assert_eq!(
        batch.head.map(|h| h.history_length),
        Some(expected.len() - 1)
    );
    assert!(
        sqlx::query("SELECT history FROM rooms")
            .fetch_all(&pool)
            .await
            .is_err(),
        "rooms.history is gone"
    );
    assert!(
        !old_append_known_exists(&pool).await,
        "croupier_append_known is gone"
    );
}

async fn old_append_known_exists(pool: &PgPool) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'croupier_append_known')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}
