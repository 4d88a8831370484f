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

/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) used so far by `pid`, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields we need follow its ')'.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// Machine-wide (busy, total) CPU ticks from /proc/stat.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// CPU used by a server process and by the whole machine over a scenario: on a
/// shared machine, "requests per server CPU-second" says more than requests/s.
pub struct CpuProbe {
    pid: Option<u32>,
    server: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl CpuProbe {
    pub fn start(pid: Option<u32>) -> CpuProbe {
        CpuProbe {
            pid,
            server: pid.and_then(cpu_seconds),
            machine: machine_ticks(),
        }
    }

    /// `{"server_cpu_s", "server_cpu_us_per_op", "machine_busy_pct"}` since `start`.
    pub fn finish(&self, ops: u64) -> Value {
        let server = match (self.pid.and_then(cpu_seconds), self.server) {
            (Some(now), Some(then)) => Some(now - then),
            _ => None,
        };
        let busy_pct = match (machine_ticks(), self.machine) {
            (Some((b1, t1)), Some((b0, t0))) if t1 > t0 => {
                Some(((b1 - b0) as f64 * 1000.0 / (t1 - t0) as f64).round() / 10.0)
            }
            _ => None,
        };
        json!({
            "server_pid": self.pid,
            "server_cpu_s": server.map(|s| (s * 100.0).round() / 100.0),
            // To 0.1 µs: the fan-out budget compares two figures of a few µs.
            "server_cpu_us_per_op": server.filter(|_| ops > 0).map(|s| (s * 1e7 / ops as f64).round() / 10.0),
            "machine_busy_pct": busy_pct,
        })
    }
}
