//! `scripts/cluster.sh` comes up every time and leaves nothing behind: ten
//! starts in a row, each serving `/health` and a room read through its Nginx,
//! then stopped with SIGINT or SIGTERM, after which no process it started may
//! still run.
//!
//! The script runs the debug binary this test was built with (`CROUPIER_BIN`),
//! two instances, and lets Nginx's ports be picked (`--http-port 0`), so that
//! the test runs beside anything else on the machine.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::process::{RUN_MARKER, signal_group, signal_process};

const RUNS: usize = 10;
/// A start on a busy 2-core machine takes a few seconds; this is the bound.
const START_LIMIT: Duration = Duration::from_secs(60);
/// Instances drain for at most their shutdown grace, then the rest stops.
const STOP_LIMIT: Duration = Duration::from_secs(45);

#[tokio::test]
async fn cluster_script_starts_serves_and_stops_cleanly_ten_times() {
    // Under scripts/test.sh the marker extends the run's own, so its final
    // check still sees anything this test failed to clean up.
    let marker = format!(
        "{}cluster-script-{}-{}",
        std::env::var(RUN_MARKER)
            .map(|v| format!("{v}-"))
            .unwrap_or_default(),
        std::process::id(),
        rand::random::<u64>()
    );
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    let mut timings = Vec::new();
    for run in 1..=RUNS {
        let started = Instant::now();
        let mut script = Script::start(&marker);
        let port = script.wait_up().await;
        let up = started.elapsed();

        let health = http
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("run {run}: /health through Nginx: {e}"));
        assert_eq!(health.status(), 200, "run {run}: /health through Nginx");
        let room = http
            .get(format!("http://127.0.0.1:{port}/api/roulette/x"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("run {run}: room read through Nginx: {e}"));
        assert_eq!(room.status(), 200, "run {run}: room read through Nginx");
        let body: serde_json::Value = room.json().await.expect("room read JSON");
        assert_eq!(body["key"], "x", "run {run}: {body}");

        // Ctrl-C and a service manager's SIGTERM take the same path; use both.
        let signal = if run % 2 == 0 {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        let stop = Instant::now();
        script.stop(signal).await;
        let down = stop.elapsed();
        let leftovers = processes_marked(&marker, script.temp_dir.as_deref());
        if !leftovers.is_empty() {
            for (pid, _) in &leftovers {
                signal_process(*pid, libc::SIGKILL);
            }
            panic!(
                "run {run}: processes left running after the script stopped:\n{}\nscript output:\n{}",
                leftovers
                    .iter()
                    .map(|(pid, what)| format!("  {pid} {what}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
                script.output()
            );
        }
        if let Some(dir) = &script.temp_dir {
            assert!(
                !std::path::Path::new(dir).exists(),
                "run {run}: {dir} was not removed"
            );
        }
        timings.push((up, down));
    }
    let report: Vec<String> = timings
        .iter()
        .map(|(up, down)| format!("{:.1}/{:.1}", up.as_secs_f64(), down.as_secs_f64()))
        .collect();
    eprintln!("cluster.sh up/down seconds: {}", report.join(" "));
}

/// One run of the script, in a process group of its own so that whatever it
/// still runs itself (not its servers, which have their own) can be killed if
/// the test fails.
struct Script {
    child: Option<Child>,
    output: Arc<Mutex<Vec<String>>>,
    temp_dir: Option<String>,
}

impl Script {
    fn start(marker: &str) -> Script {
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new("bash")
            .arg(format!("{root}/scripts/cluster.sh"))
            .args(["--instances", "2", "--http-port", "0", "--https-port", "0"])
            .env("CROUPIER_BIN", env!("CARGO_BIN_EXE_croupier"))
            .env(RUN_MARKER, marker)
            .env("RUST_LOG", "warn")
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("running scripts/cluster.sh");
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().expect("stdout"), output.clone());
        collect(child.stderr.take().expect("stderr"), output.clone());
        Script {
            child: Some(child),
            output,
            temp_dir: None,
        }
    }

    fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// Waits for the "is up" banner; returns Nginx's HTTP port.
    async fn wait_up(&mut self) -> u16 {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let text = self.output();
            if text.contains("Press Ctrl-C to stop everything.") {
                self.temp_dir = banner_value(&text, "logs").map(|logs| {
                    logs.trim_end_matches('/')
                        .trim_end_matches("/logs")
                        .to_owned()
                });
                return banner_value(&text, "HTTP")
                    .and_then(|url| url.strip_prefix("http://127.0.0.1:"))
                    .and_then(|rest| rest.split('/').next())
                    .and_then(|port| port.parse().ok())
                    .unwrap_or_else(|| panic!("no HTTP port in the banner:\n{text}"));
            }
            let child = self.child.as_mut().expect("running");
            if let Ok(Some(status)) = child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "cluster.sh exited ({status}) before it was up:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "cluster.sh was not up within {START_LIMIT:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends `signal` to the script alone and waits for it to finish stopping.
    async fn stop(&mut self, signal: i32) {
        let mut child = self.child.take().expect("running");
        signal_process(child.id(), signal);
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                panic!(
                    "cluster.sh did not stop within {STOP_LIMIT:?}:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Script {
    /// A failed test must not leave the script running either.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_process(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + STOP_LIMIT;
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(50));
            }
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }
}

fn collect(pipe: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            into.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

/// The value after `label` on a banner line such as `  logs        /tmp/…/logs/`.
fn banner_value<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(label)?;
        rest.starts_with(' ')
            .then(|| rest.split_whitespace().next())
            .flatten()
    })
}

/// Processes (other than this one) whose environment carries the marker or
/// whose command line names the run's temporary directory.
fn processes_marked(marker: &str, temp_dir: Option<&str>) -> Vec<(u32, String)> {
    let needle = format!("{RUN_MARKER}={marker}");
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter_map(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let marked = environ
                .split(|&b| b == 0)
                .any(|var| var == needle.as_bytes())
                || temp_dir.is_some_and(|dir| cmdline.contains(dir));
            marked.then(|| (pid, cmdline.trim().to_owned()))
        })
        .collect()
}
