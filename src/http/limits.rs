//! Request-shape limits checked before any handler runs: the URL length, the
//! number and size of headers (414/431 with the JSON error body), and a
//! deadline for the body (408). hyper's own parse limits are set above these
//! (`http::server`), so a request just over them still reaches this layer and
//! gets a sentence rather than hyper's bodiless reply.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

use super::error::ApiError;
use crate::config::HttpLimits;
use crate::state::AppState;

/// Refuses oversized heads; gives the body `HTTP_BODY_TIMEOUT` to arrive.
pub async fn enforce(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &state.config.http;
    if let Err(refusal) = check_head(&req, limits) {
        return closing(refusal);
    }
    // Most requests (every GET) have no body: no timer for them.
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(limits.body_timeout)),
            expired: expired.clone(),
        })
    });
    let response = next.run(req).await;
    // The handler saw a body error and answered as it does for any unreadable
    // body; the client is owed the real reason.
    if expired.load(Ordering::Relaxed) {
        return closing(ApiError::RequestTimeout);
    }
    response
}

fn check_head(req: &Request, limits: &HttpLimits) -> Result<(), ApiError> {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if target > limits.max_uri_bytes {
        return Err(ApiError::UriTooLong);
    }
    let headers = req.headers();
    // ": " and CRLF per header, as they travelled.
    let head_bytes = target
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if headers.len() > limits.max_headers || head_bytes > limits.max_head_bytes {
        return Err(ApiError::HeadersTooLarge);
    }
    Ok(())
}

/// The refusal, on a connection that will not be reused: its unread body (or
/// whatever else the client meant to send) must not be read as a request.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body that fails once its deadline passes, however steadily bytes
/// trickle in. (tower-http's `TimeoutBody` restarts its timer on every frame,
/// which a client sending one byte a second never trips.)
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(axum::Error::new(ApiError::RequestTimeout))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;

    fn with_deadline(inner: Body, limit: Duration) -> (DeadlineBody, Arc<AtomicBool>) {
        let expired = Arc::new(AtomicBool::new(false));
        let body = DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limit)),
            expired: expired.clone(),
        };
        (body, expired)
    }

    async fn next_frame(body: &mut DeadlineBody) -> Option<Result<Frame<Bytes>, axum::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    /// One byte a second never lets the deadline restart: on tokio's paused
    /// clock the ten seconds pass at once, and exactly.
    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_fails_at_its_deadline() {
        let trickle = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), ()))
        });
        let started = Instant::now();
        let (mut body, expired) =
            with_deadline(Body::from_stream(trickle), Duration::from_secs(10));
        let mut bytes = 0;
        let error = loop {
            match next_frame(&mut body).await {
                Some(Ok(_)) => bytes += 1,
                Some(Err(error)) => break error,
                None => panic!("the trickle ended"),
            }
        };
        assert_eq!(bytes, 9, "one byte a second until the deadline");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(expired.load(Ordering::Relaxed));
        assert_eq!(error.to_string(), ApiError::RequestTimeout.to_string());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_in_time_passes_untouched() {
        let (mut body, expired) = with_deadline(Body::from("[1, 2]"), Duration::from_secs(10));
        let frame = next_frame(&mut body)
            .await
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"[1, 2]")));
        assert!(next_frame(&mut body).await.is_none());
        assert!(!expired.load(Ordering::Relaxed));
    }
}
