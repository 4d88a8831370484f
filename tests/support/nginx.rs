//! A real Nginx in front of local instances, using the repository's `nginx/`
//! configuration: the files are copied to a temporary prefix, `upstream.conf` is
//! rewritten to point at the instances, the listen ports become free loopback
//! ports, and a throwaway self-signed certificate is generated for the TLS server.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::app::free_port;

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
        let dir = tempfile::Builder::new()
            .prefix("croupier-nginx-")
            .tempdir()
            .expect("temp dir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx");
        let (http_port, https_port) = (free_port(), free_port());
        for entry in std::fs::read_dir(&source).expect("reading nginx/") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_some_and(|e| e == "conf") {
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
                std::fs::write(dir.path().join(path.file_name().expect("file name")), text)
                    .expect("writing config");
            }
        }
        let upstream: String = upstreams
            .iter()
            .map(|a| format!("server {a} max_fails=3 fail_timeout=5s;\n"))
            .collect();
        std::fs::write(dir.path().join("upstream.conf"), upstream).expect("writing upstream.conf");
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).expect("certs dir");
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

        // As root, workers would switch to `nobody`, which cannot use the private
        // temporary prefix; keep them as the current user.
        let globals = if running_as_root() {
            "daemon off; user root;"
        } else {
            "daemon off;"
        };
        let prefix = format!("{}/", dir.path().display());
        let child = Command::new(NGINX)
            .args(["-p", &prefix, "-e", "stderr", "-c"])
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", globals])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        let nginx = TestNginx {
            child: Some(child),
            http_port,
            https_port,
            dir,
        };
        nginx.wait_listening().await;
        nginx
    }

    async fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.http_port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nginx did not start listening within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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
        if let Some(mut child) = self.child.take() {
            // SIGQUIT would wait for open sockets; tests want it gone now.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
