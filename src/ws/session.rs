//! One task per WebSocket connection: `select!` over the socket's reads, its
//! outbound queue, the ping timer, and the reasons to close (shutdown, admin
//! kick, queue overflow). Memberships live in the hub; this task only holds
//! which rooms it joined and in which dialect.
//!
//! Frames do not pass through this task: rooms (and this task's own replies)
//! write them into the socket directly (`hub::Outbox`). The task only finishes
//! what the kernel did not take at once, so it is not woken per event.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::Utc;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::Peer;
use crate::auth::TokenError;
use crate::bus::ConnectionInfo;
use crate::domain::{Change, MutationId, RoomKey, Version};
use crate::hub::registry::ClientSlot;
use crate::hub::{self, Greeting, Member, Outbound, Outbox, Socket};
use crate::protocol::frames::{self, Dialect, Frame};
use crate::protocol::messages::{self, ClientMessage, WsError};
use crate::rooms::{AccessError, Writer};
use crate::state::AppState;
use crate::store::StoreError;

/// Close codes this server uses.
mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// A room this connection is a member of.
struct Joined {
    key: RoomKey,
    dialect: Dialect,
    /// Admitted with a valid token (a protected room keeps it as a member).
    with_token: bool,
}

struct Session {
    state: AppState,
    number: u64,
    client: std::net::IpAddr,
    out: Outbox,
    /// Joined rooms in join order; the last one is the default for `add` & co.
    rooms: Vec<Joined>,
    limiter: DefaultDirectRateLimiter,
    info: ConnectionInfo,
}

