//! Operational endpoints outside `/api`: health, liveness, readiness, metrics.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use chrono::Utc;
use serde_json::{Value, json};

use crate::bus::BusHealth;
use crate::state::AppState;

fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `GET /health`: dependency checks; 503 "degraded" when one is down.
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let database = match state.store().ping().await {
        Ok(latency) => json!({"status": "up", "latency_ms": millis(latency)}),
        Err(err) => json!({"status": "down", "error": err.to_string()}),
    };
    let redis = match state.rooms.bus.health().await {
        BusHealth::Disabled => json!("disabled"),
        BusHealth::Up(latency) => json!({"status": "up", "latency_ms": millis(latency)}),
        BusHealth::Down => json!({"status": "down"}),
    };
    let down = |v: &Value| v.get("status").and_then(Value::as_str) == Some("down");
    let degraded = down(&database) || down(&redis);
    let status = if degraded {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = json!({
        "status": if degraded { "degraded" } else { "ok" },
        "timestamp": Utc::now(),
        "instance": state.config.instance_id,
        "version": env!("CARGO_PKG_VERSION"),
        "checks": {"database": database, "redis": redis},
    });
    (status, Json(body))
}

/// `GET /livez`: the process is up and answering.
pub async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 503 while starting, draining, or when the database is unreachable.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (status, reason) = if !state.lifecycle.is_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "not accepting traffic")
    } else if state.store().ping().await.is_err() {
        (StatusCode::SERVICE_UNAVAILABLE, "database unreachable")
    } else {
        (StatusCode::OK, "ready")
    };
    let ok = status == StatusCode::OK;
    (
        status,
        Json(json!({"status": if ok { "ok" } else { "unavailable" }, "reason": reason})),
    )
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    metrics::gauge!("croupier_ws_connections_max").set(state.config.ws.max_connections as f64);
    let mut body = state.metrics.render();
    // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
    body.push_str(&crate::telemetry::render_process_metrics());
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
