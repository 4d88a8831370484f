//! Replicated Redis for integration tests: a Redis Cluster of masters with one
//! replica each ([`TestRedisCluster`]), and a master, a replica and sentinels
//! ([`TestSentinel`]). Every server is the Debian `redis-server` binary (the
//! sentinels are `redis-server <conf> --sentinel`) on free loopback ports, in
//! its own temporary directory and process group, killed on drop. Cluster
//! administration goes through the Debian `redis-cli`.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{free_port, listens_on, signal_group};

const SERVER_BIN: &str = "/usr/bin/redis-server";
const CLI_BIN: &str = "/usr/bin/redis-cli";
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// A short node timeout keeps failure detection quick on loopback.
pub const NODE_TIMEOUT_MS: u64 = 1500;

/// One `redis-server` process (a data node or a sentinel).
pub struct RedisNode {
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisNode {
    /// Starts `redis-server` with `args` (or with a config file holding
    /// `config`, for a sentinel, which rewrites its file) on a free port.
    async fn start(args: &[String], sentinel_config: Option<&str>) -> RedisNode {
        for bin in [SERVER_BIN, CLI_BIN] {
            assert!(
                std::path::Path::new(bin).is_file(),
                "{bin} not found: install the Debian package `redis-server` (apt-get install -y \
                 redis-server); the Redis tests need real servers and are never skipped"
            );
        }
        let mut last = String::new();
        for _ in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("croupier-redis-ha-")
                .tempdir()
                .expect("temporary directory");
            let port = free_port();
            let log = dir.path().join("redis.log");
            let mut command = Command::new(SERVER_BIN);
            if let Some(config) = sentinel_config {
                let path = dir.path().join("sentinel.conf");
                let text = format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n{config}\n",
                    dir.path().display(),
                    log.display()
                );
                fs::write(&path, text).expect("writing sentinel.conf");
                command.arg(&path).arg("--sentinel");
            } else {
                command
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                    .arg("--dir")
                    .arg(dir.path())
                    .arg("--logfile")
                    .arg(&log)
                    .args(args);
            }
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("spawning redis-server");
            let mut node = RedisNode {
                port,
                dir,
                child: Some(child),
            };
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let pid = node.pid();
                if listens_on(pid, port) && node.cli(&["PING"]).await == "PONG" {
                    return node;
                }
                let exited = node
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    last = node.log();
                    node.kill();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("redis-server did not start; last log:\n{last}");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, whole process group: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server stops taking anything, replication included.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), libc::SIGSTOP);
        }
    }

    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal_group(child.id(), libc::SIGCONT);
        }
    }

    /// One `redis-cli` command against this node; its trimmed output.
    pub async fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args).await
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        // A paused process must be able to die.
        self.resume();
        self.kill();
    }
}

/// `redis-cli -p <port> <args>`, bounded in time; trimmed stdout.
pub async fn cli(port: u16, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(CLI_BIN);
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), command.output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => String::new(),
    }
}

/// A hash field read on any Cluster node, a replica included (`READONLY`
/// first, on the same connection); `""` if absent.
pub async fn hget_anywhere(port: u16, key: &str, field: &str) -> String {
    use tokio::io::AsyncWriteExt;

    let mut child = tokio::process::Command::new(CLI_BIN)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running redis-cli");
    // Keys here never contain quotes or spaces.
    let script = format!("READONLY\nHGET \"{key}\" {field}\n");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes()).await;
    }
    match tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await {
        Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_owned(),
        _ => String::new(),
    }
}

/// A node as `CLUSTER NODES` describes it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// The master's id, for a replica.
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

/// A Redis Cluster of `masters` masters with one replica each.
pub struct TestRedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl TestRedisCluster {
    pub async fn start(masters: usize) -> TestRedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let bus_port = free_port().to_string();
            let args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &NODE_TIMEOUT_MS.to_string(),
                "--cluster-port",
                &bus_port,
                // Any replica may be promoted, however long its master was gone.
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-allow-replica-migration",
                "no",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(RedisNode::start(&args, None).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut command = tokio::process::Command::new(CLI_BIN);
        command
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("redis-cli --cluster create timed out")
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = TestRedisCluster { nodes };
        cluster.wait_healthy(Duration::from_secs(30)).await;
        // Every replica is known as one, from every node, and in sync.
        let deadline = Instant::now() + Duration::from_secs(30);
        'waiting: loop {
            assert!(
                Instant::now() < deadline,
                "replicas not in place: {}",
                cluster.nodes[0].cli(&["CLUSTER", "NODES"]).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            for node in &cluster.nodes {
                let seen = parse_nodes(&node.cli(&["CLUSTER", "NODES"]).await);
                if seen.iter().filter(|n| n.master_id.is_some()).count() != masters {
                    continue 'waiting;
                }
                let info = node.cli(&["INFO", "replication"]).await;
                if info.contains("role:slave") && !info.contains("master_link_status:up") {
                    continue 'waiting;
                }
            }
            break;
        }
        cluster
    }

