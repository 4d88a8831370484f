//! The operator's page at `/admin/`: absent without `ADMIN_TOKEN`, served with
//! strict headers with it, and driven in a real headless Chromium
//! (`tests/admin_page/check.mjs`) against a two-instance cluster behind Nginx
//! and against one embedded-mode instance.
//!
//! The browser test needs Debian's `chromium` and Node.js; `scripts/test.sh`
//! installs the package, and this test runs `npm ci` itself when the Node
//! project has no `node_modules` yet.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::app::{ADMIN_TOKEN, TestServer, WsClient, assert_shape};
use support::cluster::TestCluster;
use tokio::process::Command;

const ROOM: &str = "table-7";
const WAITING_ROOM: &str = "waiting-room";

fn error_body() -> Value {
    json!({"success": false, "error": "<string>"})
}

#[tokio::test]
async fn admin_page_is_absent_without_admin_token() {
    let s = TestServer::start(&[("ADMIN_TOKEN", "")]).await;
    for path in ["/admin/", "/admin", "/admin/admin.js", "/admin/admin.css"] {
        let reply = s.send(s.http.get(s.url(path))).await;
        assert_eq!(reply.status, 404, "{path}: {}", reply.text);
        assert_shape(&reply.json(), &error_body(), path);
    }
}

