//! Configuration from the environment (and an optional `.env` file, loaded by
//! `main`). Every value has a sane default; a value that does not parse stops
//! start-up with one line naming the variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::quota::QuotaConfig;
use crate::tls::RedisTlsFiles;

/// Where rooms are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// Embedded default: a SQLite file (`sqlite:` URL or `DATA_DIR/croupier.db`).
    Sqlite(String),
    /// Cluster mode: a `postgres://` URL.
    Postgres(String),
}

/// Which origins may call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

impl CorsOrigins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            CorsOrigins::Any => true,
            CorsOrigins::List(list) => list.iter().any(|o| o == origin),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub bind: IpAddr,
    pub port: u16,
    pub data_dir: PathBuf,
    pub database: Database,
    pub redis_url: Option<String>,
    /// CA bundle and client certificate for a `rediss://` URL.
    pub redis_tls: RedisTlsFiles,
    /// Shared HS256 secret; `None` in embedded mode means "generate and persist one".
    pub jwt_secret: Option<String>,
    pub admin_token: Option<String>,
    pub cors_origins: CorsOrigins,
    pub instance_id: String,
    /// Use `X-Forwarded-For` / `X-Real-IP` for client addresses (behind Nginx),
    /// when the connection comes from one of `trusted_proxies`.
    pub trust_proxy: bool,
    pub trusted_proxies: TrustedProxies,
    /// A separate listener for `/metrics`; `None` serves it on the main port.
    pub metrics_bind: Option<SocketAddr>,
    pub max_history: usize,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub ws: WsLimits,
    pub auth_attempts_per_minute: u32,
    pub hashing: HashingLimits,
    pub db: DbOptions,
    pub cache_ttl: Duration,
    pub cache_max_history: usize,
    /// How often every followed room is checked against the store, so that a
    /// change whose publish was lost reaches members and reads (invariant 7).
    pub repair_interval: Duration,
    /// Per-client write and room-creation quotas.
    pub quotas: QuotaConfig,
    /// Most rooms a listing page with `include=history` may hold.
    pub list_history_max_rooms: u32,
    /// Most rooms an instance follows because they are read (see `HubConfig`).
    pub max_read_rooms: usize,
    pub http: HttpLimits,
}

/// Per-connection WebSocket limits.
#[derive(Debug, Clone)]
pub struct WsLimits {
    pub max_connections: usize,
    /// Open WebSockets per client address.
    pub max_per_client: usize,
    /// Bytes of frames queued per connection before it is closed with 1013.
    pub queue_bytes: usize,
    pub messages_per_second: u32,
    pub burst: u32,
    pub queue_capacity: usize,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub max_rooms: usize,
    pub max_frame_bytes: usize,
}

/// How much password hashing an instance does at once (`/api/rooms/auth`).
#[derive(Debug, Clone)]
pub struct HashingLimits {
    /// Dedicated hashing threads; each keeps one argon2 work area (19 MiB).
    pub threads: usize,
    /// Checks allowed to wait for a thread; more are refused with 503.
    pub queue: usize,
}

/// The networks whose connections may tell us the client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Loopback and the private ranges: where a reverse proxy of ours runs.
    const DEFAULT: &str = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7";

    /// A comma list of networks (`10.0.0.0/8`) or single addresses (`10.1.2.3`).
    pub fn parse(raw: &str) -> Result<Self, String> {
        raw.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<IpNet>()
                    .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{item:?} is not an address or a CIDR network"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client of a dual-stack listener shows up as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

impl Default for TrustedProxies {
    fn default() -> Self {
        Self::parse(Self::DEFAULT).unwrap_or(TrustedProxies(Vec::new()))
    }
}

/// What one HTTP connection may cost the instance: how long a client may take
/// to send a request, how many connections it and everyone together may hold,
/// and how large a request head may be. The defaults are far beyond what a
/// browser or Nginx ever needs (see docs/operations.md, "Connections and
/// timeouts"), so only a client that stalls or floods meets them.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// From accept (or the first byte of a later request) to the end of its head.
    pub header_timeout: Duration,
    /// A kept-alive connection with no request in progress is closed after this.
    pub idle_timeout: Duration,
    /// From the end of the head to the end of the body.
    pub body_timeout: Duration,
    /// Open connections per instance, upgraded WebSockets included.
    pub max_connections: usize,
    /// Open connections per client address (IPv6: per /64).
    pub max_connections_per_ip: usize,
    pub max_uri_bytes: usize,
    pub max_headers: usize,
    /// Request line plus every header name and value.
    pub max_head_bytes: usize,
}