    /// `redis-cluster://127.0.0.1:<port of the first node>`: one seed node.
    pub fn url(&self) -> String {
        format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port)
    }

    pub fn node(&self, port: u16) -> &RedisNode {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .expect("no node on that port")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisNode {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("no node on that port")
    }

    /// Waits until every running node reports `cluster_state:ok` and the
    /// running nodes agree on one master per slot range.
    pub async fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                if !node
                    .cli(&["CLUSTER", "INFO"])
                    .await
                    .contains("cluster_state:ok")
                {
                    ok = false;
                }
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Redis Cluster not healthy within {limit:?}: {}",
                self.nodes[0].cli(&["CLUSTER", "NODES"]).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `CLUSTER NODES` as seen by a running node.
    pub async fn topology(&self) -> Vec<NodeInfo> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running node");
        parse_nodes(&node.cli(&["CLUSTER", "NODES"]).await)
    }

    /// The port of the master that owns `key`'s slot (`CLUSTER KEYSLOT`).
    pub async fn owner_of(&self, key: &str) -> u16 {
        let running = self.nodes.iter().find(|n| n.is_running()).expect("a node");
        let slot: u16 = running
            .cli(&["CLUSTER", "KEYSLOT", key])
            .await
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        self.topology()
            .await
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|n| n.port)
            .expect("a master owns the slot")
    }

    /// The port of `master`'s replica.
    pub async fn replica_of(&self, master: u16) -> u16 {
        let nodes = self.topology().await;
        let id = nodes
            .iter()
            .find(|n| n.port == master)
            .map(|n| n.id.clone())
            .expect("master in CLUSTER NODES");
        nodes
            .iter()
            .find(|n| n.master_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .expect("the master has a replica")
    }

    /// Promotes `replica` at once (`CLUSTER FAILOVER TAKEOVER`, which needs no
    /// agreement from the other masters) and waits until it is a master and the
    /// cluster is healthy again.
    pub async fn take_over(&self, replica: u16) {
        self.fail_over(replica, &["TAKEOVER"]).await;
    }

    /// `CLUSTER FAILOVER [options]` on `replica`; waits as [`Self::take_over`].
    /// Without options it is the graceful, coordinated failover of a live master.
    pub async fn fail_over(&self, replica: u16, options: &[&str]) {
        let mut args = vec!["CLUSTER", "FAILOVER"];
        args.extend_from_slice(options);
        let answer = self.node(replica).cli(&args).await;
        assert_eq!(answer, "OK", "{args:?}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self
            .node(replica)
            .cli(&["ROLE"])
            .await
            .starts_with("master")
        {
            assert!(
                Instant::now() < deadline,
                "replica {replica} never became master"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_healthy(Duration::from_secs(30)).await;
    }
}

fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = fields[2];
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeInfo {
                id: fields[0].to_owned(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail"),
                master_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
            })
        })
        .collect()
}

/// A master, one replica and `sentinels` sentinels watching them as `mymaster`
/// (quorum 1, short timeouts).
pub struct TestSentinel {
    pub master: RedisNode,
    pub replica: RedisNode,
    pub sentinels: Vec<RedisNode>,
}

pub const SERVICE: &str = "mymaster";

impl TestSentinel {
    pub async fn start(sentinels: usize) -> TestSentinel {
        let master = RedisNode::start(&[], None).await;
        let replica_args: Vec<String> = vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
        ];
        let replica = RedisNode::start(&replica_args, None).await;
        // The replica is in sync before anything relies on it.
        let deadline = Instant::now() + READY_TIMEOUT;
        while !replica
            .cli(&["INFO", "replication"])
            .await
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "replica never synced");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let config = format!(
            "sentinel monitor {SERVICE} 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds {SERVICE} 1000\n\
             sentinel failover-timeout {SERVICE} 5000\n\
             sentinel parallel-syncs {SERVICE} 1",
            master.port
        );
        let mut list = Vec::new();
        for _ in 0..sentinels {
            list.push(RedisNode::start(&[], Some(&config)).await);
        }
        TestSentinel {
            master,
            replica,
            sentinels: list,
        }
    }

    /// `redis-sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>…/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{}/{SERVICE}", hosts.join(","))
    }

    /// The master's port as the first sentinel reports it.
    pub async fn master_port(&self) -> Option<u16> {
        let answer = self.sentinels[0]
            .cli(&["SENTINEL", "get-master-addr-by-name", SERVICE])
            .await;
        answer.lines().nth(1)?.trim().parse().ok()
    }
}
