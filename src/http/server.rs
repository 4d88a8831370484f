//! The HTTP listener. It replaces `axum::serve` to bound what one client can
//! hold: connections are admitted under a per-instance and a per-address cap
//! (beyond either, a 503 JSON reply is attempted and the socket closed at
//! once), each connection is timed by phase (`watch`), and hyper's parse
//! limits sit just above the router's own (`http::limits`). Upgraded
//! WebSockets keep their admission slot until they close. A request to
//! upgrade carries the connection's `hub::Socket` (its write side) as an
//! extension, for the WebSocket session that takes the connection over.

mod admission;
mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::header::UPGRADE;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::config::HttpLimits;
use crate::http::error::ApiError;
use admission::{Admission, Refusal, Slot};
use watch::{Clock, Watched};

/// Serves `router` on `listener` until `stop` is cancelled, then stops
/// accepting, lets every connection finish its request and close, and returns
/// once all of them (WebSockets included) are closed.
///
/// `trust_proxy` exempts loopback and private peers from the per-address cap:
/// behind Nginx they are the proxy, and every client would share its count.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    trust_proxy: bool,
    stop: CancellationToken,
) {
    let admission = Admission::new(
        limits.max_connections,
        limits.max_connections_per_ip,
        trust_proxy,
    );
    let mut hyper = http1::Builder::new();
    // hyper's own limits sit above the router's, so that a request just over
    // ours is still parsed and refused with a sentence by `http::limits`.
    // Beyond these hyper refuses it itself (and `watch` adds the body).
    hyper
        .max_headers(limits.max_headers.saturating_mul(2))
        .max_buf_size(limits.max_head_bytes.saturating_mul(2).max(16 * 1024))
        .header_read_timeout(None);
    let mut refusals = Refusals::new();

    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors or similar: back off rather than spin.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(cap) => {
                refusals.refuse(tcp, peer, cap);
                continue;
            }
        };
        // Small frames must leave at once: without TCP_NODELAY, Nagle's algorithm
        // holds a WebSocket event back until the previous one is acknowledged.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        serve_connection(&hyper, tcp, peer, slot, router.clone(), limits, &stop);
    }
    drop(listener);
    admission.all_closed().await;
}

/// Turns connections away beyond a cap: one best-effort 503 (never waiting on
/// the client), then close.
struct Refusals {
    reply: Vec<u8>,
    /// A flood refuses thousands a second; the log gets one line a second.
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Refusals {
    fn new() -> Self {
        Refusals {
            reply: watch::raw_response(&ApiError::Unavailable),
            last_logged: None,
            unlogged: 0,
        }
    }

    fn refuse(&mut self, tcp: TcpStream, peer: SocketAddr, cap: Refusal) {
        metrics::counter!("croupier_http_connections_refused_total", "cap" => cap.label())
            .increment(1);
        let _ = tcp.try_write(&self.reply);
        self.unlogged += 1;
        if self
            .last_logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(%peer, cap = cap.label(), refused = self.unlogged, "connection cap reached; refusing");
            self.last_logged = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

fn serve_connection(
    hyper: &http1::Builder,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    router: Router,
    limits: &HttpLimits,
    stop: &CancellationToken,
) {
    let clock = Clock::new(limits.header_timeout, limits.idle_timeout);
    let (watched, socket) = Watched::new(tcp, clock.clone(), slot);
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // A WebSocket session writes to the socket itself (see `hub::Socket`).
            if req.headers().contains_key(UPGRADE) {
                req.extensions_mut().insert(socket.clone());
            }
            clock.request_started();
            let call = router.clone().call(req);
            let clock = clock.clone();
            async move {
                let response: Result<Response, Infallible> = call.await;
                if let Ok(response) = &response {
                    clock.response_ready(response.status() == StatusCode::SWITCHING_PROTOCOLS);
                }
                response
            }
        })
    };
    let io = TokioIo::new(watched);
    let connection = hyper.serve_connection(io, service).with_upgrades();
    let stop = stop.clone();
    tokio::spawn(async move {
        let mut connection = std::pin::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            // Finish the request in progress, then close. A connection still
            // waiting for a head (or idle) has nothing to finish.
            _ = stop.cancelled() => if clock.in_request() {
                connection.as_mut().graceful_shutdown();
                connection.await
            } else {
                Ok(())
            },
        };
        if let Err(err) = result {
            tracing::debug!(%peer, error = %err, "connection ended");
        }
    });
}