#[tokio::test]
async fn admin_page_is_served_with_strict_headers() {
    let s = TestServer::start(&[]).await;
    for (path, content_type) in [
        ("/admin/", "text/html"),
        ("/admin/admin.js", "text/javascript"),
        ("/admin/admin.css", "text/css"),
    ] {
        let reply = s.send(s.http.get(s.url(path))).await;
        assert_eq!(reply.status, 200, "{path}");
        let header = |name| reply.header(name).unwrap_or_default();
        assert!(header("content-type").starts_with(content_type), "{path}");
        assert!(
            header("content-security-policy").starts_with("default-src 'self'"),
            "{path}"
        );
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        assert_eq!(header("cache-control"), "no-store", "{path}");
    }
    let page = s.send(s.http.get(s.url("/admin/"))).await;
    assert!(
        page.text.contains(r#"<script src="admin.js""#),
        "{}",
        page.text
    );

    // `/admin` leads to `/admin/`, where the page's relative paths resolve.
    let plain = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let reply = s.send(plain.get(s.url("/admin"))).await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location").as_deref(), Some("/admin/"));
}

#[tokio::test]
async fn operator_uses_the_page_in_a_browser_against_a_cluster() {
    let started = Instant::now();
    let cluster = TestCluster::start(2, &[]).await;
    let (node1, node2) = (&cluster.instances[0], &cluster.instances[1]);
    let (status, _) = cluster
        .front()
        .put(
            &format!("/api/roulette/{ROOM}"),
            &json!({"history": [17, 0, 32, "00", 5]}),
        )
        .await;
    assert_eq!(status, 200);

    let mut on_node1 = member(node1, ROOM, "member-on-node-1").await;
    let mut on_node2 = member(node2, ROOM, "member-on-node-2").await;
    // In a room that has nothing stored: listed all the same.
    let _waiting = member(node1, WAITING_ROOM, "member-waiting").await;

    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-page.png");
    let check = Check {
        base: cluster.url(""),
        instances: "node-1,node-2",
        disconnect_on: "node-2",
        // Nginx does not expose /metrics.
        metrics: false,
        screenshot,
    };
    let disconnected = check.run().await;
    assert!(disconnected.starts_with("node-2-"), "{disconnected}");

    // The button closed the member on node 2 with 1000; node 1's is untouched.
    assert_eq!(on_node2.closed().await, Some(1000));
    on_node1.send(json!({"type": "ping"})).await;
    assert_eq!(on_node1.recv().await["type"], "pong");
    eprintln!(
        "cluster: admin page checked in a browser in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test]
async fn operator_uses_the_page_in_a_browser_in_embedded_mode() {
    let started = Instant::now();
    let s = TestServer::start(&[("INSTANCE_ID", "solo")]).await;
    s.put(
        &format!("/api/roulette/{ROOM}"),
        &json!({"history": [3, 26]}),
    )
    .await;
    let mut first = member(&s, ROOM, "first-member").await;
    let mut second = member(&s, ROOM, "second-member").await;
    let _waiting = member(&s, WAITING_ROOM, "member-waiting").await;

    let check = Check {
        base: s.url(""),
        instances: "solo",
        disconnect_on: "solo",
        metrics: true,
        screenshot: Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-page-embedded.png"),
    };
    let disconnected = check.run().await;

    // The page disconnects the oldest connection it lists for the room.
    let (closed, open) = if disconnected == "solo-1" {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    assert_eq!(closed.closed().await, Some(1000), "{disconnected}");
    open.send(json!({"type": "ping"})).await;
    assert_eq!(open.recv().await["type"], "pong");
    eprintln!(
        "embedded: admin page checked in a browser in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// One run of `check.mjs` against a server and what it must find there.
struct Check {
    base: String,
    /// The instances holding the room's members, comma-separated.
    instances: &'static str,
    disconnect_on: &'static str,
    /// Whether `/metrics` is reachable from the page (rates must show).
    metrics: bool,
    screenshot: PathBuf,
}

impl Check {
    /// Runs the script, asserts it succeeded and that no request URL carried
    /// the token, and returns the id of the connection it disconnected.
    async fn run(&self) -> String {
        let work = tempfile::tempdir().expect("temp dir");
        let request_log = work.path().join("requests.json");
        let outcome = run_check(self, work.path(), &request_log).await;
        assert!(
            outcome.success,
            "check.mjs failed:\n{}\n{}",
            outcome.stdout, outcome.stderr
        );
        let requests: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(&request_log).expect("check.mjs wrote its request log"),
        )
        .expect("request log is a JSON array");
        assert!(requests.len() > 5, "{requests:?}");
        for url in &requests {
            assert!(!url.contains(ADMIN_TOKEN), "token in a request URL: {url}");
        }
        assert!(
            self.screenshot.exists(),
            "no screenshot at {}",
            self.screenshot.display()
        );
        outcome
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("disconnected "))
            .expect("check.mjs names the connection it disconnected")
            .to_owned()
    }
}

/// A WebSocket member of `key` on one instance, with a recognisable user agent.
async fn member(server: &TestServer, key: &str, agent: &str) -> WsClient {
    let mut ws = server
        .ws_with_headers(&[("User-Agent", agent)])
        .await
        .expect("WebSocket connect");
    ws.send(json!({"type": "join", "key": key, "version": 0}))
        .await;
    assert_eq!(ws.recv().await["type"], "sync");
    ws
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

fn node_project() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/admin_page")
}

/// Runs `check.mjs` (after `npm ci` if needed), bounded in time. The node
/// process and every browser process it started are gone when this returns,
/// whether the script passed, failed or hung.
async fn run_check(check: &Check, work: &Path, request_log: &Path) -> Outcome {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: install Debian's chromium (scripts/test.sh does)"
    );
    let project = node_project();
    if !project.join("node_modules/playwright-core").exists() {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&project);
        let out = bounded(npm, Duration::from_secs(180), None).await;
        assert!(
            out.success,
            "npm ci failed:\n{}\n{}",
            out.stdout, out.stderr
        );
    }
    let profile = work.join("chromium-profile");
    std::fs::create_dir(&profile).expect("browser profile directory");
    let mut node = Command::new("node");
    node.arg(project.join("check.mjs"))
        .arg(check.base.trim_end_matches('/'))
        .arg(ADMIN_TOKEN)
        .arg(&check.screenshot)
        .env("CHECK_ROOM", ROOM)
        .env("CHECK_WAITING_ROOM", WAITING_ROOM)
        .env("CHECK_INSTANCES", check.instances)
        .env("CHECK_DISCONNECT_ON", check.disconnect_on)
        .env("CHECK_METRICS", if check.metrics { "1" } else { "0" })
        .env("CHECK_USER_DATA_DIR", &profile)
        .env("CHECK_REQUEST_LOG", request_log);
    bounded(node, Duration::from_secs(150), Some(&profile)).await
}

/// Runs a command in its own process group with a deadline, then kills that
/// group and any browser using `profile` (Chromium puts itself in a group of
/// its own, so the group kill alone would not reach it).
async fn bounded(mut command: Command, limit: Duration, profile: Option<&Path>) -> Outcome {
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("spawning the check");
    let mut cleanup = Cleanup {
        group: child.id(),
        profile: profile.map(Path::to_path_buf),
    };
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(output) => {
            // The leader is reaped: its group id is no longer ours to signal.
            cleanup.group = None;
            let output = output.expect("waiting for the check");
            Outcome {
                success: output.status.success(),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            }
        }
        Err(_) => Outcome {
            success: false,
            stdout: String::new(),
            stderr: format!("timed out after {limit:?}"),
        },
    }
}

/// Kills what a check started, on every path out of [`bounded`] (panics too):
/// the process group of a check that did not finish, and the browser.
struct Cleanup {
    group: Option<u32>,
    profile: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mut pids: Vec<String> = self.group.iter().map(|g| format!("-{g}")).collect();
        if let Some(profile) = &self.profile {
            pids.extend(processes_using(profile));
        }
        if pids.is_empty() {
            return;
        }
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
    }
}

/// Ids of the processes whose command line names `profile` (the browser and
/// its helpers, started with `--user-data-dir=<profile>`).
fn processes_using(profile: &Path) -> Vec<String> {
    let needle = profile.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}
