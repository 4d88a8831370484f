//! Logging and metrics: the `tracing` subscriber, the Prometheus recorder, and the
//! small helpers the rest of the server uses to record metrics.
//!
//! Metric labels are always bounded: route templates (never raw paths), message
//! types from a fixed list, operation names chosen in code. Room keys and
//! connection ids never become label values.

use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;

const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,fred=warn";

/// Installs the global `tracing` subscriber (honours `RUST_LOG`; JSON lines when
/// `LOG_FORMAT=json`). Safe to call more than once.
///
/// `RUST_LOG` takes a default level and `target=level` pairs, e.g.
/// `warn,croupier=debug`. (This is `Targets`, not `EnvFilter`: span and field
/// directives are not supported, and the server does without the regex engine
/// they need.) A value that does not parse is reported and the default is used.
pub fn init_tracing() {
    let configured = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, rejected) = match configured.as_deref().map(str::parse::<Targets>) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (default_filter(), Some(e)),
        None => (default_filter(), None),
    };
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // The builder caps events at INFO by default, below any filter: the cap
    // must be the filter's own most verbose level, so that `RUST_LOG` alone
    // decides (`debug`, `trace`). Not simply TRACE: the cap is also the global
    // level every disabled `trace!`/`debug!` (and `log` record of tungstenite,
    // once per frame) is checked against before any filter runs, and a TRACE
    // cap sends each of them through the dispatcher.
    let most_verbose = Layer::<Registry>::max_level_hint(&filter).unwrap_or(LevelFilter::TRACE);
    let builder = tracing_subscriber::fmt()
        .with_max_level(most_verbose)
        .with_target(false)
        .with_ansi(ansi);
    let installed = if json {
        builder.json().finish().with(filter).try_init()
    } else {
        builder.finish().with(filter).try_init()
    };
    if let (Ok(()), Some(e)) = (installed, rejected) {
        tracing::warn!("RUST_LOG is not a valid filter ({e}); using {DEFAULT_LOG_FILTER}");
    }
}

fn default_filter() -> Targets {
    DEFAULT_LOG_FILTER
        .parse()
        .expect("the default log filter parses")
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Several in-process instances (tests) share it.
pub fn prometheus_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (e.g. by an embedding test);
            // the handle still renders this recorder's view.
            let _ = metrics::set_global_recorder(recorder);
            register_families();
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the histogram samples recorded since the last pass into their buckets,
/// every [`UPKEEP_INTERVAL`], for the life of the process.
///
/// The recorder keeps every raw sample until something drains it. A scrape of
/// `/metrics` does, but without one (no Prometheus, a long scrape interval) the
/// samples pile up, one per fan-out delivery, query and request, and memory grows
/// with traffic. `build_recorder` leaves this upkeep to its caller. The recorder
/// is process-wide, so this is a thread of its own rather than a task that would
/// end with whichever runtime happened to create it.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "cannot start metrics upkeep; histograms drain only when scraped");
    }
}

/// Creates the unlabelled series at zero, so dashboards and alerts see 0 rather
/// than "no data" before the first event of each kind.
fn register_families() {
    for counter in [
        "croupier_ws_resyncs_total",
        "croupier_ws_slow_consumer_closes_total",
        "croupier_redis_commands_total",
        "croupier_redis_errors_total",
        "croupier_redis_reconnects_total",
        "croupier_cache_hits_total",
        "croupier_cache_misses_total",
        "croupier_db_failovers_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for gauge in ["croupier_ws_connections", "croupier_rooms_active"] {
        metrics::gauge!(gauge).set(0.0);
    }
    // Start-up only goes on once the store's primary answered (SQLite: the
    // file is always there); the PostgreSQL watcher keeps it current.
    metrics::gauge!("croupier_db_primary_reachable").set(1.0);
    // Redis Cluster shards (masters) known and answering; 0 and 0 elsewhere.
    for gauge in ["croupier_redis_shards", "croupier_redis_shards_up"] {
        metrics::gauge!(gauge).set(0.0);
    }
    for direction in ["in", "out"] {
        metrics::counter!("croupier_bus_messages_total", "direction" => direction).absolute(0);
    }
    for kind in ["behind", "epoch", "rewind"] {
        metrics::counter!("croupier_repairs_total", "kind" => kind).absolute(0);
    }
    for source in ["snapshot", "store"] {
        metrics::counter!("croupier_room_reads_total", "source" => source).absolute(0);
    }
    metrics::describe_histogram!(
        "croupier_fanout_latency_seconds",
        metrics::Unit::Seconds,
        "Time from a mutation's commit to its frame being queued for a member"
    );
    metrics::describe_histogram!(
        "croupier_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "HTTP request duration by method and route template"
    );
}

/// The standard process metrics (`process_cpu_seconds_total`, `process_open_fds`,
/// `process_resident_memory_bytes`, ...) read now, in the text format.
///
/// Rendered here rather than recorded through `metrics`: its counters are
/// integers, which would cut the CPU time to whole seconds, so that a `rate()`
/// of it reads 0 or 1 core and nothing in between.
pub fn render_process_metrics() -> String {
    use std::fmt::Write;
    let m = metrics_process::collector::collect();
    let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
    let families = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            m.cpu_seconds_total,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            as_f64(m.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            as_f64(m.max_fds),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            as_f64(m.virtual_memory_bytes),
        ),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes.",
            as_f64(m.virtual_memory_max_bytes),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            as_f64(m.resident_memory_bytes),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            as_f64(m.start_time_seconds),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            as_f64(m.threads),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in families {
        if let Some(value) = value {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
    out
}

/// Records one database operation's count and duration when dropped.
pub struct DbTimer {
    op: &'static str,
    started: Instant,
}

impl DbTimer {
    pub fn new(op: &'static str) -> Self {
        DbTimer {
            op,
            started: Instant::now(),
        }
    }
}

impl Drop for DbTimer {
    fn drop(&mut self) {
        metrics::counter!("croupier_db_queries_total", "op" => self.op).increment(1);
        metrics::histogram!("croupier_db_query_duration_seconds", "op" => self.op)
            .record(self.started.elapsed().as_secs_f64());
    }
}
