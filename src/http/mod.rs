//! The HTTP surface: the `/api` routes, operational endpoints, the WebSocket
//! upgrade, and the middleware every request passes (request id, one log line,
//! metrics by route template, CORS, body limit, head limits and body deadline,
//! panic → JSON 500), and the operator's page under `/admin/`. `server` is the
//! listener that serves it.

mod admin;
mod admin_page;
pub mod error;
pub mod extract;
pub mod forwarded;
mod limits;
pub mod openapi;
mod ops;
mod rooms_auth;
mod roulette;
pub mod server;
mod websocket;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue, Method, Response, header};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::{Extension, Router};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::CorsOrigins;
use crate::state::AppState;
use error::{ApiError, ErrorCode};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route, registered from its handler's `#[utoipa::path]` annotation, so
/// that the OpenAPI document lists exactly the routes that exist.
fn routes(metrics_here: bool) -> OpenApiRouter<AppState> {
    let routes = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(roulette::list))
        .routes(routes!(roulette::save))
        .routes(routes!(roulette::get_room, roulette::replace))
        .routes(routes!(rooms_auth::authenticate))
        .routes(routes!(admin::sessions))
        .routes(routes!(admin::stats))
        .routes(routes!(admin::history))
        .routes(routes!(admin::disconnect))
        .routes(routes!(admin::migrations))
        .routes(routes!(openapi::document))
        .routes(routes!(websocket::upgrade))
        .routes(routes!(ops::health))
        .routes(routes!(ops::livez))
        .routes(routes!(ops::readyz));
    if metrics_here {
        routes.routes(routes!(ops::metrics))
    } else {
        routes
    }
}

/// The OpenAPI document of the HTTP API.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes(true).into_openapi()
}

pub fn router(state: AppState) -> Router {
    // With METRICS_BIND, /metrics lives only on that listener.
    let (routes, document) = routes(state.config.metrics_bind.is_none()).split_for_parts();
    let document = openapi::Rendered(document.to_json().unwrap_or_default().into());
    routes
        // The operator's page is HTML, not part of the JSON API's document.
        .merge(admin_page::routes())
        .layer(Extension(document))
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

/// `/metrics` alone, for the separate `METRICS_BIND` listener.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(ops::metrics))
        .fallback(|| async { ApiError::NotFound })
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

/// One line per request: status, latency in milliseconds (three decimals)
/// and, for a refusal, its error code.
fn log_response<B>(res: &Response<B>, latency: Duration, _: &Span) {
    let latency_ms = format_args!("{:.3}", latency.as_secs_f64() * 1e3);
    match res.extensions().get::<ErrorCode>() {
        Some(ErrorCode(code)) => tracing::info!(
            status = res.status().as_u16(),
            error = code,
            latency_ms = %latency_ms,
            "request"
        ),
        None => tracing::info!(status = res.status().as_u16(), latency_ms = %latency_ms, "request"),
    }
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
