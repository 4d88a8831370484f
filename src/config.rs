//! Configuration from the environment (and an optional `.env` file, loaded by
//! `main`). Every value has a sane default; a value that does not parse stops
//! start-up with one line naming the variable.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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
    /// Shared HS256 secret; `None` in embedded mode means "generate and persist one".
    pub jwt_secret: Option<String>,
    pub admin_token: Option<String>,
    pub cors_origins: CorsOrigins,
    pub instance_id: String,
    /// Use `X-Forwarded-For` / `X-Real-IP` for client addresses (behind Nginx).
    pub trust_proxy: bool,
    pub max_history: usize,
    pub max_body_bytes: usize,
    pub shutdown_grace: Duration,
    pub ws: WsLimits,
    pub auth_attempts_per_minute: u32,
    pub db: DbOptions,
    pub cache_ttl: Duration,
    pub cache_max_history: usize,
    pub http: HttpLimits,
}

/// Per-connection WebSocket limits.
#[derive(Debug, Clone)]
pub struct WsLimits {
    pub max_connections: usize,
    pub messages_per_second: u32,
    pub burst: u32,
    pub queue_capacity: usize,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub max_rooms: usize,
    pub max_frame_bytes: usize,
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
        if let Some(url) = &redis_url
            && !url.starts_with("redis://")
        {
            // TLS to Redis (rediss://) is not built in; Redis is expected on the
            // private network next to the instances.
            return Err(invalid("REDIS_URL", "must start with redis://"));
        }
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
        let jwt_secret = vars.get("JWT_SECRET");
        if jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err(invalid("JWT_SECRET", "must be at least 16 characters"));
        }
        let max_frame_bytes = vars.positive("WS_MAX_FRAME_BYTES", 64 * 1024)?;
        let ws = WsLimits {
            max_connections: vars.positive("WS_MAX_CONNECTIONS", 15_000)?,
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
            jwt_secret,
            admin_token: vars.get("ADMIN_TOKEN"),
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
            max_history: vars.positive("MAX_HISTORY", 10_000)?,
            max_body_bytes: vars.positive("MAX_BODY_BYTES", 1024 * 1024)?,
            shutdown_grace: vars.seconds("SHUTDOWN_GRACE", 10)?,
            ws,
            auth_attempts_per_minute: vars.positive("AUTH_RATE_LIMIT", 10)?,
            db: DbOptions {
                max_connections: vars.positive("DB_MAX_CONNECTIONS", 20)?,
                acquire_timeout: vars.millis("DB_ACQUIRE_TIMEOUT_MS", 5_000)?,
                statement_timeout: vars.millis("DB_STATEMENT_TIMEOUT_MS", 5_000)?,
                connect_attempts: vars.positive("DB_CONNECT_ATTEMPTS", 30)?,
            },
            cache_ttl: vars.seconds("CACHE_TTL", 3600)?,
            cache_max_history: vars.positive("CACHE_MAX_HISTORY", 10_000)?,
            http,
        };
        Ok(config)
    }

    /// True when running as part of a cluster (PostgreSQL store).
    pub fn is_cluster(&self) -> bool {
        matches!(self.database, Database::Postgres(_))
    }
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
            ("TRUST_PROXY", "maybe"),
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
    fn the_http_cap_follows_the_websocket_cap() {
        let c = config(&[("WS_MAX_CONNECTIONS", "40000")]).unwrap();
        assert_eq!(c.http.max_connections, 41_000);
        let err =
            config(&[("WS_MAX_CONNECTIONS", "50"), ("HTTP_MAX_CONNECTIONS", "50")]).unwrap_err();
        assert_eq!(err.name, "HTTP_MAX_CONNECTIONS");
    }

    #[test]
    fn cors_list_is_parsed() {
        let c = config(&[("CORS_ORIGINS", "http://a.test, https://b.test/")]).unwrap();
        assert!(c.cors_origins.allows("https://b.test"));
        assert!(!c.cors_origins.allows("https://c.test"));
    }
}
