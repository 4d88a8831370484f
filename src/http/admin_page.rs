//! `/admin/`: the operator's page. Three static files compiled into the binary
//! (no build step, nothing fetched from elsewhere at run time) that talk to the
//! admin API from the browser with the admin token as a bearer header.
//!
//! The page itself is not secret, but it exists only where the admin API does:
//! without `ADMIN_TOKEN` every path here answers the API's JSON 404. The token
//! never reaches these routes; the page reads it from the URL fragment, which
//! browsers do not send.
//!
//! Every reply carries a strict policy: scripts and styles only from this origin
//! (so no inline script, which is why the JS is a file of its own), no framing,
//! no referrer, no caching.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::error::ApiError;
use crate::state::AppState;

const INDEX: &str = include_str!("admin_page/index.html");
const SCRIPT: &str = include_str!("admin_page/admin.js");
const STYLE: &str = include_str!("admin_page/admin.css");

/// `default-src 'self'` is the requirement; the rest closes what it leaves open
/// (`<base>`, form targets, framing by other sites).
const CONTENT_SECURITY_POLICY: &str =
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes. They are plain routes, not part of the OpenAPI document
/// of the JSON API.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/admin", get(redirect))
        .route("/admin/", get(index))
        .route("/admin/admin.js", get(script))
        .route("/admin/admin.css", get(style))
}

/// The page is served only where the admin API is enabled.
fn enabled(state: &AppState) -> Result<(), ApiError> {
    match state.config.admin_token {
        Some(_) => Ok(()),
        None => Err(ApiError::NotFound),
    }
}

/// `/admin` → `/admin/`, so that the page's relative asset paths resolve. The
/// browser keeps the `#token=…` fragment across the redirect.
async fn redirect(State(state): State<AppState>) -> Result<Response, ApiError> {
    enabled(&state)?;
    Ok(Redirect::permanent("/admin/").into_response())
}

async fn index(State(state): State<AppState>) -> Result<Response, ApiError> {
    enabled(&state)?;
    Ok(asset("text/html; charset=utf-8", INDEX))
}

async fn script(State(state): State<AppState>) -> Result<Response, ApiError> {
    enabled(&state)?;
    Ok(asset("text/javascript; charset=utf-8", SCRIPT))
}

async fn style(State(state): State<AppState>) -> Result<Response, ApiError> {
    enabled(&state)?;
    Ok(asset("text/css; charset=utf-8", STYLE))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_no_inline_script_and_nothing_from_elsewhere() {
        assert!(INDEX.contains(r#"<script src="admin.js""#));
        assert!(
            !INDEX.contains("<script>"),
            "inline script is refused by the CSP"
        );
        assert!(
            !INDEX.contains("style="),
            "inline styles are refused by the CSP"
        );
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://"));
        }
    }
}