/// The task of one connection, from registration to clean-up.
///
/// Its future lives as long as the connection, so its size is what every idle
/// connection costs besides its buffers, and it is kept small on purpose:
/// - everything is set up before the future exists and moved into it once (an
///   `async fn` would keep its arguments and the locals they move into side by
///   side for its whole life);
/// - the socket is split here, so the future holds two pointers to it rather
///   than the socket itself;
/// - the awaits that run only now and then (handling a client message, presence
///   updates, the close) are boxed: they nest store, hub and bus futures larger
///   than all the rest, and a boxed future takes memory only while it runs.
pub fn run(
    socket: WebSocket,
    wire: Arc<Socket>,
    state: AppState,
    peer: Peer,
    slots: (OwnedSemaphorePermit, ClientSlot),
) -> impl Future<Output = ()> + Send + 'static {
    let registration = state.connections.register(&state.config.instance_id);
    let span =
        tracing::info_span!("ws", conn = %registration.id, instance = %state.config.instance_id);
    let limits = &state.config.ws;
    let (idle_timeout, ping_interval) = (limits.idle_timeout, limits.ping_interval);
    let (out, mut queue) = hub::outbox(wire, limits.queue_capacity, limits.queue_bytes);
    let quota =
        Quota::per_second(NonZeroU32::new(limits.messages_per_second).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN));
    let now = Utc::now();
    let mut session = Session {
        number: registration.number,
        client: peer.ip,
        out,
        rooms: Vec::new(),
        limiter: RateLimiter::direct_with_clock(quota, state.rate_clock.clone()),
        info: ConnectionInfo {
            id: registration.id.clone(),
            instance: state.config.instance_id.clone(),
            rooms: Vec::new(),
            connected_at: now,
            last_activity: now,
            ip_address: peer.ip.to_string(),
            user_agent: peer.user_agent,
        },
        state,
    };
    let (sink, mut stream) = socket.split();

    async move {
        metrics::gauge!("croupier_ws_connections").increment(1.0);
        Box::pin(session.publish_presence()).await;
        tracing::debug!("connected");

        let mut ticker = tokio::time::interval(ping_interval);
        ticker.tick().await;
        let mut last_seen = Instant::now();
        // Each reason to close is waited on by one future for the whole loop:
        // `cancelled()` registers a waiter under the token's lock, too much to redo
        // at every wake-up.
        let shutdown = session.state.lifecycle.shutdown.clone();
        let shutdown = shutdown.cancelled();
        let kicked = registration.kicked.cancelled();
        tokio::pin!(shutdown, kicked);

        // Messages in, for the line logged at the end.
        let mut received = 0u64;
        let ending = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break Ending::Server(close::GOING_AWAY, "server shutting down"),
                _ = &mut kicked => break Ending::Server(close::NORMAL, "disconnected by an administrator"),
                outbound = std::future::poll_fn(|cx| queue.poll_next(cx)) => match outbound {
                    Outbound::Overflowed => break Ending::Server(close::TRY_AGAIN_LATER, "too slow; reconnect and resume"),
                    Outbound::Failed => break Ending::Lost,
                    Outbound::Removed(key) => Box::pin(session.forget(&key)).await,
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        last_seen = Instant::now();
                        received += 1;
                        Box::pin(session.on_text(&text)).await;
                    }
                    Some(Ok(Message::Binary(_))) => {
                        last_seen = Instant::now();
                        received += 1;
                        if session.admit() {
                            session.reply_error(&WsError::new("invalid_json", "binary frames are not supported; send JSON text"));
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => last_seen = Instant::now(),
                    Some(Ok(Message::Close(frame))) => break Ending::Client(frame.map(|f| f.code)),
                    None => break Ending::Lost,
                    Some(Err(err)) => break match violation(&err) {
                        Some((code, reason)) => Ending::Server(code, reason),
                        None => Ending::Lost,
                    },
                },
                _ = ticker.tick() => {
                    if last_seen.elapsed() > idle_timeout {
                        break Ending::Server(close::GOING_AWAY, "idle timeout");
                    }
                    // A peer that stops reading fills the socket buffers; one that
                    // has taken nothing for a whole idle timeout is as gone as one
                    // that sends nothing (and its queue is held until then).
                    if queue.stalled_for().is_some_and(|stalled| stalled > idle_timeout) {
                        tracing::debug!(waited = ?idle_timeout, "peer stopped reading; dropping the connection");
                        break Ending::Lost;
                    }
                    queue.ping();
                    session.info.last_activity = Utc::now();
                    Box::pin(session.publish_presence()).await;
                }
            }
        };

        // Nothing may follow the close frame; a client that fell behind gets its
        // close at once rather than after the backlog.
        let overflowed = matches!(ending, Ending::Server(close::TRY_AGAIN_LATER, _));
        queue.close(overflowed);
        if let Ending::Server(code, reason) = ending {
            Box::pin(close_socket(sink, code, reason, idle_timeout)).await;
        }
        let sent = queue.sent();
        session.log_end(&ending, received, sent);
        Box::pin(session.end(&registration.id)).await;
        drop(slots);
    }
    // Entered only while the task is polled, so its events carry the connection
    // and nothing else on the same thread does.
    .instrument(span)
}

/// Why a connection ended.
enum Ending {
    /// The server closed it with this code and reason.
    Server(u16, &'static str),
    /// The client closed it (with its code, if it gave one).
    Client(Option<u16>),
    /// The connection broke or stopped taking writes: no close handshake.
    Lost,
}

/// Sends a close frame and waits for the peer's, bounded like every write: a
/// peer that is not reading must not keep this task (and its membership
/// clean-up) waiting forever.
async fn close_socket(
    mut sink: SplitSink<WebSocket, Message>,
    code: u16,
    reason: &'static str,
    limit: Duration,
) {
    tracing::debug!(code, reason, "closing");
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    if send_within(&mut sink, Message::Close(Some(frame)), limit).await {
        let _ = tokio::time::timeout(limit, sink.close()).await;
    }
}

/// Writes one message; false when the connection is unusable: the write failed,
/// or the peer made no room for it within `limit`.
///
/// A peer that stops reading fills the socket buffers, and then a write waits for
/// space forever. While it waits, nothing else in the session loop runs — not the
/// idle check, not the overflow (1013) or shutdown close — so without a bound such
/// a peer would hold its task, queue and slot until the process exits. A peer that
/// accepts nothing for a whole idle timeout is as gone as one that sends nothing.
async fn send_within(
    sink: &mut SplitSink<WebSocket, Message>,
    message: Message,
    limit: Duration,
) -> bool {
    let mut send = sink.send(message);
    // Almost every write completes at once (the socket has room); only one
    // that has to wait pays for a timer.
    if let Poll::Ready(result) = futures_util::poll!(&mut send) {
        return result.is_ok();
    }
    match tokio::time::timeout(limit, send).await {
        Ok(result) => result.is_ok(),
        Err(_) => {
            tracing::debug!(waited = ?limit, "peer stopped reading; dropping the connection");
            false
        }
    }
}

/// The close a read error calls for: 1009 for a frame or message over the
/// size limit, 1007 for text that is not UTF-8, 1002 for any other breach of
/// the WebSocket protocol (unmasked frames, unknown opcodes, bad control
/// frames); none when the connection itself failed.
fn violation(err: &axum::Error) -> Option<(u16, &'static str)> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        match e.downcast_ref::<tungstenite::Error>() {
            Some(tungstenite::Error::Capacity(_)) => {
                return Some((close::TOO_BIG, "frame too large"));
            }
            Some(tungstenite::Error::Utf8(_)) => {
                return Some((close::INVALID_DATA, "text frame is not valid UTF-8"));
            }
            Some(tungstenite::Error::Protocol(_)) => {
                return Some((close::PROTOCOL_ERROR, "WebSocket protocol violation"));
            }
            Some(_) => return None,
            None => source = e.source(),
        }
    }
    None
}

