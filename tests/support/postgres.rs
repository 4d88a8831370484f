//! A real, throwaway PostgreSQL server for integration tests.
//!
//! [`TestPostgres::start_new`] finds the server binaries of the Debian
//! `postgresql` package (`/usr/lib/postgresql/<major>/bin`, or the directory named
//! by `POSTGRES_BIN_DIR`), runs `initdb` into a fresh temporary directory and
//! starts `postgres` in its own process group on a free loopback port with `fsync` on, its Unix socket
//! inside that directory, and trust authentication for the `postgres` role. It
//! then creates a `croupier` database, whose URL [`TestPostgres::url`] returns.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the server
//! processes are started as the unprivileged `postgres` system user (created with
//! `useradd` if the package did not create it), and the temporary directory is
//! handed over to that user.
//!
//! [`TestPostgres::start_tls`] starts the same server accepting TLS only:
//! `ssl=on` with the given certificate, and a `pg_hba.conf` whose TCP lines
//! are all `hostssl`, so a plain connection is refused. The tooling (readiness
//! check) keeps using the Unix socket.
//!
//! [`TestPostgres::stop`] and [`TestPostgres::start`] shut the server down and
//! bring it back on the same data directory and port, for outage tests;
//! [`TestPostgres::stop_immediately`] simulates a crash (no checkpoint, WAL
//! recovery on the next start). Dropping the value kills the server and deletes
//! its directory.
//!
//! Missing binaries are a test failure with a clear message, never a silent skip:
//! a PostgreSQL test that did not run must not look like one that passed.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::process::{free_port, signal_group, signal_process, stop_group};
use super::tls::CertPair;

/// The superuser role `initdb` creates; trust authentication, no password.
const SUPERUSER: &str = "postgres";
/// The database created for the tests.
const DATABASE: &str = "croupier";
/// How long a starting server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// A room's history (as JSON text) and version, read straight from the
/// tables: works on an expanded and on a contracted schema alike.
pub const ROOM_SQL: &str = "SELECT coalesce((SELECT json_agg(CASE WHEN n.number = '00' THEN to_json(n.number) \
     ELSE to_json(n.number::int) END ORDER BY n.seq) FROM room_numbers n WHERE n.room_id = r.id), \
     '[]'::json)::text AS history, r.version FROM rooms r WHERE r.key = $1";

/// The name a standby reports to its primary (for synchronous replication).
const STANDBY_NAME: &str = "croupier_standby";

/// The OS account the server processes run as (only set when running as root).
#[derive(Debug, Clone, Copy)]
struct Account {
    uid: u32,
    gid: u32,
}

/// A running (or deliberately stopped) PostgreSQL server owned by one test.
pub struct TestPostgres {
    bin: PathBuf,
    dir: TempDir,
    port: u16,
    account: Option<Account>,
    server: Option<Child>,
    /// TLS only, with the certificate copied into the directory.
    tls: bool,
}

impl TestPostgres {
    /// Initialises and starts a fresh server with an empty `croupier` database.
    ///
    /// Panics (failing the test) if the PostgreSQL server binaries are missing or
    /// the server does not come up.
    pub async fn start_new() -> TestPostgres {
        Self::start_with(None).await
    }

    /// Like [`TestPostgres::start_new`], but serving TLS only, with `server`'s
    /// certificate and key.
    pub async fn start_tls(server: &CertPair) -> TestPostgres {
        Self::start_with(Some(server)).await
    }

