//! Following the primary of a replicated PostgreSQL.
//!
//! `DATABASE_URL` may name several hosts in libpq's form
//! (`postgres://u@h1:5432,h2:5432/db?target_session_attrs=read-write`). An
//! instance only ever writes to the node that is primary now: at start-up it
//! asks every host whether it is in recovery and connects the pool to the one
//! that is not. A watcher then asks the pool's node once a second; when that
//! node is gone or has become a standby, it looks for the primary again, points
//! the pool at it, and retires every connection opened before the switch, so a
//! demoted node that is still up cannot take another statement. Meanwhile
//! writes fail as unavailable (503), nothing is acknowledged, and clients retry
//! with their mutation ids, which the new primary de-duplicates.
//!
//! sqlx connects to one host per pool, so the host list is ours to handle;
//! `target_session_attrs` is checked here (only `read-write` and `primary`
//! make sense for a writer) and not passed on.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgPool};
use sqlx::{Connection, PgConnection};

/// How often the watcher asks the pool's node whether it is still the primary.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe (connect and ask) of a host may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `DATABASE_URL` split into one URL per host, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostList {
    pub urls: Vec<String>,
}

impl HostList {
    /// Splits a libpq multi-host URL; a single-host URL gives itself. The
    /// credentials, database and parameters are shared by every host.
    pub fn parse(url: &str) -> Result<HostList, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(HostList {
                urls: vec![url.to_owned()],
            });
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (&authority[..=at], &authority[at + 1..]),
            None => ("", authority),
        };
        let tail = strip_target_session_attrs(tail)?;
        let urls: Vec<String> = hosts
            .split(',')
            .map(|host| {
                if host.is_empty() {
                    Err("DATABASE_URL lists an empty host".to_owned())
                } else {
                    Ok(format!("{scheme}://{userinfo}{host}{tail}"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(HostList { urls })
    }
}

/// Removes `target_session_attrs` from the URL's tail (path and query),
/// refusing values that would let a writer land on a standby.
fn strip_target_session_attrs(tail: &str) -> Result<String, String> {
    let Some((path, query)) = tail.split_once('?') else {
        return Ok(tail.to_owned());
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => match value {
                "read-write" | "primary" => {}
                other => {
                    return Err(format!(
                        "target_session_attrs={other} is not supported: croupier writes, so it \
                         always connects to the primary (read-write or primary)"
                    ));
                }
            },
            _ => kept.push(pair),
        }
    }
    Ok(if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    })
}

/// One host of the list: how the pool and migrations connect to it.
#[derive(Debug, Clone)]
pub(super) struct Candidate {
    /// With the statement and idle-in-transaction timeouts: for the pool.
    pub connect: PgConnectOptions,
    /// Without them: for migrations.
    pub admin: PgConnectOptions,
}

impl Candidate {
    /// `host:port`, for logs (never the credentials).
    pub fn label(&self) -> String {
        format!("{}:{}", self.connect.get_host(), self.connect.get_port())
    }
}

/// What a probe of one host found.
#[derive(Debug)]
pub(super) enum Role {
    Primary,
    Standby,
    Unreachable(sqlx::Error),
}

/// Connects to one host and asks whether it is in recovery.
pub(super) async fn probe(options: &PgConnectOptions) -> Role {
    let ask = async {
        let mut conn = PgConnection::connect_with(options).await?;
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await?;
        let _ = conn.close().await;
        Ok::<bool, sqlx::Error>(standby)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
        Ok(Ok(false)) => Role::Primary,
        Ok(Ok(true)) => Role::Standby,
        Ok(Err(err)) => Role::Unreachable(err),
        Err(_) => Role::Unreachable(sqlx::Error::PoolTimedOut),
    }
}

/// Probes every host at once (a host that does not answer must not delay
/// finding one that does); the roles come back in list order.
pub(super) async fn probe_all(candidates: &[Candidate]) -> Vec<Role> {
    join_all(candidates.iter().map(|c| probe(&c.connect))).await
}

/// The hosts and which of them the pool writes to.
#[derive(Debug)]
pub(super) struct Primary {
    candidates: Vec<Candidate>,
    current: AtomicUsize,
    /// When the pool was last pointed at a (new) primary; connections opened
    /// before it are closed instead of being handed out again.
    switched: Mutex<Instant>,
    /// How many times the pool moved to another primary.
    failovers: AtomicU64,
}

impl Primary {
    pub fn new(candidates: Vec<Candidate>, current: usize) -> Self {
        Primary {
            candidates,
            current: AtomicUsize::new(current),
            switched: Mutex::new(Instant::now()),
            failovers: AtomicU64::new(0),
        }
    }

    pub fn current(&self) -> &Candidate {
        &self.candidates[self.current.load(Ordering::Relaxed)]
    }

    /// Whether a pooled connection of this age was opened after the last
    /// switch, i.e. to the node that is primary now.
    pub fn is_current(&self, age: Duration) -> bool {
        age < self.switched_at().elapsed()
    }

    /// How many times the pool moved to another primary since start.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::SeqCst)
    }

    fn switched_at(&self) -> Instant {
        *self.switched.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn switch(&self, pool: &PgPool, to: usize) {
        let from = self.current().label();
        self.current.store(to, Ordering::Relaxed);
        pool.set_connect_options(self.candidates[to].connect.clone());
        *self.switched.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.failovers.fetch_add(1, Ordering::SeqCst);
        metrics::counter!("croupier_db_failovers_total").increment(1);
        tracing::warn!(from = %from, to = %self.candidates[to].label(), "PostgreSQL primary changed; connections to the old node are retired");
    }
}

/// Watches the pool's node and follows the primary when it moves. Runs until
/// aborted (the store aborts it when dropped).
pub(super) async fn watch(pool: PgPool, primary: Arc<Primary>) {
    let mut lost_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
            let mut conn = pool.acquire().await?;
            sqlx::query_scalar::<_, bool>("SELECT pg_is_in_recovery()")
                .fetch_one(&mut *conn)
                .await
        })
        .await;
        let demoted = match answer {
            Ok(Ok(false)) => {
                if let Some(since) = lost_since.take() {
                    tracing::info!(node = %primary.current().label(), after_ms = since.elapsed().as_millis() as u64, "PostgreSQL primary reachable again");
                }
                metrics::gauge!("croupier_db_primary_reachable").set(1.0);
                continue;
            }
            Ok(Ok(true)) => true,
            // Unreachable, or the pool too busy to answer in time: ask every
            // host directly before concluding anything.
            _ => false,
        };
        let roles = probe_all(&primary.candidates).await;
        let found = roles.iter().position(|r| matches!(r, Role::Primary));
        let current = primary.current.load(Ordering::Relaxed);
        match found {
            Some(index) if index != current || demoted => {
                primary.switch(&pool, index);
                lost_since = None;
                metrics::gauge!("croupier_db_primary_reachable").set(1.0);
            }
            Some(_) => metrics::gauge!("croupier_db_primary_reachable").set(1.0),
            None => {
                metrics::gauge!("croupier_db_primary_reachable").set(0.0);
                if lost_since.is_none() {
                    lost_since = Some(Instant::now());
                    let seen: Vec<String> = primary
                        .candidates
                        .iter()
                        .zip(&roles)
                        .map(|(c, r)| match r {
                            Role::Primary => format!("{} primary", c.label()),
                            Role::Standby => format!("{} standby", c.label()),
                            Role::Unreachable(err) => format!("{} unreachable ({err})", c.label()),
                        })
                        .collect();
                    tracing::warn!(hosts = %seen.join("; "), "no PostgreSQL primary reachable; writes are refused until one is");
                }
            }
        }
    }
}

