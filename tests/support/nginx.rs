//! A real Nginx in front of local instances, using the repository's `nginx/`
//! configuration: the files are copied to a temporary prefix, `upstream.conf` is
//! rewritten to point at the instances, the listen ports become free loopback
//! ports, and a throwaway self-signed certificate is generated for the TLS server.
//! Nginx runs in its own process group and is stopped with its workers.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{free_port, listens_on, stop_group};

const NGINX: &str = "/usr/sbin/nginx";

pub struct TestNginx {
    child: Option<Child>,
    pub http_port: u16,
    pub https_port: u16,
    dir: tempfile::TempDir,
}

impl TestNginx {
    /// Starts Nginx balancing over `upstreams`; panics with a clear message when
    /// the binary is missing (the test command installs it).
    pub async fn start(upstreams: &[SocketAddr]) -> TestNginx {
        assert!(
            Path::new(NGINX).exists(),
            "{NGINX} not found: install the Debian package `nginx`"
        );
        let mut dir = tempfile::Builder::new()
            .prefix("croupier-nginx-")
            .tempdir()
            .expect("temp dir");
        let upstream: String = upstreams
            .iter()
            .map(|a| format!("server {a} max_fails=3 fail_timeout=5s;\n"))
            .collect();
        std::fs::write(dir.path().join("upstream.conf"), upstream).expect("writing upstream.conf");
        make_certificate(&dir.path().join("certs"));

        // Another server can take a probed port before Nginx binds it: then
        // Nginx gives up on its own (after about 2.5 s of retries) or a check
        // finds the port held by someone else, and a fresh pair is tried.
        let mut last_error = String::new();
        for _ in 0..5 {
            let (http_port, https_port) = (free_port(), free_port());
            if http_port == https_port {
                continue;
            }
            write_config(dir.path(), http_port, https_port);
            let child = spawn(dir.path());
            let mut nginx = TestNginx {
                child: Some(child),
                http_port,
                https_port,
                dir,
            };
            match nginx.wait_listening().await {
                Ok(()) => return nginx,
                Err(e) => {
                    last_error = e;
                    nginx.stop();
                    dir = std::mem::replace(&mut nginx.dir, tempfile::tempdir().expect("temp dir"));
                }
            }
        }
        panic!("nginx did not start: {last_error}");
    }

    /// Waits until the master holds both listening sockets; an early exit or a
    /// timeout is an error carrying Nginx's log.
    async fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err("not running".into());
            };
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("nginx exited with {status}; log:\n{}", self.log()));
            }
            let pid = child.id();
            if listens_on(pid, self.http_port) && listens_on(pid, self.https_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "nginx did not listen on {} and {} within 15 s; log:\n{}",
                    self.http_port,
                    self.https_port,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What Nginx wrote to stderr (its error log) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nginx.log")).unwrap_or_default()
    }

    /// Stops Nginx and its workers: SIGTERM (fast shutdown) to the master, then
    /// SIGKILL to its process group, where workers that outlived the master
    /// would otherwise keep listening.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_group(child.id(), libc::SIGTERM, Duration::from_secs(3), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https_port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.http_port)
    }

    pub fn wss_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.https_port)
    }

    /// The generated certificate (PEM), for clients that must trust it.
    pub fn certificate_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("certs/tls.crt")).expect("reading test certificate")
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

impl Drop for TestNginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies the repository's configuration into `dir` with the listen ports
/// rewritten to loopback `http_port` and `https_port`.
fn write_config(dir: &Path, http_port: u16, https_port: u16) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx");
    for entry in std::fs::read_dir(&source).expect("reading nginx/") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "conf") && !path.ends_with("upstream.conf") {
            let text = std::fs::read_to_string(&path).expect("reading nginx config");
            let text = text
                .replace(
                    "listen 80 default_server;",
                    &format!("listen 127.0.0.1:{http_port} default_server;"),
                )
                .replace(
                    "listen 443 ssl default_server;",
                    &format!("listen 127.0.0.1:{https_port} ssl default_server;"),
                );
            std::fs::write(dir.join(path.file_name().expect("file name")), text)
                .expect("writing config");
        }
    }
}

/// A throwaway self-signed certificate for the TLS server block.
fn make_certificate(certs: &Path) {
    std::fs::create_dir(certs).expect("certs dir");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(certs.join("tls.key"))
        .arg("-out")
        .arg(certs.join("tls.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(
        status.success(),
        "openssl could not make a test certificate"
    );
}

/// Starts the master in its own process group, in the foreground (so that it
/// is our child), with its error log in `dir/nginx.log`.
fn spawn(dir: &Path) -> Child {
    // As root, workers would switch to `nobody`, which cannot use the private
    // temporary prefix; keep them as the current user.
    let globals = if running_as_root() {
        "daemon off; user root;"
    } else {
        "daemon off;"
    };
    let log = std::fs::File::create(dir.join("nginx.log")).expect("nginx log");
    let prefix = format!("{}/", dir.display());
    Command::new(NGINX)
        .args(["-p", &prefix, "-e", "stderr", "-c"])
        .arg(dir.join("nginx.conf"))
        .args(["-g", globals])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("starting nginx")
}
