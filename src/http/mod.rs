//! The HTTP surface: the `/api` routes, operational endpoints, the WebSocket
//! upgrade, and the middleware every request passes (request id, one log line,
//! metrics by route template, CORS, body limit, head limits and body deadline,
//! panic → JSON 500). `server` is the listener that serves it.

mod admin;
pub mod error;
pub mod extract;
mod limits;
mod ops;
mod rooms_auth;
mod roulette;
pub mod server;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, Response, header};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::config::CorsOrigins;
use crate::state::AppState;
use error::ApiError;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/roulette/sessions", get(roulette::list))
        .route("/roulette/save", post(roulette::save))
        .route(
            "/roulette/{key}",
            get(roulette::get_room).put(roulette::replace),
        )
        .route("/rooms/auth", post(rooms_auth::authenticate))
        .route("/admin/sessions", get(admin::sessions))
        .route("/admin/stats", get(admin::stats))
        .route("/admin/sessions/{key}/history", get(admin::history))
        .route(
            "/admin/connections/{id}/disconnect",
            post(admin::disconnect),
        )
        .route("/admin/migrations", get(admin::migrations));

    Router::new()
        .nest("/api", api)
        .route("/ws", get(crate::ws::upgrade))
        .route("/health", get(ops::health))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(make_span)
                        .on_response(log_response),
                )
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::Internal("handler panicked".into()).into_response()
                }))
                .layer(cors(&state.config.cors_origins))
                .layer(middleware::from_fn(record_metrics))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    limits::enforce,
                )),
        )
        .with_state(state)
}

fn cors(origins: &CorsOrigins) -> CorsLayer {
    let allow = match origins {
        CorsOrigins::Any => AllowOrigin::any(),
        CorsOrigins::List(list) => {
            AllowOrigin::list(list.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
        }
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        .max_age(Duration::from_secs(600))
}

fn route_of(req: &Request) -> String {
    req.extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned())
}

fn make_span(req: &Request<Body>) -> Span {
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", method = %req.method(), route = %route_of(req), request_id = %request_id)
}

fn log_response<B>(res: &Response<B>, latency: Duration, _: &Span) {
    tracing::info!(
        status = res.status().as_u16(),
        latency_ms = latency.as_secs_f64() * 1e3,
        "request"
    );
}

/// Counts requests and their durations by method, route template and status.
async fn record_metrics(req: Request, next: Next) -> Response<Body> {
    let started = Instant::now();
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::OPTIONS
        | Method::HEAD
        | Method::PATCH => req.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let route = route_of(&req);
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("croupier_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("croupier_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
