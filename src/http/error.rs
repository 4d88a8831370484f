//! The HTTP error contract: one enum owns every status code and the JSON body
//! `{"success": false, "error": "<sentence>"}`. Internal errors are logged here,
//! once, and answered with a generic sentence.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openapi::ErrorBody;
use crate::auth::{HashError, TokenError};
use crate::domain::DomainError;
use crate::rooms::AccessError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request was not received in time")]
    RequestTimeout,
    #[error("request body is too large")]
    PayloadTooLarge,
    #[error("the URL is too long")]
    UriTooLong,
    #[error("the request headers are too large or too many")]
    HeadersTooLarge,
    #[error("request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("too many requests; try again later")]
    TooManyRequests,
    /// A client's quota is used up; it may retry after this many seconds.
    #[error("too many requests from this address; try again in {0} s")]
    RateLimited(u64),
    #[error("service temporarily unavailable; try again later")]
    Unavailable,
    /// A bounded queue is full (password checks): try again in a moment.
    #[error("the server is busy; try again in a moment")]
    Busy,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong => StatusCode::URI_TOO_LONG,
            ApiError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests | ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable | ApiError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short name of the refusal for the request log line (the reply
    /// itself carries only the status and a sentence).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::TooManyRequests | ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable => "unavailable",
            ApiError::Busy => "busy",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UriTooLong => "uri_too_long",
            ApiError::HeadersTooLarge => "headers_too_large",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest(message.into())
    }

    /// The JSON error body. Also written by the transport itself, for refusals
    /// that happen before a request reaches the router (`http::server`).
    pub fn body(&self) -> ErrorBody<'static> {
        if let ApiError::Internal(detail) = self {
            tracing::error!(error = %detail, "internal error");
        }
        ErrorBody {
            success: false,
            error: self.to_string().into(),
        }
    }
}

/// Attached to an error reply so that the request log line can name it.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status_code(), Json(self.body())).into_response();
        response.extensions_mut().insert(ErrorCode(self.code()));
        let retry_after = match self {
            ApiError::RateLimited(seconds) => Some(HeaderValue::from(seconds)),
            // Queued work drains within about a second.
            ApiError::Busy => Some(HeaderValue::from_static("1")),
            _ => None,
        };
        if let Some(value) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<DomainError> for ApiError {
    fn from(err: DomainError) -> Self {
        ApiError::BadRequest(err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "database unavailable");
                ApiError::Unavailable
            }
            StoreError::IndexOutOfRange { .. } | StoreError::HistoryTooLong { .. } => {
                ApiError::BadRequest(err.to_string())
            }
            StoreError::AuthRequired => ApiError::Unauthorized(err.to_string()),
            StoreError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(err: TokenError) -> Self {
        ApiError::Unauthorized(err.to_string())
    }
}

impl From<HashError> for ApiError {
    fn from(err: HashError) -> Self {
        match err {
            HashError::Busy => ApiError::Busy,
            HashError::Failed(e) => e.into(),
        }
    }
}

impl From<AccessError> for ApiError {
    fn from(err: AccessError) -> Self {
        match err {
            AccessError::Token(e) => e.into(),
            AccessError::Store(e) => e.into(),
            AccessError::RateLimited(refused) => ApiError::RateLimited(refused.retry_after_secs()),
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(err: anyhow::Error) -> Self {
        ApiError::Internal(format!("{err:#}"))
    }
}
