//! SQLite migrations through the CLI's code path: `croupier rollback 1` on a
//! migrated embedded database.

use croupier::store::Store;
use croupier::store::sqlite::SqliteStore;

#[tokio::test]
async fn rollback_reverts_the_newest_migration_of_a_migrated_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("croupier.db"))
        .await
        .unwrap();
    store.migrate().await.expect("migrating");
    let before = store.migration_status().await.unwrap();
    assert!(before.iter().all(|m| m.applied), "{before:?}");

    tokio::time::timeout(std::time::Duration::from_secs(5), store.rollback(1))
        .await
        .expect("rollback finishes without waiting for the pool")
        .expect("rolling back");
    let after = store.migration_status().await.unwrap();
    assert_eq!(after.iter().filter(|m| !m.applied).count(), 1, "{after:?}");
    assert!(!after.last().unwrap().applied);

    store.migrate().await.expect("migrating again");
}
