//! Timeouts of one HTTP/1 connection, at the socket, by phase:
//!
//! - waiting for a request head (from accept, or from the first byte of a
//!   later request): `HTTP_HEADER_TIMEOUT`;
//! - kept alive with nothing in progress, or writing a response to a client
//!   that has read none of it for that long: `HTTP_IDLE_TIMEOUT`;
//! - a request in a handler: none here (the body has its own deadline in
//!   `http::limits`; handlers bound their own work);
//! - upgraded to a WebSocket: none (the session pings and times out itself).
//!
//! hyper 1 has a single `header_read_timeout` that runs from the end of one
//! response to the end of the next head, so it cannot tell an idle keep-alive
//! connection (which Nginx expects to last past its own 60 s) from a stalled
//! head (which should not last 10 s). Hence this wrapper.
//!
//! It also gives hyper's automatic replies to unparsable requests (400, 414,
//! 431, written with an empty body and no hook to change it) the JSON error
//! body: a response that starts while no request is in progress can only be
//! one of those.
//!
//! Its write side is a [`Socket`] shared with the hub: once the connection is
//! a WebSocket, rooms write their frames into it directly, and tungstenite's
//! own writes (pongs, close frames) go through the same queue, whole frames at
//! a time (`Socket::poll_write`).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::time::{Instant, Sleep};

use super::admission::Slot;
use crate::http::error::ApiError;
use crate::hub::Socket;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Idle,
    Busy,
    Responding,
    Upgraded,
}

/// The connection's phase, moved by the socket (bytes read, flushes) and by
/// the request service (a request started, its response produced).
pub(super) struct Clock {
    /// A std mutex: one connection's task is its only user, never across `.await`.
    state: Mutex<(Phase, Instant)>,
    /// Set once the connection upgraded (it never goes back): from then on the
    /// socket passes every read and write straight through, without the lock,
    /// because a WebSocket's frames are the hot path of fan-out.
    upgraded: AtomicBool,
    header: Duration,
    idle: Duration,
}

impl Clock {
    pub(super) fn new(header: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Clock {
            state: Mutex::new((Phase::Head, Instant::now())),
            upgraded: AtomicBool::new(false),
            header,
            idle,
        })
    }

    fn get(&self) -> (Phase, Instant) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, from: &[Phase], to: Phase) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if from.contains(&state.0) {
            *state = (to, Instant::now());
        }
    }

    pub(super) fn request_started(&self) {
        self.set(&[Phase::Head, Phase::Idle, Phase::Responding], Phase::Busy);
    }

    pub(super) fn response_ready(&self, upgraded: bool) {
        let to = if upgraded {
            Phase::Upgraded
        } else {
            Phase::Responding
        };
        self.set(&[Phase::Busy], to);
        if upgraded {
            self.upgraded.store(true, Ordering::Release);
        }
    }

    /// Upgraded: no deadline, no error reply to substitute, nothing to track.
    fn passthrough(&self) -> bool {
        self.upgraded.load(Ordering::Acquire)
    }

    /// A response made progress: a slow reader is not a stalled one.
    fn wrote(&self) {
        self.set(&[Phase::Responding], Phase::Responding);
    }

    /// Whether a request is in a handler or its response on the way out.
    pub(super) fn in_request(&self) -> bool {
        matches!(self.get().0, Phase::Busy | Phase::Responding)
    }

    fn deadline(&self) -> Option<Instant> {
        match self.get() {
            (Phase::Head, since) => Some(since + self.header),
            (Phase::Idle | Phase::Responding, since) => Some(since + self.idle),
            (Phase::Busy | Phase::Upgraded, _) => None,
        }
    }
}

/// The accepted socket, its admission slot, and the clock that may end it.
pub(super) struct Watched {
    read: OwnedReadHalf,
    /// The write side, shared with the WebSocket's rooms after an upgrade.
    write: Arc<Socket>,
    clock: Arc<Clock>,
    timer: Pin<Box<Sleep>>,
    substitute: Option<Substitute>,
    _slot: Slot,
}

/// A JSON reply written in place of hyper's bodiless one.
struct Substitute {
    bytes: Vec<u8>,
    written: usize,
}

impl Watched {
    /// Also returns the socket's write side, which an upgraded connection's
    /// session takes over.
    pub(super) fn new(io: TcpStream, clock: Arc<Clock>, slot: Slot) -> (Self, Arc<Socket>) {
        let timer = Box::pin(tokio::time::sleep(clock.header));
        let (read, write) = io.into_split();
        let write = Arc::new(Socket::new(write));
        let watched = Watched {
            read,
            write: write.clone(),
            clock,
            timer,
            substitute: None,
            _slot: slot,
        };
        (watched, write)
    }