impl Session {
    /// Applies the per-connection rate limit; false means "drop this message".
    fn admit(&mut self) -> bool {
        if self.limiter.check().is_ok() {
            return true;
        }
        self.reply_error(&WsError::new(
            "rate_limited",
            "too many messages; slow down",
        ));
        false
    }

    fn reply(&self, frame: Frame, kind: &'static str) {
        metrics::counter!("croupier_ws_messages_sent_total", "type" => kind).increment(1);
        self.out.push(&frame);
    }

    fn reply_error(&self, err: &WsError) {
        self.reply(frames::error(err.code, &err.message), "error");
    }

    async fn on_text(&mut self, text: &str) {
        if !self.admit() {
            return;
        }
        let message = match messages::parse(text, self.state.config.max_history) {
            Ok(message) => message,
            Err(err) => {
                metrics::counter!("croupier_ws_messages_received_total", "type" => "other")
                    .increment(1);
                self.reply_error(&err);
                return;
            }
        };
        metrics::counter!("croupier_ws_messages_received_total", "type" => message.kind())
            .increment(1);
        self.info.last_activity = Utc::now();
        if let Err(err) = self.handle(message).await {
            self.reply_error(&err);
        }
    }

    async fn handle(&mut self, message: ClientMessage) -> Result<(), WsError> {
        match message {
            ClientMessage::Ping => {
                self.reply(frames::pong(), "pong");
                Ok(())
            }
            ClientMessage::Join {
                key,
                token,
                version,
                epoch,
            } => {
                let (dialect, greeting) = match version {
                    None => (Dialect::V1, Greeting::Sync),
                    Some(Version::ZERO) => (Dialect::V2, Greeting::Sync),
                    Some(version) => (Dialect::V2, Greeting::Resume { version, epoch }),
                };
                self.join(key, token.as_deref(), dialect, greeting)
                    .await
                    .map(|_| ())
            }
            ClientMessage::Leave { key } => {
                self.leave(&key).await;
                Ok(())
            }
            ClientMessage::GetHistory { key, token } => {
                let dialect = self.dialect_in(&key).unwrap_or(Dialect::Seed);
                self.join(key, token.as_deref(), dialect, Greeting::HistoryUpdate)
                    .await
                    .map(|_| ())
            }
            ClientMessage::Add {
                key,
                number,
                token,
                id,
            } => {
                let key = self.member_room(key)?;
                self.mutate(key, token.as_deref(), Change::Added(number), id)
                    .await
            }
            ClientMessage::Remove {
                key,
                index,
                token,
                id,
            } => {
                let key = self.member_room(key)?;
                self.mutate(key, token.as_deref(), Change::Removed(index), id)
                    .await
            }
            ClientMessage::Update {
                key,
                history,
                token,
                id,
            } => {
                let key = self.member_room(key)?;
                self.mutate(key, token.as_deref(), Change::Replaced(history), id)
                    .await
            }
            ClientMessage::SaveNumber {
                key,
                number,
                token,
                id,
            } => {
                if self.ensure_seed_member(&key, token.as_deref()).await? {
                    self.mutate(key, token.as_deref(), Change::Added(number), id)
                        .await?;
                }
                Ok(())
            }
            ClientMessage::UpdateHistory {
                key,
                history,
                token,
                id,
            } => {
                if self.ensure_seed_member(&key, token.as_deref()).await? {
                    self.mutate(key, token.as_deref(), Change::Replaced(history), id)
                        .await?;
                }
                Ok(())
            }
        }
    }

