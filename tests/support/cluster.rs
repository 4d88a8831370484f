//! A whole local cluster: PostgreSQL, Redis, N croupier instances sharing them,
//! and Nginx in front — every one a real server on free loopback ports.

use std::net::SocketAddr;
use std::process::{Command, Stdio};

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
    /// Starts the dependencies, migrates the schema with `croupier migrate`, starts
    /// `n` instances (named node-1..node-n) and Nginx over them.
    pub async fn start(n: usize, extra_env: &[(&str, &str)]) -> TestCluster {
        let postgres = TestPostgres::start_new().await;
        let redis = TestRedis::start_new().await;
        let status = Command::new(env!("CARGO_BIN_EXE_croupier"))
            .arg("migrate")
            .env("DATABASE_URL", postgres.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .status()
            .expect("running croupier migrate");
        assert!(status.success(), "croupier migrate failed");

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
            instances.push(TestServer::start(&env).await);
        }
        let upstreams: Vec<_> = instances.iter().map(|s| s.addr).collect();
        let nginx = TestNginx::start(&upstreams).await;
        TestCluster { postgres, redis, instances, nginx }
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

    /// An HTTP client that trusts Nginx's generated certificate, for `https_url`.
    pub fn https_client(&self) -> reqwest::Client {
        let certificate = reqwest::Certificate::from_pem(&self.nginx.certificate_pem()).expect("test certificate");
        reqwest::Client::builder()
            .no_proxy()
            .add_root_certificate(certificate)
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
        let row = sqlx::query("SELECT history::text AS history, version FROM rooms WHERE key = $1")
            .bind(key)
            .fetch_optional(&db)
            .await
            .expect("reading the room from PostgreSQL");
        db.close().await;
        row.map(|row| {
            let history: String = row.get("history");
            let version: i64 = row.get("version");
            (serde_json::from_str(&history).expect("history is JSON"), version as u64)
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
                payload: serde_json::from_str(row.get::<&str, _>("payload")).expect("payload is JSON"),
                mutation_id: row.get("mutation_id"),
            })
            .collect()
    }
}

/// One row of `room_events`.
#[derive(Debug, Clone, PartialEq)]
pub struct DbEvent {
    pub version: u64,
    pub kind: String,
    pub payload: Value,
    pub mutation_id: Option<String>,
}
