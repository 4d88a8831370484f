//! Connecting to PostgreSQL: the connection settings ([`PgOptions`]),
//! [`PostgresStore::connect`] with its start-up wait for the server, and the
//! separate connection that migrations use.
//!
//! TLS follows libpq's URL parameters, which sqlx parses: `sslmode`
//! (`disable` … `verify-full`) and `sslrootcert` (a PEM bundle, trusted in
//! addition to the public roots compiled into sqlx). The start-up wait retries
//! only what waiting can fix; a certificate problem or a missing `sslrootcert`
//! file stops start-up at once with one line naming it.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use super::PostgresStore;
use super::failover::{self, AbortOnDrop, Candidate, HostList, Primary, Role};
use crate::store::StoreError;
use crate::tls;

/// Longest wait between two connection attempts at start-up.
const MAX_CONNECT_BACKOFF: Duration = Duration::from_secs(5);

/// Connection settings for [`PostgresStore::connect`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pool size of this instance.
    pub max_connections: u32,
    /// How long an operation waits for a pooled connection (or for a new one to be
    /// established) before it fails with [`StoreError::Unavailable`].
    pub acquire_timeout: Duration,
    /// Server-side limit for one statement, including time spent waiting for a
    /// room's lock. Also bounds how long a session may sit idle inside a
    /// transaction, so a stalled instance cannot keep a room locked.
    pub statement_timeout: Duration,
    /// How many times start-up tries to reach the server before giving up.
    pub connect_attempts: u32,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 20,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
            connect_attempts: 30,
        }
    }
}

