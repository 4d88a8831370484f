//! The budget table. Reads the JSON lines the scenarios printed (each tagged
//! with a `label` by scripts/bench.sh), compares them with the budgets of
//! README ("Performance"), prints one table and writes the same as JSON.
//!
//! Two kinds of rows: *correctness* (nothing lost, no errors, every requested
//! connection established), which fail the run in every mode; and *budgets*
//! (throughput, latency, memory), which are only judged in a full run and fail
//! it only with `--strict` (a busy shared machine depresses them).
//!
//! Units are decimal: 1 KB = 1,000 bytes, 1 MB = 1,000,000 bytes (stricter
//! than KiB/MiB, so a pass holds either way).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// File of JSON lines (scenario results, `machine`, `idle-rss`, `failed`).
    #[arg(long)]
    pub results: PathBuf,
    /// Where to write the JSON version of the table.
    #[arg(long)]
    pub json_out: PathBuf,
    /// Quick mode: budgets are shown but not judged.
    #[arg(long)]
    pub quick: bool,
    /// Fail the run when a budget is missed, not only on lost data or errors.
    #[arg(long)]
    pub strict: bool,
    /// The revision whose build ran the `save-baseline` scenario, for the
    /// save-rate ratio row (`bench.sh --baseline=REV`).
    #[arg(long)]
    pub baseline: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Correctness,
    Budget,
    /// Context for a budget (what the machine itself allows): never judged, but
    /// a reference run that lost data fails like a correctness row.
    Reference,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pass,
    Fail,
    /// A budget in quick mode: shown, not judged.
    NotJudged,
    /// The scenario did not produce a result.
    Missing,
    /// A reference figure that ran cleanly.
    Reference,
    /// Left out by `bench.sh --only`.
    NotRun,
    /// A comparison with another build that was not asked for.
    NoBaseline,
}

impl Status {
    fn text(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::NotJudged => "n/a (quick)",
            Status::Missing => "FAIL (no result)",
            Status::Reference => "reference",
            Status::NotRun => "not run (--only)",
            Status::NoBaseline => "not run (no --baseline)",
        }
    }
}

struct Row {
    figure: String,
    budget: String,
    measured: String,
    kind: Kind,
    status: Status,
}

struct Table {
    rows: Vec<Row>,
    quick: bool,
    /// The scenarios `bench.sh --only` selected; `None` when it ran them all.
    only: Option<Vec<String>>,
}

impl Table {
    fn push(
        &mut self,
        kind: Kind,
        figure: impl Into<String>,
        budget: &str,
        measured: impl Into<String>,
        pass: bool,
    ) {
        let status = match (kind, self.quick, pass) {
            (Kind::Budget, true, _) => Status::NotJudged,
            (Kind::Reference, _, true) => Status::Reference,
            (_, _, true) => Status::Pass,
            (_, _, false) => Status::Fail,
        };
        self.rows.push(Row {
            figure: figure.into(),
            budget: budget.into(),
            measured: measured.into(),
            kind,
            status,
        });
    }

    /// A row whose scenario (named by its result `label`) left no result.
    fn missing(
        &mut self,
        kind: Kind,
        label: &str,
        figure: impl Into<String>,
        budget: &str,
        why: String,
    ) {
        let selected = self
            .only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario_of(label)));
        self.rows.push(Row {
            figure: figure.into(),
            budget: budget.into(),
            measured: if selected { why } else { "—".into() },
            kind,
            status: if selected {
                Status::Missing
            } else {
                Status::NotRun
            },
        });
    }
}

/// The `bench.sh` scenario (as `--only` names it) a result label belongs to.
fn scenario_of(label: &str) -> &str {
    ["get", "fanout", "save"]
        .into_iter()
        .find(|prefix| label.starts_with(prefix))
        .unwrap_or(label)
}

fn f(v: &Value, field: &str) -> f64 {
    v.get(field).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// 12345.6 → "12,346".
fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "?".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 { format!("-{out}") } else { out }
}

fn mb(kib: f64) -> String {
    format!("{:.1} MB", kib * 1024.0 / 1e6)
}

