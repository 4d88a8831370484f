//! Hot-room cache: a [`Store`] decorator that serves `room()` from Redis and
//! writes every committed room state through to it.
//!
//! The wrapped store (PostgreSQL in cluster mode) stays the source of truth; the
//! cache only saves it reads. Three rules keep the cache from lying:
//!
//! 1. **Versioned writes.** Each cached room is a hash `croupier:cache:room:{key}`
//!    with fields `version`, `epoch` and `room` (the JSON blob). A Lua script
//!    replaces it only when the cached version is lower, the epoch differs, or
//!    there is none, so writers racing on different instances can never leave an
//!    older state behind a newer one. A room whose history is too long to cache
//!    keeps a `room`-less marker with its version, which still blocks older writes.
//! 2. **Redis never fails a read.** Any Redis error or timeout falls back to the
//!    wrapped store.
//! 3. **A missed write is remembered.** If a write-through fails and the key cannot
//!    be deleted either, Redis may now hold an outdated room. This instance stops
//!    reading from the cache until it has dropped every cached room (`SCAN` +
//!    `DEL`). Other instances cannot know, and they would serve the outdated room
//!    until the entry expires (`CACHE_TTL`, an hour by default) or the room is
//!    written again — so a background task also deletes that key as soon as Redis
//!    answers again, whether or not this instance reads anything meanwhile.
//! 4. **One write per committed batch, from the room's writer.** A hot room
//!    commits many states per second, each carrying the whole history, and only
//!    the newest one matters. Changes made through the hub reach the store from
//!    the room's task, one batch at a time; the task hands the newest state to
//!    [`RoomCache::write`] once per batch (and skips states overtaken while a
//!    write was under way), off the path that delivers events to members. The
//!    writers of a batch are answered once that write is done, or after a short
//!    bounded wait, so an acknowledged write is normally visible in the cache
//!    everywhere; a write that failed is dealt with as in rule 3. Direct calls of
//!    [`Store::apply`] and [`Store::create_room`] still write through before
//!    they return; [`Store::apply_batch`] does not touch the cache, since it
//!    returns no history to cache.
//! 5. **A failover makes the cache untrusted.** Redis replicates asynchronously:
//!    a master that fails (or is failed over) can take its last cache writes with
//!    it, and the promoted replica would then serve an older room than the store
//!    committed and acknowledged. So any sign that the server behind the
//!    connection may have changed — a connection error, a reconnect, a change of
//!    a Cluster's slot map — counts like a lost write (rule 3): the cache is not
//!    read until it has been flushed, on every master of a Cluster. A read that
//!    was under way when such a sign arrived is not served either. Behind
//!    Sentinel or in a Cluster an instance also starts untrusted, since a
//!    failover may have happened while it was not running; a single server
//!    has no replica to be promoted.
//!
//! Key names depend on the deployment (`crate::redis_layout`): in a Cluster a
//! room's entry carries the room's hash tag, next to its sharded channel.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fred::clients::Client;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use serde::{Deserialize, Serialize};

use crate::redis_layout::Layout;

use super::{
    Applied, Batch, DynStore, MigrationInfo, Mutation, Page, Position, RoomAuth, RoomSummary,
    Store, StoreError, StoreStats,
};
use crate::domain::{History, Room, RoomEvent, RoomKey, Version};

/// Cache operations give up quickly: the database is always there as a fallback.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a stale cache may be retried for flushing while Redis stays down.
const FLUSH_RETRY: Duration = Duration::from_secs(1);
const SCAN_COUNT: u32 = 500;

