//! Operational endpoints outside `/api`: health, liveness, readiness, metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use crate::bus::BusHealth;
use crate::state::AppState;

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The reply of `GET /health`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when a dependency is down (503).
    status: &'static str,
    timestamp: DateTime<Utc>,
    instance: String,
    version: &'static str,
    checks: Checks,
}

#[derive(Serialize, ToSchema)]
struct Checks {
    database: Check,
    /// `"disabled"` in embedded mode (no Redis), else a check.
    redis: BusCheck,
}

/// One dependency's state.
#[derive(Serialize, ToSchema)]
struct Check {
    /// `up` or `down`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[serde(untagged)]
enum BusCheck {
    Disabled(&'static str),
    Checked(Check),
}

impl Check {
    fn up(latency: std::time::Duration) -> Self {
        Check {
            status: "up",
            latency_ms: Some(millis(latency)),
            error: None,
        }
    }

    fn down(error: Option<String>) -> Self {
        Check {
            status: "down",
            latency_ms: None,
            error,
        }
    }
}

/// `{"status": ...}` of the probes, with the reason for `/readyz`.
#[derive(Serialize, ToSchema)]
pub struct Probe {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
}

/// `GET /health`: dependency checks; 503 "degraded" when one is down.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "Every dependency is up", body = Health),
        (status = 503, description = "A dependency is down", body = Health),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let database = match state.database.ping().await {
        Ok(latency) => Check::up(latency),
        Err(err) => Check::down(Some(err.to_string())),
    };
    let redis = match state.cluster.health().await {
        BusHealth::Disabled => BusCheck::Disabled("disabled"),
        BusHealth::Up(latency) => BusCheck::Checked(Check::up(latency)),
        BusHealth::Down => BusCheck::Checked(Check::down(None)),
    };
    let degraded =
        database.status == "down" || matches!(&redis, BusCheck::Checked(c) if c.status == "down");
    let status = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = Health {
        status: if degraded { "degraded" } else { "ok" },
        timestamp: Utc::now(),
        instance: state.config.instance_id.clone(),
        version: env!("CARGO_PKG_VERSION"),
        checks: Checks { database, redis },
    };
    (status, Json(body))
}

/// `GET /livez`: the process is up and answering.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    responses((status = 200, description = "The process serves", body = Probe))
)]
pub async fn livez() -> Json<Probe> {
    Json(Probe {
        status: "ok",
        reason: None,
    })
}

/// `GET /readyz`: 503 while starting, draining, or when the database is unreachable.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready for traffic", body = Probe),
        (status = 503, description = "Starting, draining, or the database is unreachable", body = Probe),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Probe>) {
    let (status, reason) = if !state.lifecycle.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting traffic")
    } else if state.database.ping().await.is_err() {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    } else {
        (StatusCode::OK, "ready")
    };
    let ok = status == StatusCode::OK;
    let probe = Probe {
        status: if ok { "ok" } else { "unavailable" },
        reason: Some(reason),
    };
    (status, Json(probe))
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!("croupier_ws_connections_max").set(state.config.ws.max_connections as f64);
    let mut body = state.metrics.render();
    // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
    body.push_str(&crate::telemetry::render_process_metrics());
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
