//! Process groups and ports for the servers the tests start.
//!
//! Every server runs in a process group of its own (`process_group(0)`), so that
//! it can be stopped together with whatever it forked: Nginx's workers and
//! PostgreSQL's backends outlive a master that is killed alone, keep their
//! listening sockets, and pile up over a test run. Stopping signals the leader
//! first (so that it shuts down the way it is built to), then kills whatever is
//! left of the group.
//!
//! Servers that can bind port 0 do (the croupier binary reports the address
//! it got; Prometheus's is read back with [`listening_ports`]). Ports for
//! servers that cannot (PostgreSQL, Redis, Nginx) are chosen outside the kernel's
//! ephemeral range: the kernel hands out ports from that range to every
//! outgoing connection and every `bind(0)`, so a port probed free there is
//! easily gone by the time the server binds it. Outside it, only another
//! explicit choice can collide, and callers check that their own process holds
//! the port ([`listens_on`]) and retry with another one.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

/// Sends `signal` to every process in group `pgid`; errors (the group is gone)
/// are ignored.
pub fn signal_group(pgid: u32, signal: i32) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Sends `signal` to the single process `pid`.
pub fn signal_process(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Stops a group leader started with `process_group(0)` and its group: sends
/// `signal` to the leader, waits up to `grace` for `exited` to report it gone,
/// then SIGKILLs the whole group, which also takes any child the leader left
/// behind. Blocking: it is called from `Drop`.
pub fn stop_group(pid: u32, signal: i32, grace: Duration, mut exited: impl FnMut() -> bool) {
    signal_process(pid, signal);
    let deadline = Instant::now() + grace;
    while !exited() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal_group(pid, libc::SIGKILL);
    // Reap the leader if the grace ran out.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !exited() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The kernel's ephemeral port range (`ip_local_port_range`), inclusive.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((bounds.next()??, bounds.next()??))
        })
        // Linux's default.
        .unwrap_or((32768, 60999))
}

/// A loopback port outside the ephemeral range that nobody listens on right now.
/// Still only a probe: the caller must check that its server got it.
pub fn free_port() -> u16 {
    let (low, high) = ephemeral_range();
    for _ in 0..500 {
        let port = rand::random_range(10_000..=65_535u16);
        if (low..=high).contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range {low}-{high}");
}

/// Whether process `pid` holds a TCP socket listening on 127.0.0.1:`port` (or
/// on every address). A successful connection alone proves nothing: another
/// test's server may own the port our server failed to bind.
pub fn listens_on(pid: u32, port: u16) -> bool {
    listening_ports(pid).contains(&port)
}

/// The ports on which process `pid` holds TCP sockets listening on 127.0.0.1
/// or on every address: how the port of a server told to bind port 0 is read
/// back when it does not report it.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes = socket_inodes(pid);
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (address, port) = fields.get(1)?.split_once(':')?;
            // 0A is LISTEN; addresses are little-endian hex (0100007F = 127.0.0.1).
            let listening = *fields.get(3)? == "0A"
                && matches!(address, "0100007F" | "00000000")
                && inodes.contains(*fields.get(9)?);
            listening.then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// The inodes of the sockets process `pid` holds.
pub fn socket_inodes(pid: u32) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect()
}

/// The variable `scripts/test.sh` sets to a value unique to its run. Everything
/// started under it inherits it, which is how the script finds what was left
/// running; servers started with a cleared environment get it passed on
/// explicitly ([`run_marker`]).
pub const RUN_MARKER: &str = "CROUPIER_TEST_RUN";

/// `(RUN_MARKER, value)` when this process runs under `scripts/test.sh`.
pub fn run_marker() -> Option<(&'static str, String)> {
    std::env::var(RUN_MARKER).ok().map(|v| (RUN_MARKER, v))
}