    /// Called when the socket is not ready: fails once the phase's deadline passed.
    ///
    /// The timer only ever moves earlier here; when it fires early (the
    /// connection moved on to a later deadline meanwhile) it is re-armed once.
    /// A busy keep-alive connection thus touches the timer wheel about once
    /// per timeout period, not once per request.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(deadline) = self.clock.deadline() else {
            return Poll::Pending;
        };
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        ready!(self.timer.as_mut().poll(cx));
        if Instant::now() < deadline {
            self.timer.as_mut().reset(deadline);
            ready!(self.timer.as_mut().poll(cx));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection timed out waiting for the client",
        )))
    }

    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Pending => self.poll_deadline(cx),
            Poll::Ready(Ok(n)) if n > 0 => {
                self.clock.wrote();
                Poll::Ready(Ok(n))
            }
            done => done,
        }
    }

    /// Writes the substitute for hyper's reply, if this write is one; then
    /// swallows whatever else hyper writes, reporting `len` bytes written.
    fn poll_substitute(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
        len: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.substitute.is_none() {
            let error = parse_error_reply(first)?;
            if !matches!(self.clock.get().0, Phase::Head | Phase::Idle) {
                return None;
            }
            tracing::debug!(status = %error.status_code(), "request could not be parsed");
            self.substitute = Some(Substitute {
                bytes: raw_response(&error),
                written: 0,
            });
        }
        let substitute = self.substitute.as_mut()?;
        while substitute.written < substitute.bytes.len() {
            let rest = &substitute.bytes[substitute.written..];
            match self.write.poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => substitute.written += n,
                Poll::Ready(Err(err)) => return Some(Poll::Ready(Err(err))),
                Poll::Pending => return Some(self.poll_deadline(cx)),
            }
        }
        Some(Poll::Ready(Ok(len)))
    }
}

/// hyper's reply to a request it could not parse (`Server::on_error`): a
/// status line, `content-length: 0`, a date; nothing a handler of ours sends.
fn parse_error_reply(head: &[u8]) -> Option<ApiError> {
    match head.strip_prefix(b"HTTP/1.1 ")?.get(..3)? {
        b"400" => Some(ApiError::bad_request("the request is not valid HTTP")),
        b"414" => Some(ApiError::UriTooLong),
        b"431" => Some(ApiError::HeadersTooLarge),
        _ => None,
    }
}

/// A complete HTTP/1.1 response carrying the JSON error body, for refusals
/// made at the socket (no router involved). The connection closes after it.
pub(super) fn raw_response(error: &ApiError) -> Vec<u8> {
    let status = error.status_code();
    let body = serde_json::to_string(&error.body()).unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes()
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.clock.passthrough() {
            return Pin::new(&mut this.read).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.read).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // The first byte of the next request: its head is due now.
                    this.clock.set(&[Phase::Idle], Phase::Head);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => this.poll_deadline(cx),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.clock.passthrough() {
            return this.write.poll_write(cx, buf);
        }
        if let Some(done) = this.poll_substitute(cx, buf, buf.len()) {
            return done;
        }
        let written = this.write.poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.clock.passthrough() {
            return this.write.poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let len = bufs.iter().map(|b| b.len()).sum();
        if let Some(done) = this.poll_substitute(cx, first, len) {
            return done;
        }
        let written = this.write.poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.clock.passthrough() {
            return this.write.poll_flush(cx);
        }
        ready!(this.write.poll_flush(cx))?;
        // hyper flushes once a response is out: the connection is idle now.
        // hyper may not read again until the client sends something, so the
        // idle timer is started here, where it can wake the connection.
        this.clock.set(&[Phase::Responding], Phase::Idle);
        match this.poll_deadline::<()>(cx) {
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.write.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which timeout applies in each phase, and from when, on tokio's paused
    /// clock: the phases last minutes here and the test takes none.
    #[tokio::test(start_paused = true)]
    async fn each_phase_runs_its_own_timeout() {
        let (header, idle) = (Duration::from_secs(10), Duration::from_secs(75));
        let accepted = Instant::now();
        let clock = Clock::new(header, idle);
        assert_eq!(
            clock.deadline(),
            Some(accepted + header),
            "waiting for a head"
        );

        tokio::time::advance(Duration::from_secs(3)).await;
        clock.request_started();
        assert_eq!(clock.deadline(), None, "a request in its handler");

        tokio::time::advance(Duration::from_secs(120)).await;
        clock.response_ready(false);
        let responding = Instant::now();
        assert_eq!(
            clock.deadline(),
            Some(responding + idle),
            "writing the response"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        clock.wrote();
        assert_eq!(
            clock.deadline(),
            Some(responding + Duration::from_secs(60) + idle),
            "a response that makes progress is not stalled"
        );

        // Flushed: kept alive until the next request's first byte.
        clock.set(&[Phase::Responding], Phase::Idle);
        let idle_from = Instant::now();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(clock.deadline(), Some(idle_from + idle), "kept alive");
        clock.set(&[Phase::Idle], Phase::Head);
        assert_eq!(
            clock.deadline(),
            Some(Instant::now() + header),
            "the next head"
        );

        clock.request_started();
        clock.response_ready(true);
        assert_eq!(clock.deadline(), None, "upgraded");
        assert!(clock.passthrough());
    }
}