    fn joined(&self, key: &RoomKey) -> Option<&Joined> {
        self.rooms.iter().find(|room| room.key == *key)
    }

    fn dialect_in(&self, key: &RoomKey) -> Option<Dialect> {
        self.joined(key).map(|room| room.dialect)
    }

    /// The room a mutation targets: its `key`, else the most recently joined room.
    /// Either way the connection must be a member.
    fn member_room(&self, key: Option<RoomKey>) -> Result<RoomKey, WsError> {
        let not_joined = || WsError::new("not_joined", "join the room before changing it");
        match key {
            Some(key) if self.dialect_in(&key).is_some() => Ok(key),
            Some(_) => Err(not_joined()),
            None => self
                .rooms
                .last()
                .map(|room| room.key.clone())
                .ok_or_else(not_joined),
        }
    }

    /// Makes this connection a seed-dialect member unless it already is one in
    /// some dialect. False when the room refused it (`authRequired` was sent):
    /// the caller must not write.
    async fn ensure_seed_member(
        &mut self,
        key: &RoomKey,
        token: Option<&str>,
    ) -> Result<bool, WsError> {
        if self.dialect_in(key).is_some() {
            return Ok(true);
        }
        self.join(key.clone(), token, Dialect::Seed, Greeting::Nothing)
            .await
    }

    /// Joins a room after checking its token. `Ok(false)`: the room is protected
    /// and the token did not fit; `authRequired` was sent, and a membership the
    /// connection already had in the room is gone.
    async fn join(
        &mut self,
        key: RoomKey,
        token: Option<&str>,
        dialect: Dialect,
        greeting: Greeting,
    ) -> Result<bool, WsError> {
        let already = self.joined(&key).is_some();
        if !already && self.rooms.len() >= self.state.config.ws.max_rooms {
            return Err(WsError::new(
                "too_many_rooms",
                format!(
                    "a connection may join at most {} rooms",
                    self.state.config.ws.max_rooms
                ),
            ));
        }
        match self.state.rooms.authorize(&key, token).await {
            Ok(()) => {}
            Err(AccessError::Token(err)) => {
                let message = match err {
                    TokenError::Missing => "this room is protected; a token is required",
                    TokenError::Invalid | TokenError::OtherRoom => {
                        "the token is not valid for this room"
                    }
                };
                self.reply(frames::auth_required(&key, message), "authRequired");
                self.leave(&key).await;
                return Ok(false);
            }
            Err(err) => return Err(access_error(err)),
        }
        let with_token = token.is_some() && self.state.rooms.auth().verify(token, &key).is_ok();
        let member = Member {
            conn_id: self.number,
            dialect,
            authorized: with_token,
            outbox: self.out.clone(),
        };
        match self.state.rooms.join(&key, member, greeting).await {
            Ok(()) => {}
            // Protected between the check above and the room task's turn.
            Err(StoreError::AuthRequired) => {
                let message = "this room is protected; a token is required";
                self.reply(frames::auth_required(&key, message), "authRequired");
                self.leave(&key).await;
                return Ok(false);
            }
            Err(err) => return Err(store_error(err)),
        }
        self.rooms.retain(|room| room.key != key);
        self.rooms.push(Joined {
            key: key.clone(),
            dialect,
            with_token,
        });
        if !already {
            if let Err(err) = self.state.cluster.count_join(&key).await {
                tracing::debug!(error = %err, "join count failed");
            }
            self.publish_presence().await;
        }
        Ok(true)
    }