impl HttpLimits {
    fn from_vars<F: Fn(&str) -> Option<String>>(
        vars: &Vars<F>,
        ws: &WsLimits,
    ) -> Result<Self, ConfigError> {
        // WebSockets hold their HTTP connection for life, so the instance cap
        // must leave room above the WebSocket cap for ordinary requests
        // (health checks included) when every WebSocket slot is taken.
        let default_max = ws.max_connections.saturating_add(1_000);
        let limits = HttpLimits {
            header_timeout: vars.seconds("HTTP_HEADER_TIMEOUT", 10)?,
            idle_timeout: vars.seconds("HTTP_IDLE_TIMEOUT", 75)?,
            body_timeout: vars.seconds("HTTP_BODY_TIMEOUT", 30)?,
            max_connections: vars.positive("HTTP_MAX_CONNECTIONS", default_max)?,
            max_connections_per_ip: vars.positive("HTTP_MAX_CONNECTIONS_PER_IP", 1_024)?,
            max_uri_bytes: vars.positive("HTTP_MAX_URI_BYTES", 8 * 1024)?,
            max_headers: vars.positive("HTTP_MAX_HEADERS", 100)?,
            max_head_bytes: vars.positive("HTTP_MAX_HEAD_BYTES", 32 * 1024)?,
        };
        if limits.max_connections <= ws.max_connections {
            return Err(invalid(
                "HTTP_MAX_CONNECTIONS",
                format!(
                    "must exceed WS_MAX_CONNECTIONS ({}), or WebSockets can take every slot",
                    ws.max_connections
                ),
            ));
        }
        Ok(limits)
    }
}

/// PostgreSQL pool tuning (cluster mode).
#[derive(Debug, Clone)]
pub struct DbOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
    pub connect_attempts: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

fn invalid(name: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        reason: reason.into(),
    }
}

/// Reads variables through a lookup function, so tests need not touch the
/// process environment.
struct Vars<F>(F);

