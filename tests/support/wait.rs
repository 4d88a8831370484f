//! Waiting for something to happen: a condition is polled until it holds or a
//! time limit passes, and the failure names what was awaited and what was last
//! seen. A fixed sleep either wastes time or, on a busy machine, is too short.
//!
//! The clock is tokio's, so the same helper works under a paused clock.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How often [`eventually`] looks again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What one look of [`eventually`] found: the awaited value, or not yet.
///
/// `Option` says only "not yet"; `Result<T, String>` also says what was seen
/// instead, which the timeout message repeats.
pub trait Progress {
    type Value;
    fn into_progress(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Progress for Option<T> {
    type Value = T;
    fn into_progress(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T> Progress for Result<T, String> {
    type Value = T;
    fn into_progress(self) -> Result<T, Option<String>> {
        self.map_err(Some)
    }
}

/// Runs `check` every [`POLL_INTERVAL`] until it reports the awaited value, and
/// returns it; panics after `limit` with `what` and the last thing `check` saw.
pub async fn eventually<P, F, Fut>(limit: Duration, what: &str, mut check: F) -> P::Value
where
    P: Progress,
    F: FnMut() -> Fut,
    Fut: Future<Output = P>,
{
    let deadline = Instant::now() + limit;
    loop {
        let last = match check().await.into_progress() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            match last {
                Some(seen) => {
                    panic!("timed out after {limit:?} waiting for: {what}\n  last seen: {seen}")
                }
                None => panic!("timed out after {limit:?} waiting for: {what}"),
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
