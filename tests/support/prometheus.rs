//! A real Prometheus server (the Debian `prometheus` package) for integration
//! tests: started in a temporary directory on loopback port 0 with a
//! generated configuration, queried through its HTTP API, killed with its process
//! group when dropped.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::process::{listening_ports, signal_group};

const PROMETHEUS: &str = "/usr/bin/prometheus";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestPrometheus {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl TestPrometheus {
    /// Starts Prometheus scraping `targets` (job `job`, path `/metrics`) every
    /// `interval`, evaluating `rule_files` at the same interval. Panics with a
    /// clear message when the binary is missing (the test command installs it).
    pub async fn start(
        job: &str,
        targets: &[SocketAddr],
        interval: Duration,
        rule_files: &[PathBuf],
    ) -> TestPrometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} not found: install the Debian package `prometheus` (apt-get install -y prometheus); \
             the observability tests need a real Prometheus and are never skipped"
        );
        let dir = tempfile::Builder::new()
            .prefix("croupier-prometheus-")
            .tempdir()
            .expect("temp dir");
        let seconds = interval.as_secs_f64();
        // Like prometheus/prometheus.yml: one static target per instance and no
        // relabelling, so `instance` is the scraped `host:port`.
        let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("\"{}\"", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {seconds}s\n  scrape_timeout: {seconds}s\n  evaluation_interval: {seconds}s\n\
             rule_files: [{}]\n\
             scrape_configs:\n  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
            rules.join(", "),
            targets.join(", "),
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("prometheus log");

        // Port 0: the kernel picks a free port while binding, so nothing can
        // take it in between; the port is then read back from the socket the
        // process holds.
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log.try_clone().expect("log handle"))
            .process_group(0)
            .spawn()
            .expect("starting prometheus");
        let mut prometheus = TestPrometheus {
            child: Some(child),
            port: 0,
            dir,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("http client"),
        };
        if let Err(e) = prometheus.wait_ready().await {
            panic!("prometheus did not start: {e}");
        }
        prometheus
    }

    /// Waits until the process listens (and takes its port from the socket),
    /// then until it reports ready; an early exit or a timeout is an error
    /// carrying its log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let pid = self.child.as_ref().map_or(0, Child::id);
            if self.port == 0
                && let Some(port) = listening_ports(pid).into_iter().next()
            {
                self.port = port;
            }
            if self.port != 0
                && let Ok(r) = self.http.get(self.url("/-/ready")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "prometheus exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` with query parameters; the whole JSON reply (also for 4xx,
    /// whose body carries `status: "error"` and the reason).
    pub async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let r = self
            .http
            .get(self.url(path))
            .query(params)
            .send()
            .await
            .expect("Prometheus API request");
        let status = r.status();
        let text = r.text().await.expect("Prometheus API body");
        serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("Prometheus answered {status} with non-JSON: {text}"))
    }

    /// An instant query (`/api/v1/query`) at the current time.
    pub async fn query(&self, expr: &str) -> Value {
        self.api("/api/v1/query", &[("query", expr)]).await
    }

    /// `/api/v1/rules`: every rule group with each rule's query, health and state.
    pub async fn rules(&self) -> Value {
        self.api("/api/v1/rules", &[]).await
    }

    /// `/api/v1/targets`: the active scrape targets with their health.
    pub async fn targets(&self) -> Value {
        self.api("/api/v1/targets", &[]).await
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        self.kill();
    }
}