impl<F: Fn(&str) -> Option<String>> Vars<F> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn parse<T: FromStr>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(raw) => raw
                .parse()
                .map_err(|e: T::Err| invalid(name, format!("{raw:?}: {e}"))),
        }
    }

    fn positive<T: FromStr + PartialOrd + Default>(
        &self,
        name: &'static str,
        default: T,
    ) -> Result<T, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        let value = self.parse(name, default)?;
        if value <= T::default() {
            return Err(invalid(name, "must be greater than zero"));
        }
        Ok(value)
    }

    fn seconds(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.positive(name, default).map(Duration::from_secs)
    }

    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.positive(name, default).map(Duration::from_millis)
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(|v| v.to_ascii_lowercase()) {
            None => Ok(default),
            Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => Ok(true),
            Some(v) if ["0", "false", "no", "off"].contains(&v.as_str()) => Ok(false),
            Some(v) => Err(invalid(name, format!("{v:?} is not a boolean"))),
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup` (the environment, or a test's map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let vars = Vars(lookup);
        let data_dir = PathBuf::from(vars.get("DATA_DIR").unwrap_or_else(|| "./data".into()));
        let database = database(&vars, &data_dir)?;
        let redis_url = vars.get("REDIS_URL");
        let redis_tls = redis_tls(&vars, redis_url.as_deref())?;
        let cors_origins = match vars.get("CORS_ORIGINS") {
            None => CorsOrigins::Any,
            Some(raw) => {
                let list: Vec<String> = raw
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect();
                if list.iter().any(|o| o == "*") {
                    CorsOrigins::Any
                } else {
                    CorsOrigins::List(list)
                }
            }
        };
        let jwt_secret = secret(&vars, "JWT_SECRET")?;
        let admin_token = secret(&vars, "ADMIN_TOKEN")?;
        let trusted_proxies = match vars.get("TRUSTED_PROXIES") {
            None => TrustedProxies::default(),
            Some(raw) => TrustedProxies::parse(&raw).map_err(|e| invalid("TRUSTED_PROXIES", e))?,
        };
        let max_frame_bytes = vars.positive("WS_MAX_FRAME_BYTES", 64 * 1024)?;
        let ws = WsLimits {
            max_connections: vars.positive("WS_MAX_CONNECTIONS", 15_000)?,
            max_per_client: vars.positive("WS_MAX_PER_CLIENT", 50)?,
            queue_bytes: vars.positive("WS_QUEUE_BYTES", 1024 * 1024)?,
            messages_per_second: vars.positive("WS_RATE_LIMIT", 50)?,
            burst: vars.positive("WS_RATE_BURST", 100)?,
            queue_capacity: vars.positive("WS_QUEUE_CAPACITY", 1024)?,
            idle_timeout: vars.seconds("WS_IDLE_TIMEOUT", 60)?,
            ping_interval: vars.seconds("WS_PING_INTERVAL", 20)?,
            max_rooms: vars.positive("WS_MAX_ROOMS", 20)?,
            max_frame_bytes,
        };
        let http = HttpLimits::from_vars(&vars, &ws)?;
        let config = Config {
            bind: vars.parse("BIND", IpAddr::from([0, 0, 0, 0]))?,
            port: vars.parse("PORT", 8080)?,
            data_dir,
            database,
            redis_url,
            redis_tls,
            jwt_secret,
            admin_token,
            cors_origins,
            instance_id: vars
                .get("INSTANCE_ID")
                .or_else(|| vars.get("HOSTNAME"))
                .unwrap_or_else(|| {
                    format!(
                        "croupier-{}",
                        &uuid::Uuid::new_v4().simple().to_string()[..8]
                    )
                }),
            trust_proxy: vars.flag("TRUST_PROXY", false)?,
            trusted_proxies,
            metrics_bind: vars
                .get("METRICS_BIND")
                .map(|raw| {
                    raw.parse()
                        .map_err(|e| invalid("METRICS_BIND", format!("{raw:?}: {e}")))
                })
                .transpose()?,
            max_history: vars.positive("MAX_HISTORY", 10_000)?,
            max_body_bytes: vars.positive("MAX_BODY_BYTES", 1024 * 1024)?,
            shutdown_grace: vars.seconds("SHUTDOWN_GRACE", 10)?,
            ws,
            auth_attempts_per_minute: vars.positive("AUTH_RATE_LIMIT", 10)?,
            hashing: HashingLimits {
                threads: vars.positive("AUTH_HASH_THREADS", 2)?,
                queue: vars.positive("AUTH_QUEUE", 32)?,
            },
            db: DbOptions {
                max_connections: vars.positive("DB_MAX_CONNECTIONS", 20)?,
                acquire_timeout: vars.millis("DB_ACQUIRE_TIMEOUT_MS", 5_000)?,
                statement_timeout: vars.millis("DB_STATEMENT_TIMEOUT_MS", 5_000)?,
                connect_attempts: vars.positive("DB_CONNECT_ATTEMPTS", 30)?,
            },
            cache_ttl: vars.seconds("CACHE_TTL", 3600)?,
            repair_interval: vars.millis("REPAIR_INTERVAL_MS", 5_000)?,
            cache_max_history: vars.positive("CACHE_MAX_HISTORY", 10_000)?,
            quotas: QuotaConfig {
                writes_per_second: vars.positive("WRITE_RATE_LIMIT", 10)?,
                write_burst: vars.positive("WRITE_RATE_BURST", 30)?,
                rooms_per_minute: vars.positive("ROOM_CREATE_LIMIT", 30)?,
            },
            list_history_max_rooms: vars.positive("LIST_HISTORY_MAX_ROOMS", 20)?,
            max_read_rooms: vars.positive("MAX_READ_ROOMS", 1000)?,
            http,
        };
        Ok(config)
    }

    /// The proxies whose forwarding headers count, when `TRUST_PROXY` is on.
    pub fn proxy_trust(&self) -> Option<&TrustedProxies> {
        self.trust_proxy.then_some(&self.trusted_proxies)
    }

    /// Where the data lives, for the start-up line: the SQLite file, or the
    /// PostgreSQL server and database without credentials.
    pub fn database_location(&self) -> String {
        match &self.database {
            Database::Sqlite(url) => url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .to_owned(),
            Database::Postgres(url) => without_credentials(url),
        }
    }

    /// The Redis server without credentials, or `none` (embedded mode).
    pub fn redis_location(&self) -> String {
        self.redis_url
            .as_deref()
            .map_or_else(|| "none".to_owned(), without_credentials)
    }

    /// True when running as part of a cluster (PostgreSQL store).
    pub fn is_cluster(&self) -> bool {
        matches!(self.database, Database::Postgres(_))
    }
}

/// Shortest accepted `JWT_SECRET` / `ADMIN_TOKEN`: 32 bytes, as much as an
/// HS256 key holds.
pub const MIN_SECRET_BYTES: usize = 32;

/// Text in every placeholder value the repository ships (`.env.example`,
/// `k8s/secret.example.yaml`). A cluster started from an example unchanged would
/// sign tokens with a secret anyone can read, so such values stop start-up.
const PLACEHOLDER_MARKERS: &[&str] = &["change-me", "changeme", "change_me"];

/// An optional secret: unset or empty is `None`; otherwise long enough and not
/// a shipped placeholder.
fn secret<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
    name: &'static str,
) -> Result<Option<String>, ConfigError> {
    let Some(value) = vars.get(name) else {
        return Ok(None);
    };
    let lower = value.to_ascii_lowercase();
    if PLACEHOLDER_MARKERS.iter().any(|m| lower.contains(m)) {
        return Err(invalid(
            name,
            "is a placeholder from the examples; set a random value, e.g. `openssl rand -hex 32`",
        ));
    }
    if value.len() < MIN_SECRET_BYTES {
        return Err(invalid(
            name,
            format!("must be at least {MIN_SECRET_BYTES} bytes, e.g. `openssl rand -hex 32`"),
        ));
    }
    Ok(Some(value))
}

/// A URL's scheme, hosts and path, never its user, password or query.
fn without_credentials(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return "(unparsable URL)".to_owned();
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    // The credentials end at the last '@' before the path.
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let hosts = authority
        .rsplit_once('@')
        .map_or(authority, |(_, hosts)| hosts);
    format!("{scheme}://{hosts}{path}")
}

/// `REDIS_URL`'s scheme and the TLS files that go with `rediss://`.
fn redis_tls<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
    url: Option<&str>,
) -> Result<RedisTlsFiles, ConfigError> {
    let files = RedisTlsFiles {
        ca_cert: vars.get("REDIS_CA_CERT").map(PathBuf::from),
        client_cert: vars.get("REDIS_CLIENT_CERT").map(PathBuf::from),
        client_key: vars.get("REDIS_CLIENT_KEY").map(PathBuf::from),
    };
    let tls = match url {
        None => false,
        Some(url) => {
            // One server, Sentinel or Cluster (crate::redis_layout has the forms).
            crate::redis_layout::fred_url(url).map_err(|reason| invalid("REDIS_URL", reason))?;
            url.starts_with("rediss://")
        }
    };
    // A certificate setting on a plain connection would be silently ignored,
    // which reads like TLS is on when it is not.
    if !tls && files != RedisTlsFiles::default() {
        let name = match (&files.ca_cert, &files.client_cert) {
            (Some(_), _) => "REDIS_CA_CERT",
            (None, Some(_)) => "REDIS_CLIENT_CERT",
            (None, None) => "REDIS_CLIENT_KEY",
        };
        return Err(invalid(name, "needs a rediss:// REDIS_URL"));
    }
    if files.client_cert.is_some() != files.client_key.is_some() {
        let missing = if files.client_cert.is_some() {
            "REDIS_CLIENT_KEY"
        } else {
            "REDIS_CLIENT_CERT"
        };
        return Err(invalid(
            missing,
            "REDIS_CLIENT_CERT and REDIS_CLIENT_KEY must be set together",
        ));
    }
    Ok(files)
}

