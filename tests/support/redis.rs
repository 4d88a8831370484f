//! A real, throwaway Redis server for integration tests.
//!
//! [`TestRedis::start_new`] runs the Debian `redis-server` binary (or the one
//! named by `REDIS_SERVER_BIN`) on a free loopback port, in a fresh temporary
//! directory, with persistence off (`--save '' --appendonly no`), and waits until
//! it answers `PING`. [`TestRedis::stop`] kills it and [`TestRedis::start`] brings
//! it back on the same port and directory, for outage tests. An explicit `SAVE`
//! before a stop is loaded again on the next start, which lets a test bring back
//! old data on purpose. Dropping the value kills the server and deletes its
//! directory.
//!
//! [`TestRedis::start_tls`] starts a TLS-only server instead (`--port 0`,
//! `--tls-port`), optionally requiring client certificates from its CA; its
//! readiness is an accepted TCP connection, since `PING` would need TLS.
//!
//! A missing binary is a test failure with a clear message, never a silent skip:
//! a Redis test that did not run must not look like one that passed.

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::{free_port, listens_on, signal_group};
use super::tls::CertPair;

const DEFAULT_BIN: &str = "/usr/bin/redis-server";
/// How long a starting server may take to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or deliberately stopped) Redis server owned by one test.
pub struct TestRedis {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    server: Option<Child>,
    tls: Option<RedisTls>,
}

/// How a TLS-only test server is set up.
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub server: CertPair,
    /// The CA that client certificates must come from.
    pub ca: PathBuf,
    /// `--tls-auth-clients yes`: refuse clients without such a certificate.
    pub require_client_cert: bool,
}

impl TestRedis {
    /// Starts a fresh, empty server.
    ///
    /// Panics (failing the test) if `redis-server` is missing or does not come up.
    pub async fn start_new() -> TestRedis {
        Self::start_with(None).await
    }

    /// Starts a fresh server that speaks TLS only.
    pub async fn start_tls(tls: RedisTls) -> TestRedis {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<RedisTls>) -> TestRedis {
        let bin = redis_binary();
        let mut dir = tempfile::Builder::new()
            .prefix("croupier-redis-")
            .tempdir()
            .expect("creating a temporary directory for Redis");
        // Another process may grab the free port between our probe and Redis's
        // bind; a few fresh ports make that race harmless.
        for _ in 0..5 {
            let mut redis = TestRedis {
                bin: bin.clone(),
                dir,
                port: free_port(),
                server: None,
                tls: tls.clone(),
            };
            if redis.try_start().await.is_ok() {
                return redis;
            }
            dir = redis.take_dir();
        }
        panic!(
            "redis-server did not start on a free port; log:\n{}",
            read_log(dir.path())
        );
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Kills the server (no shutdown save), simulating a crash or an outage,
    /// with its whole process group (a background save would be a child).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub async fn start(&mut self) {
        assert!(self.server.is_none(), "Redis is already running");
        // The port was ours a moment ago; retry briefly in case a client's
        // socket still holds it.
        let mut last_error = String::new();
        for _ in 0..10 {
            match self.try_start().await {
                Ok(()) => return,
                Err(reason) => last_error = reason,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "restarting redis-server on port {} failed: {last_error}; log:\n{}",
            self.port,
            read_log(self.dir.path())
        );
    }

    /// Spawns the server and waits until it answers `PING` on a socket it
    /// holds itself: another test's Redis on the same port would answer too.
    async fn try_start(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let mut command = Command::new(&self.bin);
        match &self.tls {
            None => {
                command.arg("--port").arg(self.port.to_string());
            }
            Some(tls) => {
                let auth = if tls.require_client_cert { "yes" } else { "no" };
                command
                    .args(["--port", "0", "--tls-port"])
                    .arg(self.port.to_string())
                    .arg("--tls-cert-file")
                    .arg(&tls.server.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.server.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", auth]);
            }
        }
        let child = command
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.bin.display()))?;
        let pid = child.id();
        self.server = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = match self.tls {
                None => ping(self.port).await,
                Some(_) => accepts(self.port).await,
            };
            if ready && listens_on(pid, self.port) {
                return Ok(());
            }
            let exited = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.server = None;
                return Err(format!("redis-server exited with {status}"));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("no PONG within {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn take_dir(mut self) -> TempDir {
        self.stop();
        let placeholder = tempfile::tempdir().expect("creating a temporary directory");
        std::mem::replace(&mut self.dir, placeholder)
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_binary() -> PathBuf {
    let bin = std::env::var_os("REDIS_SERVER_BIN")
        .map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
    if !bin.is_file() {
        panic!(
            "redis-server not found at {}: install the Debian package `redis-server` \
             (apt-get install -y redis-server) or set REDIS_SERVER_BIN; the Redis tests \
             need a real server and are never skipped",
            bin.display()
        );
    }
    bin
}

/// One `PING` over a fresh connection, with a short timeout.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut reply = [0u8; 7];
        stream.read_exact(&mut reply).await.ok()?;
        (&reply == b"+PONG\r\n").then_some(())
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// A TCP connection is accepted (a TLS server listens only once it is ready).
async fn accepts(port: u16) -> bool {
    let connect = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_millis(500), connect).await,
        Ok(Ok(_))
    )
}

fn read_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("redis.log")).unwrap_or_else(|_| "(no log)".to_owned())
}