impl PostgresStore {
    /// Connects to the primary among the hosts of `url` (a `postgres://` URL,
    /// possibly listing several hosts), waiting with exponential backoff while
    /// no primary is reachable (e.g. still starting next to this instance), and
    /// starts following it (see `failover`). Errors that waiting cannot fix —
    /// bad credentials, a missing database, a certificate problem — fail at once.
    pub async fn connect(url: &str, options: PgOptions) -> anyhow::Result<Self> {
        // The URL may hold a password: it is never logged or put into an error.
        let hosts =
            HostList::parse(url).map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?;
        let timeout_ms = options.statement_timeout.as_millis();
        let mut candidates = Vec::with_capacity(hosts.urls.len());
        for host_url in &hosts.urls {
            let admin = PgConnectOptions::from_str(host_url)
                .context("invalid PostgreSQL URL")?
                .application_name("croupier");
            if candidates.is_empty() {
                // Every host shares the parameters (sslmode, sslrootcert).
                check_tls_settings(host_url, &admin)?;
            }
            let connect = admin.clone().options([
                ("statement_timeout", format!("{timeout_ms}ms")),
                (
                    "idle_in_transaction_session_timeout",
                    format!("{timeout_ms}ms"),
                ),
            ]);
            candidates.push(Candidate { connect, admin });
        }
        let first = wait_for_primary(&candidates, &options).await?;
        let primary = Arc::new(Primary::new(candidates, first));
        let (on_acquire, on_release) = (primary.clone(), primary.clone());
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // Pings an idle connection before handing it out, so connections that
            // died with a server restart are replaced instead of failing a request.
            .test_before_acquire(true)
            // A connection opened before the primary moved goes to a node that
            // may now be a standby, or about to be fenced off: never reused.
            .before_acquire(move |_, meta| {
                let keep = on_acquire.is_current(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .after_release(move |_, meta| {
                let keep = on_release.is_current(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .connect_lazy_with(primary.current().connect.clone());
        let watcher = tokio::spawn(failover::watch(pool.clone(), primary.clone()));
        // Waiting for a connection, then the statement's own limit, then slack.
        let statement_limit = match options.statement_timeout {
            Duration::ZERO => Duration::from_secs(60),
            limit => limit,
        };
        let append_timeout = options.acquire_timeout + statement_limit + Duration::from_secs(1);
        Ok(PostgresStore {
            pool,
            appends: Arc::default(),
            append_timeout,
            primary,
            _watcher: AbortOnDrop(watcher),
        })
    }

    /// A connection of its own for migrations, which may take longer than a
    /// statement is allowed to and may wait for another instance's migration lock.
    /// (A one-connection pool: the migrator's API is easiest to use with a pool.)
    pub(super) async fn admin_pool(&self) -> anyhow::Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(self.primary.current().admin.clone())
            .await
            .context("connecting to PostgreSQL to migrate")
    }
}

/// Probes the hosts until one is the primary, backing off exponentially while
/// none is: every host unreachable, or only standbys answering (a failover in
/// progress). Returns the primary's index in the list.
async fn wait_for_primary(candidates: &[Candidate], options: &PgOptions) -> anyhow::Result<usize> {
    let attempts = options.connect_attempts.max(1);
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::new();
    for attempt in 1..=attempts {
        let roles = failover::probe_all(candidates).await;
        let mut problems = Vec::new();
        for (index, (candidate, role)) in candidates.iter().zip(roles).enumerate() {
            let err = match role {
                Role::Primary => return Ok(index),
                Role::Standby => {
                    problems.push(format!("{} is a standby", candidate.label()));
                    continue;
                }
                Role::Unreachable(err) => err,
            };
            if let Some(reason) = tls_failure(&err, candidate.connect.get_ssl_mode()) {
                anyhow::bail!("connecting to PostgreSQL over TLS: {reason}");
            }
            match StoreError::from_sqlx(err) {
                StoreError::Unavailable(msg) if candidates.len() == 1 => problems.push(msg),
                StoreError::Unavailable(msg) => {
                    problems.push(format!("{}: {msg}", candidate.label()))
                }
                other => anyhow::bail!("connecting to PostgreSQL: {other}"),
            }
        }
        last_error = problems.join("; ");
        if attempt == attempts {
            tracing::warn!(attempt, attempts, error = %last_error, "no PostgreSQL primary reachable; giving up");
            break;
        }
        tracing::warn!(
            attempt,
            attempts,
            error = %last_error,
            retry_in_ms = backoff.as_millis() as u64,
            "no PostgreSQL primary reachable; retrying"
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_CONNECT_BACKOFF);
    }
    anyhow::bail!("PostgreSQL still unreachable after {attempts} attempt(s): {last_error}")
}

/// Refuses TLS settings that cannot work, before the first attempt: a named
/// `sslrootcert` that is missing or holds no certificate (sqlx would report an
/// I/O error on every attempt, which reads like an outage). Also warns when the
/// server's identity is not checked, since only `verify-full` stops an
/// attacker who can redirect the connection.
fn check_tls_settings(url: &str, options: &PgConnectOptions) -> anyhow::Result<()> {
    let mode = options.get_ssl_mode();
    let encrypts = !matches!(mode, PgSslMode::Disable | PgSslMode::Allow);
    if encrypts && let Some(path) = root_cert_file(url) {
        tls::read_certificates(&path, "sslrootcert")?;
    }
    if !matches!(mode, PgSslMode::VerifyFull) {
        tracing::warn!(
            sslmode = ?mode,
            "the PostgreSQL server's identity is not verified (and with disable, allow or \
             prefer the connection may be plain text); use sslmode=verify-full in production"
        );
    }
    Ok(())
}

/// The `sslrootcert` file named in the URL (or by `PGSSLROOTCERT`, which sqlx
/// also reads). Inline PEM (sqlx accepts that too) has no file to check.
fn root_cert_file(url: &str) -> Option<std::path::PathBuf> {
    let from_url = url::Url::parse(url).ok().and_then(|url| {
        url.query_pairs()
            .find(|(k, _)| k == "sslrootcert" || k == "ssl-root-cert")
            .map(|(_, v)| v.into_owned())
    });
    let value = from_url.or_else(|| std::env::var("PGSSLROOTCERT").ok())?;
    let value = value.trim();
    (!value.is_empty() && !value.starts_with("-----BEGIN")).then(|| value.into())
}

/// Why a connection attempt failed at TLS, if it did: a rejected certificate,
/// a server without TLS under `sslmode=require` or stricter, an unreadable
/// certificate file. None of these heal by waiting.
fn tls_failure(err: &sqlx::Error, mode: PgSslMode) -> Option<String> {
    let rustls = match err {
        sqlx::Error::Tls(inner) => match tls::rustls_error(inner.as_ref()) {
            Some(rustls) => rustls,
            None => return Some(inner.to_string()),
        },
        sqlx::Error::Io(io) => tls::rustls_error(io)?,
        _ => return None,
    };
    let mut reason = tls::describe(rustls, "sslrootcert");
    if matches!(mode, PgSslMode::VerifyCa) && tls::is_name_mismatch(rustls) {
        // sqlx 0.8.6 skips the name check of verify-ca only for rustls's old
        // error variant, not the one rustls 0.23.24+ reports (sqlx issue
        // #3793, fixed after 0.8.6): verify-ca currently checks the name too.
        reason.push_str(" (sqlx 0.8 checks the host name under verify-ca as well)");
    }
    Some(reason)
}