fn database<F: Fn(&str) -> Option<String>>(
    vars: &Vars<F>,
    data_dir: &std::path::Path,
) -> Result<Database, ConfigError> {
    if let Some(url) = vars.get("DATABASE_URL") {
        return if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Database::Postgres(url))
        } else if url.starts_with("sqlite:") {
            Ok(Database::Sqlite(url))
        } else {
            Err(invalid(
                "DATABASE_URL",
                "must be a postgres:// or sqlite: URL",
            ))
        };
    }
    if let Some(host) = vars.get("DB_HOST") {
        let port: u16 = vars.parse("DB_PORT", 5432)?;
        let user = vars.get("DB_USER").unwrap_or_else(|| "postgres".into());
        let password = vars.get("DB_PASSWORD").unwrap_or_default();
        let name = vars.get("DB_NAME").unwrap_or_else(|| "croupier".into());
        let ssl = vars.get("DB_SSL_MODE").unwrap_or_else(|| "prefer".into());
        const MODES: &[&str] = &[
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ];
        if !MODES.contains(&ssl.as_str()) {
            return Err(invalid(
                "DB_SSL_MODE",
                format!("{ssl:?} is not one of {}", MODES.join(", ")),
            ));
        }
        let bad_host = |_| invalid("DB_HOST", format!("{host:?} is not a valid host name"));
        let mut url = url::Url::parse(&format!("postgres://{host}:{port}")).map_err(bad_host)?;
        let _ = url.set_username(&user);
        if !password.is_empty() {
            let _ = url.set_password(Some(&password));
        }
        url.path_segments_mut()
            .map_err(|_| invalid("DB_HOST", "cannot build a database URL from it"))?
            .push(&name);
        url.query_pairs_mut().append_pair("sslmode", &ssl);
        if let Some(root_cert) = vars.get("DB_SSL_ROOT_CERT") {
            url.query_pairs_mut().append_pair("sslrootcert", &root_cert);
        }
        return Ok(Database::Postgres(url.to_string()));
    }
    Ok(Database::Sqlite(format!(
        "sqlite://{}",
        data_dir.join("croupier.db").display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = config(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert!(matches!(c.database, Database::Sqlite(ref u) if u.ends_with("croupier.db")));
        assert_eq!(c.max_history, 10_000);
        assert_eq!(c.cors_origins, CorsOrigins::Any);
        assert!(!c.is_cluster());
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("PORT", "eighty"),
            ("MAX_HISTORY", "0"),
            ("REDIS_URL", "http://x"),
            ("REDIS_URL", "redis-sentinel://s:26379"),
            ("REDIS_URL", "rediss-cluster://a:7000"),
            ("TRUST_PROXY", "maybe"),
            ("AUTH_QUEUE", "0"),
            ("AUTH_HASH_THREADS", "none"),
        ] {
            let err = config(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn db_variables_build_a_postgres_url() {
        let c = config(&[
            ("DB_HOST", "db"),
            ("DB_USER", "app"),
            ("DB_PASSWORD", "p@ss word"),
            ("DB_NAME", "rooms"),
        ])
        .unwrap();
        assert_eq!(
            c.database,
            Database::Postgres("postgres://app:p%40ss%20word@db:5432/rooms?sslmode=prefer".into())
        );
        assert!(c.is_cluster());
    }

    #[test]
    fn db_ssl_root_cert_joins_the_url() {
        let c = config(&[
            ("DB_HOST", "db.internal"),
            ("DB_SSL_MODE", "verify-full"),
            ("DB_SSL_ROOT_CERT", "/etc/croupier/certs/db ca.pem"),
        ])
        .unwrap();
        assert_eq!(
            c.database,
            Database::Postgres(
                "postgres://postgres@db.internal:5432/croupier?sslmode=verify-full\
                 &sslrootcert=%2Fetc%2Fcroupier%2Fcerts%2Fdb+ca.pem"
                    .into()
            )
        );
    }

    #[test]
    fn rediss_takes_certificates_and_redis_refuses_them() {
        let c = config(&[
            ("REDIS_URL", "rediss://cache:6380"),
            ("REDIS_CA_CERT", "/certs/ca.pem"),
            ("REDIS_CLIENT_CERT", "/certs/client.pem"),
            ("REDIS_CLIENT_KEY", "/certs/client.key"),
        ])
        .unwrap();
        assert_eq!(c.redis_tls.ca_cert, Some(PathBuf::from("/certs/ca.pem")));
        assert_eq!(c.redis_location(), "rediss://cache:6380");
        let err = config(&[
            ("REDIS_URL", "redis://cache:6379"),
            ("REDIS_CA_CERT", "/certs/ca.pem"),
        ])
        .unwrap_err();
        assert_eq!(err.name, "REDIS_CA_CERT");
        let err = config(&[
            ("REDIS_URL", "rediss://cache:6380"),
            ("REDIS_CLIENT_CERT", "/certs/client.pem"),
        ])
        .unwrap_err();
        assert_eq!(err.name, "REDIS_CLIENT_KEY");
    }

    #[test]
    fn placeholder_and_short_secrets_are_refused() {
        let strong = "3f9a1c0e8b7d6a5f4e3d2c1b0a998877";
        for name in ["JWT_SECRET", "ADMIN_TOKEN"] {
            for bad in [
                "change-me-jwt-secret",
                "change-me-jwt-secret-use-openssl-rand-hex-32",
                "change-me-admin-token",
                "our-CHANGEME-value-that-is-long-enough-0123",
                "test-admin-token",
                &strong[..31],
            ] {
                let err = config(&[(name, bad)]).unwrap_err();
                assert_eq!(err.name, name, "{bad:?}");
                assert!(!err.to_string().contains('\n'));
            }
            assert!(config(&[(name, strong)]).is_ok());
        }
        // Empty still means unset: no admin API, a generated embedded secret.
        let c = config(&[("ADMIN_TOKEN", ""), ("JWT_SECRET", " ")]).unwrap();
        assert_eq!((c.admin_token, c.jwt_secret), (None, None));
    }

    #[test]
    fn trusted_proxies_default_to_loopback_and_private_ranges() {
        let c = config(&[]).unwrap();
        for ip in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "fd00::1",
        ] {
            assert!(c.trusted_proxies.contains(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.7", "172.32.0.1", "2001:db8::1"] {
            assert!(!c.trusted_proxies.contains(ip.parse().unwrap()), "{ip}");
        }
        assert!(c.proxy_trust().is_none(), "TRUST_PROXY is off by default");
    }

    #[test]
    fn trusted_proxies_take_networks_and_addresses() {
        let c = config(&[
            ("TRUSTED_PROXIES", "10.0.0.0/8, 203.0.113.7"),
            ("TRUST_PROXY", "1"),
        ])
        .unwrap();
        let proxies = c.proxy_trust().unwrap();
        assert!(proxies.contains("203.0.113.7".parse().unwrap()));
        assert!(proxies.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!proxies.contains("127.0.0.1".parse().unwrap()));
        let err = config(&[("TRUSTED_PROXIES", "10.0.0.0/33")]).unwrap_err();
        assert_eq!(err.name, "TRUSTED_PROXIES");
    }

    #[test]
    fn metrics_bind_is_an_address() {
        assert_eq!(config(&[]).unwrap().metrics_bind, None);
        let c = config(&[("METRICS_BIND", "127.0.0.1:9100")]).unwrap();
        assert_eq!(c.metrics_bind, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(
            config(&[("METRICS_BIND", "9100")]).unwrap_err().name,
            "METRICS_BIND"
        );
    }

    #[test]
    fn the_http_cap_follows_the_websocket_cap() {
        let c = config(&[("WS_MAX_CONNECTIONS", "40000")]).unwrap();
        assert_eq!(c.http.max_connections, 41_000);
        let err =
            config(&[("WS_MAX_CONNECTIONS", "50"), ("HTTP_MAX_CONNECTIONS", "50")]).unwrap_err();
        assert_eq!(err.name, "HTTP_MAX_CONNECTIONS");
    }

    #[test]
    fn locations_never_show_credentials() {
        let c = config(&[
            (
                "DATABASE_URL",
                "postgres://app:s3cret@db1:5432,db2:5432/rooms?sslmode=require&password=x",
            ),
            ("REDIS_URL", "redis://:hunter2@cache:6379/0"),
        ])
        .unwrap();
        assert_eq!(c.database_location(), "postgres://db1:5432,db2:5432/rooms");
        assert_eq!(c.redis_location(), "redis://cache:6379/0");
        let c = config(&[("DATA_DIR", "/var/lib/croupier")]).unwrap();
        assert_eq!(c.database_location(), "/var/lib/croupier/croupier.db");
        assert_eq!(c.redis_location(), "none");
    }

    #[test]
    fn cors_list_is_parsed() {
        let c = config(&[("CORS_ORIGINS", "http://a.test, https://b.test/")]).unwrap();
        assert!(c.cors_origins.allows("https://b.test"));
        assert!(!c.cors_origins.allows("https://c.test"));
    }
}