/// Aborts a background task when dropped.
#[derive(Debug)]
pub(super) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_host_url_is_kept() {
        let url = "postgres://u:p@db:5432/app?sslmode=verify-full";
        assert_eq!(HostList::parse(url).unwrap().urls, vec![url.to_owned()]);
    }

    #[test]
    fn several_hosts_share_credentials_database_and_parameters() {
        let hosts = HostList::parse(
            "postgres://u:p%40ss@h1:5432,h2:5433,h3/app?sslmode=require&target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            hosts.urls,
            vec![
                "postgres://u:p%40ss@h1:5432/app?sslmode=require",
                "postgres://u:p%40ss@h2:5433/app?sslmode=require",
                "postgres://u:p%40ss@h3/app?sslmode=require",
            ]
        );
        let bare = HostList::parse("postgresql://h1,h2?target_session_attrs=primary").unwrap();
        assert_eq!(bare.urls, vec!["postgresql://h1", "postgresql://h2"]);
    }

    #[test]
    fn sessions_that_may_land_on_a_standby_are_refused() {
        for attrs in ["any", "read-only", "standby", "prefer-standby"] {
            let err = HostList::parse(&format!("postgres://h1,h2/db?target_session_attrs={attrs}"))
                .unwrap_err();
            assert!(err.contains(attrs), "{err}");
        }
        assert!(HostList::parse("postgres://h1,,h2/db").is_err());
    }
}
