//! A whole local cluster: PostgreSQL, Redis, N croupier instances sharing them,
//! and Nginx in front — every one a real server on free loopback ports.

use std::process::{Command, Stdio};

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
}