    /// Applies a change as this connection; the event reaches it through its
    /// membership, in order, like every other member (there is no separate
    /// acknowledgement). A room that turned out protected removes the
    /// connection, which is told so in its dialect.
    async fn mutate(
        &mut self,
        key: RoomKey,
        token: Option<&str>,
        change: Change,
        id: Option<MutationId>,
    ) -> Result<(), WsError> {
        let writer = Writer {
            client: self.client,
            token,
            joined_with_token: self.joined(&key).is_some_and(|room| room.with_token),
        };
        match self
            .state
            .rooms
            .mutate(writer, key.clone(), change, id)
            .await
        {
            Ok(_) => Ok(()),
            Err(AccessError::Token(_) | AccessError::Store(StoreError::AuthRequired)) => {
                let message = "this room is protected; a token is required";
                let frame = match self.dialect_in(&key) {
                    Some(Dialect::V1 | Dialect::Seed) => frames::error("auth_required", message),
                    _ => frames::auth_required(&key, message),
                };
                self.reply(frame, "authRequired");
                self.leave(&key).await;
                Ok(())
            }
            Err(err) => Err(access_error(err)),
        }
    }

    /// Leaves a room if this connection is a member.
    async fn leave(&mut self, key: &RoomKey) {
        if self.joined(key).is_some() {
            self.state.rooms.leave(key, self.number);
            self.forget(key).await;
        }
    }

    /// Forgets a room the hub no longer counts this connection in.
    async fn forget(&mut self, key: &RoomKey) {
        let before = self.rooms.len();
        self.rooms.retain(|room| room.key != *key);
        if self.rooms.len() != before {
            self.publish_presence().await;
        }
    }

    /// The one line an operator reads about a connection that ended.
    fn log_end(&self, ending: &Ending, received: u64, sent: u64) {
        let (by, code, reason) = match ending {
            Ending::Server(code, reason) => ("server", Some(*code), *reason),
            Ending::Client(code) => ("client", *code, "closed by the client"),
            Ending::Lost => ("network", None, "connection lost"),
        };
        let seconds = (Utc::now() - self.info.connected_at).num_milliseconds() as f64 / 1e3;
        tracing::info!(
            closed_by = by,
            code = code.map(i64::from).unwrap_or(1006),
            reason,
            rooms = %self.info.rooms.join(","),
            client = %self.client,
            duration_s = %format_args!("{seconds:.1}"),
            messages_in = received,
            frames_out = sent,
            "websocket closed"
        );
    }

    /// Leaves every room and forgets the connection here and in the bus.
    async fn end(&self, id: &str) {
        for room in &self.rooms {
            self.state.rooms.leave(&room.key, self.number);
        }
        self.state.connections.unregister(id);
        if let Err(err) = self.state.cluster.remove_presence(id).await {
            tracing::debug!(error = %err, "presence removal failed");
        }
        metrics::gauge!("croupier_ws_connections").decrement(1.0);
    }

    async fn publish_presence(&mut self) {
        self.info.rooms = self.rooms.iter().map(|room| room.key.to_string()).collect();
        if let Err(err) = self.state.cluster.put_presence(&self.info).await {
            tracing::debug!(error = %err, "presence update failed");
        }
    }
}

fn access_error(err: AccessError) -> WsError {
    match err {
        AccessError::Token(err) => WsError::new("auth_required", err.to_string()),
        AccessError::Store(err) => store_error(err),
        AccessError::RateLimited(refused) => WsError::new(
            "rate_limited",
            format!(
                "too many changes from this address; try again in {} s",
                refused.retry_after_secs()
            ),
        ),
    }
}

fn store_error(err: StoreError) -> WsError {
    match err {
        StoreError::AuthRequired => WsError::new("auth_required", err.to_string()),
        StoreError::IndexOutOfRange { .. } => WsError::new("index_out_of_range", err.to_string()),
        StoreError::HistoryTooLong { .. } => WsError::new("history_too_long", err.to_string()),
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "database unavailable");
            WsError::new(
                "unavailable",
                "the service is temporarily unavailable; try again",
            )
        }
        StoreError::Internal(detail) => {
            tracing::error!(error = %detail, "internal error");
            WsError::new("internal", "internal error")
        }
    }
}