/// KEYS[1] cache key; ARGV version, epoch, room JSON ("" = too large to cache), TTL ms.
/// Returns 1 when written, 0 when the cache already held this version or a newer one.
const WRITE_SCRIPT: &str = r#"
local cached = redis.call('HMGET', KEYS[1], 'version', 'epoch')
if cached[1] and cached[2] == ARGV[2] and tonumber(cached[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'epoch', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'room')
else
  redis.call('HSET', KEYS[1], 'room', ARGV[3])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Hits and misses of one [`CachedStore`] (also exported as Prometheus counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

pub struct CachedStore {
    inner: DynStore,
    cache: Arc<Cache>,
}

/// The Redis side of [`CachedStore`], shared with the room tasks that write
/// rooms through (rule 4).
struct Cache {
    redis: Client,
    /// Key names, and whether `SCAN` and multi-key `DEL` must go master by master.
    layout: Layout,
    ttl: Duration,
    max_cached_history: usize,
    options: Options,
    /// Write-throughs that failed without the key being deleted...
    dirty: AtomicU64,
    /// The wrapped store's failover count when last looked at.
    failovers_seen: AtomicU64,
    /// ...and how many of them the last successful flush covered. The cache may
    /// be read only while `cleaned == dirty`.
    cleaned: AtomicU64,
    flushing: AtomicBool,
    /// When the last flush attempt started; a std `Mutex` since it is never held
    /// across an `.await`.
    last_flush: Mutex<Option<Instant>>,
    /// Keys of failed write-throughs that could not be deleted at once, for the
    /// task started by [`CachedStore::new`] to delete once Redis is back (rule 3).
    outdated: Arc<Mutex<HashSet<String>>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A handle for writing committed room states into the cache of a
/// [`CachedStore`]: what a room's task uses after each batch it committed.
/// Cheap to clone.
#[derive(Clone)]
pub struct RoomCache {
    cache: Arc<Cache>,
}

impl RoomCache {
    /// Stores `room` unless the cache already holds this version or a newer one
    /// of the same epoch. A failed write deletes the key, or if even that fails
    /// marks the cache stale (rule 3).
    pub async fn write(&self, room: &Room) {
        self.cache.write_or_drop(room).await;
    }
}

/// The cached form of a [`Room`], written from borrowed parts...
#[derive(Serialize)]
struct RoomBlobOut<'a> {
    id: i64,
    key: &'a str,
    history: &'a History,
    version: Version,
    epoch: &'a str,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    protected: bool,
}

/// ...and read back into owned values that still have to be parsed.
#[derive(Deserialize)]
struct RoomBlobIn {
    id: i64,
    key: String,
    history: serde_json::Value,
    version: u64,
    epoch: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    protected: bool,
}

fn encode_room(room: &Room) -> String {
    let blob = RoomBlobOut {
        id: room.id,
        key: room.key.as_str(),
        history: &room.history,
        version: room.version,
        epoch: &room.epoch,
        created_at: room.created_at,
        updated_at: room.updated_at,
        protected: room.protected,
    };
    // Plain integers, strings and timestamps always serialise.
    serde_json::to_string(&blob).unwrap_or_default()
}

fn decode_room(raw: &str) -> Result<Room, String> {
    let blob: RoomBlobIn = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    Ok(Room {
        id: blob.id,
        key: RoomKey::parse(&blob.key).map_err(|e| e.to_string())?,
        history: History::from_json(&blob.history, usize::MAX).map_err(|e| e.to_string())?,
        version: Version::new(blob.version),
        epoch: blob.epoch.into(),
        created_at: blob.created_at,
        updated_at: blob.updated_at,
        protected: blob.protected,
    })
}

fn count_command(op: &'static str) {
    metrics::counter!("croupier_redis_commands_total", "op" => op).increment(1);
}

fn count_error(op: &'static str) {
    metrics::counter!("croupier_redis_errors_total", "op" => op).increment(1);
}

fn observe<T>(op: &'static str, result: Result<T, Error>) -> Result<T, Error> {
    count_command(op);
    if let Err(err) = &result {
        count_error(op);
        tracing::debug!(op, error = %err, "Redis cache command failed");
    }
    result
}

impl CachedStore {
    /// Wraps `inner`; cached rooms expire after `ttl` without a write, and rooms with
    /// more than `max_cached_history` numbers are always read from `inner`.
    pub fn new(
        inner: DynStore,
        redis: Client,
        ttl: Duration,
        max_cached_history: usize,
    ) -> CachedStore {
        let options = Options {
            // Never queue behind a reconnect: the database answers instead.
            fail_fast: true,
            timeout: Some(REDIS_TIMEOUT),
            max_attempts: Some(1),
            ..Options::default()
        };
        let layout = if redis.is_clustered() {
            Layout::Cluster
        } else {
            Layout::Single
        };
        // Behind Sentinel or in a Cluster, a failover this process did not
        // witness (it was not running) may have lost cache writes: start
        // untrusted, so that the first read flushes (rule 5).
        let replicated = redis.is_clustered()
            || matches!(redis.client_config().server, ServerConfig::Sentinel { .. });
        let outdated = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(delete_outdated(
            redis.clone(),
            options.clone(),
            Arc::downgrade(&outdated),
        ));
        let cache = Cache {
            redis,
            layout,
            ttl: ttl.max(Duration::from_millis(1)),
            max_cached_history,
            options,
            dirty: AtomicU64::new(u64::from(replicated)),
            failovers_seen: AtomicU64::new(inner.failovers()),
            cleaned: AtomicU64::new(0),
            flushing: AtomicBool::new(false),
            last_flush: Mutex::new(None),
            outdated,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        let cache = Arc::new(cache);
        tokio::spawn(distrust_on_failover(
            cache.redis.clone(),
            Arc::downgrade(&cache),
        ));
        CachedStore { inner, cache }
    }

    /// Hits and misses counted by this store so far.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.cache.hits.load(Ordering::Relaxed),
            misses: self.cache.misses.load(Ordering::Relaxed),
        }
    }

    /// Whether this instance currently refuses to read from the cache because a
    /// write-through was lost and the cache has not been flushed since.
    pub fn is_stale(&self) -> bool {
        self.cache.is_stale()
    }

    /// The handle room tasks write committed states through (rule 4).
    pub fn room_cache(&self) -> RoomCache {
        RoomCache {
            cache: self.cache.clone(),
        }
    }

    /// Stores `room` in the cache unless the cache already holds this version or a
    /// newer one of the same epoch; public so that other components can warm the
    /// cache with a state they read. Returns once the cache holds this state or a
    /// newer one, or once a failed write has been handled (rule 3).
    pub async fn write_through(&self, room: &Room) {
        self.cache.write_or_drop(room).await;
    }
}

impl Cache {
    fn cache_key(&self, key: &RoomKey) -> String {
        self.layout.cache_key(key)
    }

    /// Stops reads from the cache until it has been flushed (rules 3 and 5).
    fn distrust(&self) {
        self.dirty.fetch_add(1, Ordering::SeqCst);
    }

    fn is_stale(&self) -> bool {
        self.cleaned.load(Ordering::SeqCst) < self.dirty.load(Ordering::SeqCst)
    }

    /// Writes one state now; on failure deletes the key, and if even that fails,
    /// marks the cache stale (rule 3).
    async fn write_or_drop(&self, room: &Room) {
        if self.write(room).await.is_ok() {
            return;
        }
        // The cache may now hold an older state than the database: drop it...
        let redis = self.redis.with_options(&self.options);
        if observe(
            "cache_del",
            redis.del::<i64, _>(self.cache_key(&room.key)).await,
        )
        .is_ok()
        {
            return;
        }
        // ...and if even that fails, stop trusting the cache until it is flushed,
        // and have the key deleted for the other instances once Redis is back.
        self.remember_outdated(&room.key);
        tracing::warn!(key = %room.key, "room cache write failed; cache marked stale until Redis is back");
    }

    fn remember_outdated(&self, key: &RoomKey) {
        self.distrust();
        lock(&self.outdated).insert(self.cache_key(key));
    }

    async fn write(&self, room: &Room) -> Result<(), Error> {
        let blob = if room.history.len() <= self.max_cached_history {
            encode_room(room)
        } else {
            String::new()
        };
        let ttl_ms = self.ttl.as_millis().min(i64::MAX as u128).to_string();
        let key = self.cache_key(&room.key);
        // fred hashes a custom command by its first argument (the script)
        // unless given the slot: a Cluster needs the key's.
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let args = vec![
            WRITE_SCRIPT.to_owned(),
            "1".to_owned(),
            key,
            room.version.to_string(),
            room.epoch.to_string(),
            blob,
            ttl_ms,
        ];
        // EVAL through the generic interface: the script is one short round trip,
        // and Redis keeps the compiled script cached by its hash.
        let eval = CustomCommand::new_static("EVAL", ClusterHash::Custom(slot), false);
        let redis = self.redis.with_options(&self.options);
        observe("cache_write", redis.custom::<i64, _>(eval, args).await).map(|_| ())
    }

    /// The cached room: `Ok(None)` on a miss, `Err` when Redis did not answer.
    async fn read(&self, key: &RoomKey) -> Result<Option<Room>, ()> {
        let redis = self.redis.with_options(&self.options);
        let raw: Option<String> =
            observe("cache_read", redis.hget(self.cache_key(key), "room").await).map_err(|_| ())?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        match decode_room(&raw) {
            Ok(room) if room.key == *key => Ok(Some(room)),
            Ok(_) | Err(_) => {
                count_error("cache_decode");
                tracing::warn!(%key, "corrupt room cache entry dropped");
                let _ = observe("cache_del", redis.del::<i64, _>(self.cache_key(key)).await);
                Ok(None)
            }
        }
    }

    /// Whether the cache may be read now; flushes it first if it is stale.
    async fn usable(&self) -> bool {
        if !self.is_stale() {
            return true;
        }
        {
            let mut last = lock(&self.last_flush);
            if last.is_some_and(|at| at.elapsed() < FLUSH_RETRY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        if self.flushing.swap(true, Ordering::SeqCst) {
            return false;
        }
        // Released even if this future is dropped mid-flush (a cancelled request).
        let _flushing = Release(&self.flushing);
        // Everything marked dirty up to here is covered by this flush; a write that
        // fails while it runs bumps `dirty` past `target` and keeps the cache stale.
        let target = self.dirty.load(Ordering::SeqCst);
        match self.flush().await {
            Ok(dropped) => {
                self.cleaned.fetch_max(target, Ordering::SeqCst);
                tracing::info!(
                    dropped,
                    "room cache flushed after a lost write; serving from cache again"
                );
                !self.is_stale()
            }
            Err(err) => {
                tracing::debug!(error = %err, "room cache flush failed; Redis still unavailable");
                false
            }
        }
    }

    /// Deletes every cached room, page by page (on every master of a Cluster).
    async fn flush(&self) -> Result<u64, Error> {
        if self.layout == Layout::Cluster {
            return self.flush_every_master().await;
        }
        let redis = self.redis.with_options(&self.options);
        let pattern = self.layout.cache_pattern();
        let mut cursor = "0".to_owned();
        let mut dropped = 0;
        loop {
            let page = redis.scan_page::<(String, Vec<String>), _, _>(
                cursor,
                pattern,
                Some(SCAN_COUNT),
                None,
            );
            let (next, keys) = observe("cache_scan", page.await)?;
            if !keys.is_empty() {
                dropped += observe("cache_del", redis.del::<u64, _>(keys).await)?;
            }
            if next == "0" {
                return Ok(dropped);
            }
            cursor = next;
        }
    }

    /// [`Self::flush`] in a Cluster: `SCAN` runs on each master, and each key
    /// is deleted on its own (a multi-key `DEL` must stay within one slot).
    async fn flush_every_master(&self) -> Result<u64, Error> {
        use fred::types::scan::Scanner;
        use futures_util::StreamExt;

        let redis = self.redis.with_options(&self.options);
        let mut dropped = 0;
        let scan = self
            .redis
            .scan_cluster(self.layout.cache_pattern(), Some(SCAN_COUNT), None);
        let mut pages = std::pin::pin!(scan);
        while let Some(page) = pages.next().await {
            let mut page = observe("cache_scan", page)?;
            let keys = page.take_results().unwrap_or_default();
            page.next();
            let deletes = keys.into_iter().map(|key| redis.del::<u64, _>(key));
            for deleted in futures_util::future::join_all(deletes).await {
                dropped += observe("cache_del", deleted)?;
            }
        }
        Ok(dropped)
    }

    fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("croupier_cache_hits_total").increment(1);
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("croupier_cache_misses_total").increment(1);
    }
}

/// Clears a flag when dropped.
struct Release<'a>(&'a AtomicBool);

impl Drop for Release<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Poisoning only means a panic during a plain insert, removal or read, which
/// leaves every value guarded here usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Deletes the keys in `outdated` once Redis answers, trying every
/// [`FLUSH_RETRY`]; ends when the store is dropped. A fill or write-through that
/// follows the delete goes through the versioned script, so it can only store a
/// state at least as new as the database's at the time.
async fn delete_outdated(redis: Client, options: Options, outdated: Weak<Mutex<HashSet<String>>>) {
    let mut tick = tokio::time::interval(FLUSH_RETRY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(outdated) = outdated.upgrade() else {
            return;
        };
        let keys: Vec<String> = lock(&outdated).iter().cloned().collect();
        // A multi-key DEL must stay within one slot of a Cluster.
        let per_call = if redis.is_clustered() {
            1
        } else {
            SCAN_COUNT as usize
        };
        for chunk in keys.chunks(per_call) {
            let redis = redis.with_options(&options);
            if observe("cache_del", redis.del::<i64, _>(chunk.to_vec()).await).is_err() {
                break; // still unreachable; the next tick tries again
            }
            let mut set = lock(&outdated);
            for key in chunk {
                set.remove(key);
            }
            tracing::info!(
                keys = chunk.len(),
                "outdated room cache entries deleted after Redis came back"
            );
        }
    }
}

/// Rule 5: distrusts the cache on every connection error, reconnect and
/// change of a Cluster's slot map of `redis`, until the cache is dropped.
async fn distrust_on_failover(redis: Client, cache: Weak<Cache>) {
    use tokio::sync::broadcast::error::RecvError;

    let mut errors = redis.error_rx();
    let mut reconnects = redis.reconnect_rx();
    let mut changes = redis.cluster_change_rx();
    drop(redis);
    loop {
        let reason = tokio::select! {
            event = errors.recv() => match event {
                Err(RecvError::Closed) => return,
                _ => "connection error",
            },
            event = reconnects.recv() => match event {
                Err(RecvError::Closed) => return,
                _ => "reconnect",
            },
            event = changes.recv() => match event {
                Err(RecvError::Closed) => return,
                _ => "cluster slot map changed",
            },
        };
        let Some(cache) = cache.upgrade() else {
            return;
        };
        if !cache.is_stale() {
            tracing::info!(
                reason,
                "room cache untrusted until flushed: Redis may have failed over"
            );
        }
        cache.distrust();
    }
}

#[async_trait]
impl Store for CachedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn room_fresh(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let room = self.inner.room(key).await?;
        if let Some(room) = &room {
            // The versioned write replaces an entry of another epoch, so a
            // room that went back in time is corrected here for every reader.
            self.write_through(room).await;
        }
        Ok(room)
    }

    async fn room(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        let cache = &self.cache;
        // The database failed over: it may have lost commits that cached
        // rooms still show, so the cache is flushed before it is read again.
        let failovers = self.inner.failovers();
        if cache.failovers_seen.swap(failovers, Ordering::SeqCst) != failovers {
            tracing::warn!(
                "the database failed over; the room cache is flushed before it is read again"
            );
            cache.distrust();
        }
        let mut fill = false;
        if cache.usable().await {
            // A failover noticed while the read is under way (rule 5) may have
            // answered it from a replica that lacks the newest write.
            let trusted_since = cache.dirty.load(Ordering::SeqCst);
            match cache.read(key).await {
                Ok(Some(room)) if cache.dirty.load(Ordering::SeqCst) == trusted_since => {
                    cache.hit();
                    return Ok(Some(room));
                }
                Ok(Some(_)) => {}
                Ok(None) => fill = true,
                // Redis did not answer: the database does, and filling would fail too.
                Err(()) => {}
            }
        }
        cache.miss();
        let room = self.inner.room(key).await?;
        if let Some(room) = room
            .as_ref()
            .filter(|r| fill && r.history.len() <= cache.max_cached_history)
        {
            // Filling goes through the same versioned write, so a fill racing with a
            // newer write-through cannot win; a failed fill changes nothing.
            let _ = cache.write(room).await;
        }
        Ok(room)
    }

    async fn apply(&self, mutation: Mutation) -> Result<Applied, StoreError> {
        let applied = self.inner.apply(mutation).await?;
        self.write_through(&applied.room).await;
        Ok(applied)
    }

    /// Straight to the wrapped store: the room's task writes the resulting
    /// state into the cache itself, once per batch (rule 4).
    async fn apply_batch(
        &self,
        key: &RoomKey,
        known: &Position,
        mutations: &[Mutation],
    ) -> Result<Batch, StoreError> {
        self.inner.apply_batch(key, known, mutations).await
    }

    async fn events_since(
        &self,
        key: &RoomKey,
        after: Version,
    ) -> Result<Option<Vec<RoomEvent>>, StoreError> {
        self.inner.events_since(key, after).await
    }

    /// Always from the wrapped store: the repair compares with the truth.
    async fn heads(&self, keys: &[RoomKey]) -> Result<Vec<(RoomKey, Position)>, StoreError> {
        self.inner.heads(keys).await
    }

    async fn fork_epoch(&self, key: &RoomKey, seen: &Position) -> Result<bool, StoreError> {
        self.inner.fork_epoch(key, seen).await
    }

    async fn list_rooms(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        self.inner.list_rooms(page).await
    }

    async fn room_auth(&self, key: &RoomKey) -> Result<Option<RoomAuth>, StoreError> {
        self.inner.room_auth(key).await
    }

    async fn create_room(
        &self,
        key: &RoomKey,
        password_hash: Option<String>,
    ) -> Result<RoomAuth, StoreError> {
        let auth = self.inner.create_room(key, password_hash).await?;
        self.write_through(&auth.room).await;
        Ok(auth)
    }

    async fn prune_events(&self) -> Result<u64, StoreError> {
        self.inner.prune_events().await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats().await
    }

    async fn ping(&self) -> Result<Duration, StoreError> {
        self.inner.ping().await
    }

    async fn migration_status(&self) -> Result<Vec<MigrationInfo>, StoreError> {
        self.inner.migration_status().await
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        self.inner.migrate().await
    }

    async fn rollback(&self, steps: usize) -> anyhow::Result<()> {
        self.inner.rollback(steps).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Number;

    #[test]
    fn rooms_round_trip_through_the_cache_format() {
        let room = Room {
            id: 42,
            key: RoomKey::parse("стол 7").unwrap(),
            history: History::from_numbers(vec![
                Number::Single(0),
                Number::DoubleZero,
                Number::Single(36),
            ]),
            version: Version::new(9),
            epoch: "abc".into(),
            created_at: DateTime::parse_from_rfc3339("2024-01-02T03:04:05.123456789Z")
                .unwrap()
                .with_timezone(&Utc),
            updated_at: Utc::now(),
            protected: true,
        };
        assert_eq!(decode_room(&encode_room(&room)).unwrap(), room);
        assert!(decode_room("{}").is_err());
        assert!(decode_room(&encode_room(&room).replace("36]", "37]")).is_err());
    }
}
