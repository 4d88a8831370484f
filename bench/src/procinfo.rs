//! What the benchmark reads from /proc: a server's resident memory, our own
//! descriptor limit, and a description of the machine.

use std::fs;

use serde_json::{Value, json};

/// `VmRSS` of `pid` in KiB (as /proc reports it), `None` if the process is gone.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
}

/// The soft limit on open files of this process.
pub fn open_files_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace()
        .nth(3)
        .and_then(|soft| soft.parse().ok())
}

fn meminfo_kib(field: &str) -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// nproc, CPU model, memory, kernel and the current load average.
pub fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let read = |path: &str| {
        fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let loadavg = read("/proc/loadavg");
    json!({
        "scenario": "machine",
        "nproc": nproc,
        "cpu_model": model,
        "mem_total_kib": meminfo_kib("MemTotal"),
        "mem_available_kib": meminfo_kib("MemAvailable"),
        "kernel": read("/proc/sys/kernel/osrelease"),
        "loadavg": loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}