pub fn report(args: ReportArgs) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("reading {}", args.results.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let by_label = |label: &str| {
        lines
            .iter()
            .rev()
            .find(|v| v["label"] == label && v["scenario"] != "failed")
    };
    let failure = |label: &str| {
        lines
            .iter()
            .rev()
            .find(|v| v["scenario"] == "failed" && v["label"] == label)
            .map(|v| format!("scenario failed: {}", v["error"].as_str().unwrap_or("?")))
            .unwrap_or_else(|| "scenario did not run".into())
    };
    let machine = lines
        .iter()
        .find(|v| v["scenario"] == "machine")
        .cloned()
        .unwrap_or(Value::Null);
    let only = lines
        .iter()
        .find(|v| v["scenario"] == "run")
        .and_then(|v| v["only"].as_str())
        .map(|list| {
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|list| !list.is_empty());
    let mut t = Table {
        rows: Vec::new(),
        quick: args.quick,
        only,
    };

    // Idle memory.
    match lines.iter().find(|v| v["scenario"] == "idle-rss") {
        Some(v) => {
            let kib = f(v, "kib");
            let bytes = kib * 1024.0;
            // What the process allocated versus program code mapped from the
            // page cache (shared, reclaimable), when the kernel reports both.
            let measured = match (v["anon_kib"].as_f64(), v["file_kib"].as_f64()) {
                (Some(anon), Some(file)) => {
                    format!(
                        "{} (anonymous {}, file-backed {})",
                        mb(kib),
                        mb(anon),
                        mb(file)
                    )
                }
                _ => mb(kib),
            };
            t.push(
                Kind::Budget,
                format!(
                    "idle RSS, one instance ({})",
                    v["instance"].as_str().unwrap_or("cluster mode")
                ),
                "≤ 7 MB",
                measured,
                bytes <= 7e6,
            );
        }
        None => t.missing(
            Kind::Budget,
            "idle-rss",
            "idle RSS, one instance (cluster mode)",
            "≤ 7 MB",
            "not measured".into(),
        ),
    }

    // Reads.
    for (label, how) in [
        ("get-direct-wrk", "direct, wrk -c50"),
        ("get-direct", "direct, croupier-bench -c50"),
        ("get-nginx-wrk", "through Nginx, wrk -c50"),
        ("get-nginx", "through Nginx, croupier-bench -c50"),
    ] {
        let figure = format!("GET /api/roulette/{{key}} (100 numbers), {how}");
        match by_label(label) {
            Some(v) => {
                let errors = u(v, "errors");
                let rps = f(v, "rps");
                t.push(
                    Kind::Budget,
                    format!("{figure}: throughput"),
                    "≥ 50,000 req/s",
                    format!("{} req/s{}", thousands(rps), cpu_note(&v["cpu"], "req")),
                    rps >= 50_000.0,
                );
                t.push(
                    Kind::Budget,
                    format!("{figure}: p99"),
                    "≤ 5 ms",
                    format!("{:.2} ms (p50 {:.2})", f(v, "p99_ms"), f(v, "p50_ms")),
                    f(v, "p99_ms") <= 5.0,
                );
                t.push(
                    Kind::Correctness,
                    format!("{figure}: errors"),
                    "0",
                    thousands(errors as f64),
                    errors == 0,
                );
            }
            // wrk is optional in quick mode (it is not installed for it).
            None if label.ends_with("-wrk") && args.quick => {}
            None => t.missing(
                Kind::Budget,
                label,
                format!("{figure}: throughput"),
                "≥ 50,000 req/s",
                failure(label),
            ),
        }
    }

    // Durable appends.
    match by_label("save") {
        Some(v) => {
            let (acks, stored) = (u(v, "acks"), u(v, "stored"));
            t.push(
                Kind::Budget,
                format!(
                    "POST /api/roulette/save, {} writers, one room: acks/s",
                    u(v, "writers")
                ),
                "≥ 3,000 /s",
                format!(
                    "{} /s (p99 {:.1} ms){}",
                    thousands(f(v, "acks_per_s")),
                    f(v, "p99_ms"),
                    cpu_note(&v["cpu"], "ack")
                ),
                f(v, "acks_per_s") >= 3000.0,
            );
            t.push(
                Kind::Correctness,
                "POST /api/roulette/save: rows stored == acknowledged saves",
                "equal",
                format!("{stored} stored / {acks} acks ({} errors)", u(v, "errors")),
                stored == acks && acks > 0,
            );
        }
        None => t.missing(
            Kind::Correctness,
            "save",
            "POST /api/roulette/save: rows stored == acknowledged saves",
            "equal",
            failure("save"),
        ),
    }

    // The same saves against a build of an earlier revision, in alternating
    // rounds (`save-baseline`, `save`, `save-baseline-2`, `save-2`, ...).
    let rounds = |prefix: &str| -> Vec<&Value> {
        (1..)
            .map(|round| match round {
                1 => by_label(prefix),
                n => by_label(&format!("{prefix}-{n}")),
            })
            .take_while(Option::is_some)
            .flatten()
            .collect()
    };
    let (base_runs, now_runs) = (rounds("save-baseline"), rounds("save"));
    match (
        median(&base_runs, "acks_per_s"),
        median(&now_runs, "acks_per_s"),
    ) {
        (Some(base), Some(now)) if !base_runs.is_empty() => {
            let ratio = now / base;
            let cpu = |runs: &[&Value]| {
                let per_ack: Vec<Value> = runs.iter().map(|v| v["cpu"].clone()).collect();
                median(&per_ack.iter().collect::<Vec<_>>(), "server_cpu_us_per_op")
                    .unwrap_or(f64::NAN)
            };
            t.push(
                Kind::Budget,
                format!(
                    "durable saves vs the build of {}, {} writers, one room: median of {} alternating runs",
                    args.baseline.as_deref().unwrap_or("the baseline"),
                    u(now_runs[0], "writers"),
                    now_runs.len().min(base_runs.len())
                ),
                "≥ 2×",
                format!(
                    "{ratio:.2}× ({} /s vs {} /s; server CPU {:.0} vs {:.0} µs/ack; runs {} vs {})",
                    thousands(now),
                    thousands(base),
                    cpu(&now_runs),
                    cpu(&base_runs),
                    list_rates(&now_runs),
                    list_rates(&base_runs),
                ),
                ratio >= 2.0,
            );
        }
        _ => t.rows.push(Row {
            figure: "durable saves vs the build of an earlier revision, 50 writers, one room"
                .into(),
            budget: "≥ 2×".into(),
            measured: "—".into(),
            kind: Kind::Budget,
            status: if args.baseline.is_some() && by_label("save").is_some() {
                Status::Missing
            } else {
                Status::NoBaseline
            },
        }),
    }

    // Appends to a long history cost what appends to an empty room do.
    match (by_label("save"), by_label("save-long")) {
        (Some(empty), Some(long)) => {
            let (acks, stored) = (u(long, "acks"), u(long, "stored"));
            let ratio = f(long, "acks_per_s") / f(empty, "acks_per_s");
            t.push(
                Kind::Budget,
                format!(
                    "saves to a room holding {} numbers vs an empty room, {} writers",
                    u(long, "prefill"),
                    u(long, "writers")
                ),
                "≥ 0.9×",
                format!(
                    "{ratio:.2}× ({} /s vs {} /s)",
                    thousands(f(long, "acks_per_s")),
                    thousands(f(empty, "acks_per_s"))
                ),
                ratio >= 0.9,
            );
            t.push(
                Kind::Correctness,
                "saves to a long history: rows stored == acknowledged saves",
                "equal",
                format!(
                    "{stored} stored / {acks} acks ({} errors)",
                    u(long, "errors")
                ),
                stored == acks && acks > 0,
            );
        }
        (_, None) => t.missing(
            Kind::Correctness,
            "save-long",
            "saves to a long history: rows stored == acknowledged saves",
            "equal",
            failure("save-long"),
        ),
        (None, Some(_)) => {}
    }

    // Connections held.
    match by_label("hold") {
        Some(v) => {
            let (requested, established) = (u(v, "requested"), u(v, "established"));
            let dropped = u(v, "dropped_while_held");
            let all = established == requested && dropped == 0;
            if args.quick {
                t.push(
                    Kind::Correctness,
                    "WebSocket connections held by one instance",
                    "all requested",
                    format!("{established} of {requested}, {dropped} dropped"),
                    all,
                );
            } else {
                t.push(
                    Kind::Budget,
                    "WebSocket connections held by one instance",
                    "≥ 15,000",
                    format!(
                        "{} of {} ({dropped} dropped)",
                        thousands(established as f64),
                        thousands(requested as f64)
                    ),
                    all && established >= 15_000,
                );
            }
            let per = f(v, "per_conn_bytes");
            t.push(
                Kind::Budget,
                "RSS per WebSocket connection",
                "≤ 8 KB",
                format!("{:.1} KB", per / 1000.0),
                per <= 8000.0,
            );
        }
        None => t.missing(
            Kind::Budget,
            "hold",
            "WebSocket connections held by one instance",
            "≥ 15,000",
            failure("hold"),
        ),
    }

    // Fan-out, after what the bare machine allows.
    if let Some(v) = by_label("fanout-floor") {
        t.push(
            Kind::Reference,
            format!(
                "fan-out floor of this machine: one {}-byte frame → {} loopback sockets from {} bare write threads, no server: p99",
                u(v, "frame_bytes"),
                thousands(u(v, "members") as f64),
                u(v, "threads")
            ),
            "(reference)",
            format!(
                "{:.1} ms (p50 {:.1}, max {:.1}; {} µs of sender CPU per delivery; {}/{} delivered)",
                f(v, "p99_ms"),
                f(v, "p50_ms"),
                f(v, "max_ms"),
                f(&v["cpu"], "server_cpu_us_per_op"),
                u(v, "delivered"),
                u(v, "expected")
            ),
            u(v, "delivered") == u(v, "expected"),
        );
    }
    // The fan-out budgets are ratios to the floor measured in the same run:
    // absolute times on a shared 2-core machine move by tens of percent.
    let floor = by_label("fanout-floor");
    let floor_p99 = floor.map_or(f64::NAN, |v| f(v, "p99_ms"));
    let floor_cpu = floor.map_or(f64::NAN, |v| f(&v["cpu"], "server_cpu_us_per_op"));
    for (label, where_, p99_budget, p99_limit, cpu_limit) in [
        (
            "fanout-1",
            "one instance",
            "≤ 1.10× the floor's",
            1.10,
            Some(1.25),
        ),
        ("fanout-3", "3 instances", "≤ 1.25× the floor's", 1.25, None),
    ] {
        match by_label(label) {
            Some(v) => {
                let members = u(v, "members");
                let figure = format!(
                    "fan-out: one add → {} members on {where_}",
                    thousands(members as f64)
                );
                t.push(
                    Kind::Correctness,
                    format!("{figure}: all delivered"),
                    "all",
                    format!(
                        "{}/{} deliveries, {} adds",
                        u(v, "delivered"),
                        u(v, "expected"),
                        u(v, "adds")
                    ),
                    v["all_delivered"] == true,
                );
                let p99 = f(v, "p99_ms");
                t.push(
                    Kind::Budget,
                    format!("{figure}: p99"),
                    p99_budget,
                    format!(
                        "{:.2}× ({:.1} ms vs {:.1}; p50 {:.1}, max {:.1}){}",
                        p99 / floor_p99,
                        p99,
                        floor_p99,
                        f(v, "p50_ms"),
                        f(v, "max_ms"),
                        cpu_note(&v["cpu"], "delivery")
                    ),
                    p99 <= p99_limit * floor_p99,
                );
                if let Some(cpu_limit) = cpu_limit {
                    let cpu = server_cpu_per_op(&v["cpu"]);
                    t.push(
                        Kind::Budget,
                        format!("{figure}: server CPU per delivery"),
                        &format!("≤ {cpu_limit:.2}× the floor's sender"),
                        format!(
                            "{:.2}× ({:.1} µs vs {:.1} µs)",
                            cpu / floor_cpu,
                            cpu,
                            floor_cpu
                        ),
                        cpu <= cpu_limit * floor_cpu,
                    );
                }
            }
            None => t.missing(
                Kind::Correctness,
                label,
                format!("fan-out on {where_}: all delivered"),
                "all",
                failure(label),
            ),
        }
    }

    // Cross-instance latency.
    match by_label("latency") {
        Some(v) => {
            t.push(
                Kind::Budget,
                format!(
                    "cross-instance add→deliver, idle cluster, {} adds: p99",
                    u(v, "count")
                ),
                "≤ 5 ms",
                format!("{:.2} ms (p50 {:.2})", f(v, "p99_ms"), f(v, "p50_ms")),
                f(v, "p99_ms") <= 5.0,
            );
            t.push(
                Kind::Correctness,
                "cross-instance add→deliver: all delivered",
                "all",
                format!("{}/{}", u(v, "delivered"), u(v, "count")),
                v["all_delivered"] == true,
            );
        }
        None => t.missing(
            Kind::Budget,
            "latency",
            "cross-instance add→deliver, idle cluster: p99",
            "≤ 5 ms",
            failure("latency"),
        ),
    }

    // Soak.
    match by_label("mixed") {
        Some(v) => {
            let errors = u(v, "errors");
            t.push(
                Kind::Correctness,
                format!(
                    "mixed load ({} clients, {} rooms, {:.0} s): errors",
                    u(v, "clients"),
                    u(v, "rooms"),
                    f(v, "duration_s")
                ),
                "0",
                format!("{errors} in {} ops", thousands(f(v, "ops"))),
                errors == 0,
            );
            let (flat, text) = memory_flatness(&v["memory"]);
            t.push(
                Kind::Budget,
                "mixed load: server memory (first→mid→last, max)",
                "flat: 2nd-half growth ≤ 5% or 2 MB",
                text,
                flat,
            );
        }
        None => t.missing(
            Kind::Correctness,
            "mixed",
            "mixed load: errors",
            "0",
            failure("mixed"),
        ),
    }

    let profile = lines
        .iter()
        .find(|v| v["scenario"] == "run")
        .and_then(|v| v["profile"].as_str())
        .unwrap_or("?");
    print_table(&t, &machine, args.quick, profile);
    let correctness_ok = t.rows.iter().filter(|r| r.kind != Kind::Budget).all(|r| {
        matches!(
            r.status,
            Status::Pass | Status::Reference | Status::NotRun | Status::NoBaseline
        )
    });
    let budgets_ok = t.rows.iter().filter(|r| r.kind == Kind::Budget).all(|r| {
        matches!(
            r.status,
            Status::Pass | Status::NotJudged | Status::NotRun | Status::NoBaseline
        )
    });
    let ok = correctness_ok
        && t.rows.iter().all(|r| r.status != Status::Missing)
        && (budgets_ok || !args.strict);
    let rows: Vec<Value> = t
        .rows
        .iter()
        .map(|r| {
            json!({"figure": r.figure, "budget": r.budget, "measured": r.measured, "status": r.status.text(),
                   "kind": match r.kind {
                       Kind::Correctness => "correctness",
                       Kind::Budget => "budget",
                       Kind::Reference => "reference",
                   }})
        })
        .collect();
    let out = json!({
        "mode": if args.quick { "quick" } else { "full" },
        "machine": machine,
        "rows": rows,
        "correctness_ok": correctness_ok,
        "budgets_ok": budgets_ok,
        "ok": ok,
        "scenarios": lines,
    });
    if let Some(dir) = args.json_out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json_out, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", args.json_out.display()))?;
    Ok(ok)
}

/// " (server CPU 24 µs/req, machine 97% busy)" when the scenario measured it.
/// Server CPU per operation, summed over the probed instances (each probe
/// divides by all operations). NaN without a probe.
fn server_cpu_per_op(cpu: &Value) -> f64 {
    let probes: Vec<&Value> = match cpu {
        Value::Array(list) => list.iter().collect(),
        Value::Object(_) => vec![cpu],
        _ => return f64::NAN,
    };
    let per_op: Vec<f64> = probes
        .iter()
        .filter_map(|p| p["server_cpu_us_per_op"].as_f64())
        .collect();
    if per_op.is_empty() {
        f64::NAN
    } else {
        per_op.iter().sum()
    }
}

/// The median of `field` over `runs` (the upper one of an even count).
fn median(runs: &[&Value], field: &str) -> Option<f64> {
    let mut values: Vec<f64> = runs.iter().filter_map(|v| v[field].as_f64()).collect();
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// Each run's rate, in thousands per second: "9.8/10.2/11.0k".
fn list_rates(runs: &[&Value]) -> String {
    let rates: Vec<String> = runs
        .iter()
        .map(|v| format!("{:.1}", f(v, "acks_per_s") / 1000.0))
        .collect();
    format!("{}k", rates.join("/"))
}

fn cpu_note(cpu: &Value, unit: &str) -> String {
    let probes: Vec<&Value> = match cpu {
        Value::Array(list) => list.iter().collect(),
        Value::Object(_) => vec![cpu],
        _ => return String::new(),
    };
    let mut parts = Vec::new();
    let per_op: Vec<f64> = probes
        .iter()
        .filter_map(|p| p["server_cpu_us_per_op"].as_f64())
        .collect();
    if !per_op.is_empty() {
        // Over several instances each probe divides by all operations: the sum is the total.
        parts.push(format!(
            "server CPU {:.0} µs/{unit}",
            per_op.iter().sum::<f64>()
        ));
    }
    let busy: Vec<f64> = probes
        .iter()
        .filter_map(|p| p["machine_busy_pct"].as_f64())
        .collect();
    if let Some(b) = busy.first() {
        parts.push(format!("machine {b:.0}% busy"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// Flat: over the second half of the run no instance grew by more than 5 % of
/// its mid-run size or 2 MB, whichever is larger.
fn memory_flatness(memory: &Value) -> (bool, String) {
    let Some(instances) = memory.as_array().filter(|a| !a.is_empty()) else {
        return (false, "no samples".into());
    };
    let mut flat = true;
    let mut parts = Vec::new();
    for m in instances {
        let (first, mid, last, max) = (
            f(m, "first_kib"),
            f(m, "mid_kib"),
            f(m, "last_kib"),
            f(m, "max_kib"),
        );
        let allowed = (mid * 0.05).max(2e6 / 1024.0);
        flat &= (last - mid) <= allowed && u(m, "samples") >= 3;
        parts.push(format!(
            "{:.1}→{:.1}→{:.1} (max {:.1})",
            first * 1.024 / 1000.0,
            mid * 1.024 / 1000.0,
            last * 1.024 / 1000.0,
            max * 1.024 / 1000.0
        ));
    }
    (flat, format!("{} MB", parts.join("; ")))
}

fn print_table(t: &Table, machine: &Value, quick: bool, profile: &str) {
    let header = ["figure", "budget", "measured", "pass/fail"];
    let cells: Vec<[String; 4]> = t
        .rows
        .iter()
        .map(|r| {
            [
                r.figure.clone(),
                r.budget.clone(),
                r.measured.clone(),
                r.status.text().to_owned(),
            ]
        })
        .collect();
    let width = |i: usize| {
        cells
            .iter()
            .map(|c| c[i].chars().count())
            .chain([header[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2), width(3)];
    let line = |c: [&str; 4]| {
        let padded: Vec<String> = c
            .iter()
            .zip(widths)
            .map(|(s, w)| format!("{s}{}", " ".repeat(w - s.chars().count())))
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    println!();
    println!(
        "croupier benchmark ({}, {profile} binaries) on {} CPU(s), {}, {:.1} GB RAM, kernel {}, load average at start {}",
        if quick {
            "quick: budgets not judged"
        } else {
            "full"
        },
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        f(machine, "mem_total_kib") * 1024.0 / 1e9,
        machine["kernel"].as_str().unwrap_or("?"),
        machine["loadavg"].as_str().unwrap_or("?"),
    );
    println!();
    println!("{}", line(header));
    println!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for c in &cells {
        println!("{}", line([&c[0], &c[1], &c[2], &c[3]]));
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(0.0), "0");
    }

    #[test]
    fn a_partial_run_fails_only_for_the_scenarios_it_ran() {
        let mut t = Table {
            rows: Vec::new(),
            quick: false,
            only: Some(vec!["get".into(), "fanout".into()]),
        };
        t.missing(Kind::Budget, "get-nginx", "GET", "b", "failed".into());
        t.missing(
            Kind::Correctness,
            "fanout-3",
            "fan-out",
            "all",
            "failed".into(),
        );
        t.missing(
            Kind::Correctness,
            "save",
            "save",
            "equal",
            "did not run".into(),
        );
        t.missing(Kind::Budget, "idle-rss", "idle", "b", "not measured".into());
        let statuses: Vec<Status> = t.rows.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            [
                Status::Missing,
                Status::Missing,
                Status::NotRun,
                Status::NotRun
            ]
        );
    }

    #[test]
    fn memory_flatness_allows_small_growth_only() {
        let flat = json!([{"first_kib": 10000, "mid_kib": 20000, "last_kib": 20500, "max_kib": 21000, "samples": 10}]);
        assert!(memory_flatness(&flat).0);
        let growing = json!([{"first_kib": 10000, "mid_kib": 20000, "last_kib": 40000, "max_kib": 40000, "samples": 10}]);
        assert!(!memory_flatness(&growing).0);
    }
}
