//! A whole local cluster: PostgreSQL, Redis, N croupier instances sharing them,
//! and Nginx in front — every one a real server on free loopback ports. An
//! instance restarted by a test comes back on its old port, which Nginx's
//! upstream names.

use std::net::SocketAddr;

use serde_json::Value;
use sqlx::Row;

use super::app::TestServer;
use super::nginx::TestNginx;
use super::postgres::TestPostgres;
use super::redis::TestRedis;

/// The token secret every instance of a test cluster shares.
pub const JWT_SECRET: &str = "cluster-test-secret-0123456789abcdef";

pub struct TestCluster {
    pub postgres: TestPostgres,
    pub redis: TestRedis,
    pub instances: Vec<TestServer>,
    pub nginx: TestNginx,
}

impl TestCluster {
    /// Starts the dependencies, migrates the schema with `croupier migrate --contract`, starts
    /// `n` instances (named node-1..node-n) and Nginx over them.
    pub async fn start(n: usize, extra_env: &[(&str, &str)]) -> TestCluster {
        let postgres = TestPostgres::start_new().await;
        let redis = TestRedis::start_new().await;
        // The schema a deployment ends on (expand and contract); the
        // expanded-only schema of a rolling upgrade has its own tests.
        super::app::migrate(&postgres.url(), true);

        let mut instances = Vec::with_capacity(n);
        for i in 1..=n {
            let name = format!("node-{i}");
            let (pg, redis_url) = (postgres.url(), redis.url());
            let mut env: Vec<(&str, &str)> = vec![
                ("DATABASE_URL", &pg),
                ("REDIS_URL", &redis_url),
                ("JWT_SECRET", JWT_SECRET),
                ("INSTANCE_ID", &name),
                ("TRUST_PROXY", "true"),
            ];
            env.extend_from_slice(extra_env);
            let mut instance = TestServer::start(&env).await;
            // Nginx's upstream names each instance by port.
            instance.keep_port_on_restart();
            instances.push(instance);
        }
        let upstreams: Vec<_> = instances.iter().map(|s| s.addr).collect();
        let nginx = TestNginx::start(&upstreams).await;
        TestCluster {
            postgres,
            redis,
            instances,
            nginx,
        }
    }

    /// URL of `path` through Nginx.
    pub fn url(&self, path: &str) -> String {
        self.nginx.http_url(path)
    }

    /// WebSocket URL through Nginx.
    pub fn ws_url(&self) -> String {
        self.nginx.ws_url()
    }

    /// A handle on Nginx's plain-HTTP port with the same helpers as an instance
    /// (`get`, `post`, `call`, `ws`...); it owns no process.
    pub fn front(&self) -> TestServer {
        TestServer::remote(SocketAddr::from(([127, 0, 0, 1], self.nginx.http_port)))
    }

    /// An HTTP client that accepts Nginx's generated certificate (pinned, see
    /// [`super::app::tls_pinned`]), for `nginx.https_url`.
    pub fn https_client(&self) -> reqwest::Client {
        let tls = super::app::tls_pinned(&self.nginx.certificate_pem());
        reqwest::Client::builder()
            .no_proxy()
            .use_preconfigured_tls((*tls).clone())
            .build()
            .expect("https client")
    }