    async fn start_with(tls: Option<&CertPair>) -> TestPostgres {
        let bin = find_bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries not found: looked for initdb and postgres in \
                 $POSTGRES_BIN_DIR and /usr/lib/postgresql/*/bin. Install the `postgresql` \
                 package (Debian/Ubuntu) or set POSTGRES_BIN_DIR; these tests need a real server."
            )
        });
        let account = if running_as_root() {
            Some(server_account())
        } else {
            None
        };
        let mut pg = TestPostgres {
            bin,
            dir: server_dir(account),
            port: 0,
            account,
            server: None,
            tls: tls.is_some(),
        };
        pg.initdb().await;
        if let Some(pair) = tls {
            pg.install_tls(pair);
        }
        pg.launch_on_a_free_port().await;
        pg.create_database(DATABASE).await;
        pg
    }

    /// A free port can be taken by someone else before the server binds it;
    /// tries a few before giving up.
    async fn launch_on_a_free_port(&mut self) {
        let mut last_error = String::new();
        for _ in 0..5 {
            self.port = free_port();
            match self.launch().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// Starts a hot standby of this server: a base backup (`pg_basebackup -R`)
    /// that streams the primary's WAL from then on. With `synchronous`, the
    /// primary waits for the standby to have each commit before confirming it,
    /// so a failover to it loses nothing acknowledged; without, the standby
    /// may lag and a failover can lose the newest commits.
    pub async fn start_standby(&self, synchronous: bool) -> TestPostgres {
        let mut standby = TestPostgres {
            bin: self.bin.clone(),
            dir: server_dir(self.account),
            port: 0,
            account: self.account,
            server: None,
            tls: false,
        };
        let output = standby
            .command("pg_basebackup")
            .arg("-D")
            .arg(standby.data_dir())
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
            ])
            .args(["-X", "stream", "-R", "--no-sync", "-c", "fast"])
            .output()
            .await
            .expect("running pg_basebackup");
        assert!(
            output.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Later lines win: name the standby (the primary lists synchronous
        // standbys by name), and once promoted it must not wait for a standby
        // of its own, which the copied settings would otherwise make it do.
        let settings = format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} application_name={STANDBY_NAME}'\n\
             synchronous_standby_names = ''\n",
            self.port
        );
        let auto_conf = standby.data_dir().join("postgresql.auto.conf");
        let mut conf = fs::read_to_string(&auto_conf).unwrap_or_default();
        conf.push_str(&settings);
        fs::write(&auto_conf, conf).expect("configuring the standby");
        standby.launch_on_a_free_port().await;
        if synchronous {
            self.sql(
                "postgres",
                &format!("ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"),
            )
            .await;
            self.sql("postgres", "SELECT pg_reload_conf()").await;
            let deadline = Instant::now() + READY_TIMEOUT;
            while self
                .sql(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                )
                .await
                != "1"
            {
                assert!(
                    Instant::now() < deadline,
                    "the standby never became synchronous"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        standby
    }

    /// Promotes this standby to primary and waits until it accepts writes.
    pub async fn promote(&self) {
        let output = self
            .command("pg_ctl")
            .arg("promote")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-w")
            .output()
            .await
            .expect("running pg_ctl promote");
        assert!(
            output.status.success(),
            "pg_ctl promote failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs one SQL statement through the Unix socket and returns its
    /// unaligned, tuples-only output.
    pub async fn sql(&self, database: &str, statement: &str) -> String {
        let output = self
            .command("psql")
            .arg("-h")
            .arg(self.dir.path().join("socket"))
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", statement])
            .output()
            .await
            .expect("running psql");
        assert!(
            output.status.success(),
            "psql {statement:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// URL of the test database.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// URL of another database on this server.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory (for inspecting logs or files).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log so far (stdout and stderr of every start).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Creates another empty database on this server and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let output = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                name,
            ])
            .output()
            .await
            .expect("running createdb");
        assert!(
            output.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        self.url_for(name)
    }

    /// Shuts the server down cleanly ("fast" mode: sessions are terminated,
    /// a checkpoint is written) and waits until it has exited.
    pub async fn stop(&mut self) {
        self.shutdown(libc::SIGINT).await;
    }

    /// Shuts the server down like a crash ("immediate" mode: no checkpoint, the
    /// next start replays the WAL).
    pub async fn stop_immediately(&mut self) {
        self.shutdown(libc::SIGQUIT).await;
    }

    /// Starts the server again on the same data directory and port.
    pub async fn start(&mut self) {
        assert!(self.server.is_none(), "PostgreSQL is already running");
        // The port was ours a moment ago; retry briefly in case the old sockets
        // are still being torn down.
        let mut last_error = String::new();
        for _ in 0..10 {
            match self.launch().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "PostgreSQL did not restart on port {}: {last_error}",
            self.port
        );
    }

    async fn initdb(&self) {
        let data = self.data_dir();
        let mut cmd = self.command("initdb");
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            // Only skips syncing the freshly created files; the server itself runs with fsync on.
            .arg("--no-sync");
        let output = cmd.output().await.expect("running initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Copies the certificate and key where the server account can read them
    /// (PostgreSQL insists on an owner-only key) and allows TCP over TLS only.
    fn install_tls(&self, pair: &CertPair) {
        let data = self.data_dir();
        for (from, to) in [(&pair.cert, "server.crt"), (&pair.key, "server.key")] {
            let target = data.join(to);
            fs::copy(from, &target).expect("copying the server certificate");
            std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("restricting the server key");
            if let Some(account) = self.account {
                std::os::unix::fs::chown(&target, Some(account.uid), Some(account.gid))
                    .expect("handing the certificate to the postgres user");
            }
        }
        // No plain `host` line: a connection without TLS matches nothing and is refused.
        let hba = "local all all trust\n\
                   hostssl all all 127.0.0.1/32 trust\n\
                   hostssl all all ::1/128 trust\n";
        fs::write(data.join("pg_hba.conf"), hba).expect("writing pg_hba.conf");
    }

    /// Spawns `postgres` and waits until it accepts connections.
    async fn launch(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .map_err(|e| format!("opening the server log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let socket_dir = self.dir.path().join("socket");
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", socket_dir.display()))
            .args([
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                "-c",
                "full_page_writes=on",
            ])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=128MB"])
            .args([
                "-c",
                "logging_collector=off",
                "-c",
                "log_min_messages=warning",
            ])
            .args(if self.tls {
                // Relative to the data directory.
                &[
                    "-c",
                    "ssl=on",
                    "-c",
                    "ssl_cert_file=server.crt",
                    "-c",
                    "ssl_key_file=server.key",
                ][..]
            } else {
                &[][..]
            })
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("spawning postgres: {e}"))?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!(
                    "postgres exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            if self.accepts_connections().await {
                self.server = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                if let Some(pid) = child.id() {
                    signal_group(pid, libc::SIGKILL);
                }
                let _ = child.kill().await;
                return Err(format!(
                    "not accepting connections after {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks through the Unix socket in our own directory, so that a foreign
    /// server that happens to hold the port can never be mistaken for ours.
    async fn accepts_connections(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .arg("-q")
            .arg("-h")
            .arg(self.dir.path().join("socket"))
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
            ])
            .status()
            .await
            .is_ok_and(|s| s.success())
    }

    async fn shutdown(&mut self, signal: i32) {
        let Some(mut child) = self.server.take() else {
            return;
        };
        let pid = child.id();
        if let Some(pid) = pid {
            signal_process(pid, signal);
        }
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        // Whatever the postmaster left behind (it normally leaves nothing).
        if let Some(pid) = pid {
            signal_group(pid, libc::SIGKILL);
        }
    }

    /// A command for a server binary, run as the server's account when we are root.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some(account) = self.account {
            cmd.uid(account.uid).gid(account.gid);
        }
        // Its own process group, so that stopping it can take every backend
        // with it even when the postmaster is gone.
        cmd.process_group(0);
        cmd
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let Some(mut child) = self.server.take() else {
            return;
        };
        // Immediate shutdown: the postmaster stops its backends and removes its
        // shared memory, unlike a SIGKILL which would orphan them; the group is
        // killed after it, or after 10 s.
        if let Some(pid) = child.id() {
            stop_group(pid, libc::SIGQUIT, Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
        }
        let _ = child.start_kill();
    }
}

/// A fresh temporary directory for one server, with its socket directory,
/// owned by the server's account.
fn server_dir(account: Option<Account>) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("croupier-pg-")
        .tempdir()
        .expect("creating a temporary directory for PostgreSQL");
    let socket_dir = dir.path().join("socket");
    fs::create_dir(&socket_dir).expect("creating the socket directory");
    if let Some(account) = account {
        for path in [dir.path(), socket_dir.as_path()] {
            std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
                .unwrap_or_else(|e| panic!("handing {} to the postgres user: {e}", path.display()));
        }
    }
    dir
}

/// The newest server binaries: `$POSTGRES_BIN_DIR`, then the Debian layout.
fn find_bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "pg_isready", "createdb"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("POSTGRES_BIN_DIR").map(PathBuf::from) {
        return complete(&dir).then_some(dir);
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            complete(&bin).then_some((major, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The unprivileged account that runs the server when the tests run as root.
fn server_account() -> Account {
    if let Some(account) = lookup_account("postgres") {
        return account;
    }
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "postgres",
        ])
        .status();
    // A concurrent test may have created it first; look again either way.
    lookup_account("postgres").unwrap_or_else(|| {
        panic!("running as root and no `postgres` user exists (useradd: {status:?}); PostgreSQL refuses to run as root")
    })
}

fn lookup_account(name: &str) -> Option<Account> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || fields[0] != name {
            return None;
        }
        Some(Account {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
        })
    })
}