    /// A direct connection to the cluster's database, bypassing every instance
    /// and the Redis cache.
    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.postgres.url())
            .await
            .expect("connecting to the test database")
    }

    /// The room as PostgreSQL holds it: `(history, version)`, `None` if it was
    /// never created.
    pub async fn db_room(&self, key: &str) -> Option<(Value, u64)> {
        let db = self.db().await;
        let row = sqlx::query(super::postgres::ROOM_SQL)
            .bind(key)
            .fetch_optional(&db)
            .await
            .expect("reading the room from PostgreSQL");
        db.close().await;
        row.map(|row| {
            let history: String = row.get("history");
            let version: i64 = row.get("version");
            (
                serde_json::from_str(&history).expect("history is JSON"),
                version as u64,
            )
        })
    }

    /// The room's event log as PostgreSQL holds it, oldest first.
    pub async fn db_events(&self, key: &str) -> Vec<DbEvent> {
        let db = self.db().await;
        let rows = sqlx::query(
            "SELECT e.version, e.kind, e.payload::text AS payload, e.mutation_id
             FROM room_events e JOIN rooms r ON r.id = e.room_id
             WHERE r.key = $1 ORDER BY e.version",
        )
        .bind(key)
        .fetch_all(&db)
        .await
        .expect("reading the event log from PostgreSQL");
        db.close().await;
        rows.iter()
            .map(|row| DbEvent {
                version: row.get::<i64, _>("version") as u64,
                kind: row.get("kind"),
                payload: serde_json::from_str(row.get::<&str, _>("payload"))
                    .expect("payload is JSON"),
                mutation_id: row.get("mutation_id"),
            })
            .collect()
    }
}

impl TestCluster {
    /// A command connection to the cluster's Redis, opened now.
    pub async fn redis_admin(&self) -> RedisAdmin {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.redis.port()))
            .await
            .expect("connecting to Redis");
        RedisAdmin {
            stream: tokio::io::BufReader::new(stream),
        }
    }
}

/// One raw connection to Redis for test manipulations (`CLIENT KILL`, `CONFIG
/// SET`); it stays usable while new connections are refused.
pub struct RedisAdmin {
    stream: tokio::io::BufReader<tokio::net::TcpStream>,
}

impl RedisAdmin {
    /// Sends one command and returns the reply's text (a bulk string's contents,
    /// or the status, integer or error line).
    pub async fn command(&mut self, args: &[&str]) -> String {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .expect("writing to Redis");
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .await
            .expect("reading from Redis");
        match line
            .strip_prefix('$')
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            Some(len) => {
                let mut body = vec![0; len + 2];
                self.stream
                    .read_exact(&mut body)
                    .await
                    .expect("reading a bulk reply");
                String::from_utf8_lossy(&body[..len]).into_owned()
            }
            None => line,
        }
    }

    /// How many clients Redis has connected, this one included.
    pub async fn client_count(&mut self) -> usize {
        self.command(&["CLIENT", "LIST"])
            .await
            .lines()
            .filter(|l| l.starts_with("id="))
            .count()
    }

    /// Closes `instance`'s Redis connections of `kind` (`normal`: the command and
    /// publishing connection; `pubsub`: the subscriber) from the Redis side, as a
    /// network blip or a proxy reset would. Returns how many were closed.
    pub async fn kill_links(&mut self, instance: &TestServer, kind: &str) -> usize {
        let ports = local_tcp_ports(instance.pid());
        let list = self.command(&["CLIENT", "LIST", "TYPE", kind]).await;
        let mut killed = 0;
        for line in list.lines() {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|f| f.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            };
            let port = field("addr")
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let (Some(id), Some(port)) = (field("id"), port)
                && ports.contains(&port)
            {
                let reply = self.command(&["CLIENT", "KILL", "ID", id]).await;
                assert_eq!(reply.trim(), ":1", "CLIENT KILL ID {id}");
                killed += 1;
            }
        }
        killed
    }
}

/// Local ports of the TCP sockets process `pid` holds (from `/proc`).
fn local_tcp_ports(pid: u32) -> std::collections::HashSet<u16> {
    let inodes = super::process::socket_inodes(pid);
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            inodes.contains(*fields.get(9)?).then_some(port)
        })
        .collect()
}

/// One row of `room_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct DbEvent {
    pub version: u64,
    pub kind: String,
    pub payload: Value,
    pub mutation_id: Option<String>,
}

impl Drop for TestCluster {
    /// Stops the instances before their dependencies (fields drop in declaration
    /// order, PostgreSQL and Redis first), so that they do not log a Redis or
    /// database outage while the test is being torn down.
    fn drop(&mut self) {
        for instance in &mut self.instances {
            instance.kill();
        }
    }
}
