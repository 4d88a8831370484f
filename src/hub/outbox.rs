//! A connection's outbound path: its socket's write side, shared by the
//! connection's own task and every room that delivers to it, with a queue
//! bounded twice, by frames and by bytes.
//!
//! A room writes each event straight into the member's socket (one
//! non-blocking `writev` of the frame's header and its shared payload) when
//! nothing is queued before it. Only what the kernel does not take at once is
//! queued, and only then is the connection's task woken to write the rest when
//! the socket has room. Fan-out to ten thousand members is thus ten thousand
//! system calls from one task, not ten thousand task wake-ups, queue pushes and
//! pops, each touching the connection's cold state on another thread.
//!
//! Every write to the socket after the upgrade goes through the one lock here
//! and takes whole frames: frames written by rooms, and those tungstenite
//! writes itself (pongs, close frames) through the connection's socket wrapper
//! (`Socket::poll_write`). So frames never interleave mid-frame, and
//! nothing is written after a close frame.
//!
//! A count bound alone does not bound memory: a member that never reads can pin
//! a thousand different full-history frames. So every queued frame also counts
//! its bytes, and a push past either bound marks the queue overflowed: the
//! connection closes with 1013 and the client resumes from its last version,
//! instead of silently missing events or holding memory others need.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::AsyncWrite;
use tokio::net::tcp::OwnedWriteHalf;

use crate::domain::RoomKey;
use crate::protocol::frames::Frame;

/// What a connection's task must act on, from [`Inbox::poll_next`].
#[derive(Debug)]
pub enum Outbound {
    /// The room removed this connection (it became protected and the
    /// connection holds no token for it); the connection forgets the room.
    Removed(RoomKey),
    /// The queue went past a bound, or the hub could not keep the connection
    /// in order: close with 1013.
    Overflowed,
    /// Writing to the socket failed: the connection is gone.
    Failed,
}

/// The write side of one accepted TCP connection.
///
/// The HTTP listener creates it for every connection and writes through it;
/// once the connection is a WebSocket, [`channel`] gives the rooms their
/// [`Outbox`] onto it.
pub struct Socket {
    state: Mutex<State>,
}

struct State {
    io: OwnedWriteHalf,
    /// Frames not yet wholly written, oldest first.
    queue: VecDeque<Chunk>,
    /// Bytes of the first chunk already written.
    offset: usize,
    /// Bytes of `queue` not yet written.
    queued_bytes: usize,
    /// Text frames in `queue` (control frames do not count).
    queued_frames: usize,
    max_frames: usize,
    max_bytes: usize,
    /// The last time the queue became non-empty or the socket took some of it.
    progress: Instant,
    /// The connection task, woken when it has something to do: the queue
    /// became non-empty, a room removed it, the queue overflowed, a write failed.
    waker: Option<Waker>,
    removed: Vec<RoomKey>,
    overflowed: bool,
    failed: bool,
    /// A WebSocket session took the connection over: every write from now on
    /// is whole frames (set by [`channel`], after the upgrade's response).
    attached: bool,
    /// A close frame was written or queued: nothing may follow it.
    closed: bool,
    /// Text frames accepted, for the connection's closing log line.
    sent: u64,
}

/// A frame waiting in the queue.
enum Chunk {
    /// A text frame: its header, and the payload shared with every member.
    Text { header: Header, payload: Frame },
    /// Bytes tungstenite wrote (whole control frames), or a ping of ours.
    Raw(Box<[u8]>),
}

/// The header of an unmasked server-to-client text frame.
#[derive(Clone, Copy)]
struct Header {
    bytes: [u8; 10],
    len: u8,
}

impl Header {
    fn text(payload: usize) -> Header {
        let mut bytes = [0u8; 10];
        bytes[0] = 0x81; // FIN + text
        let len = if payload < 126 {
            bytes[1] = payload as u8;
            2
        } else if let Ok(short) = u16::try_from(payload) {
            bytes[1] = 126;
            bytes[2..4].copy_from_slice(&short.to_be_bytes());
            4
        } else {
            bytes[1] = 127;
            bytes[2..10].copy_from_slice(&(payload as u64).to_be_bytes());
            10
        };
        Header { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Text { header, payload } => header.as_slice().len() + payload.len(),
            Chunk::Raw(bytes) => bytes.len(),
        }
    }

    /// The unwritten bytes from `offset` on, as at most two slices.
    fn slices(&self, offset: usize) -> (&[u8], &[u8]) {
        match self {
            Chunk::Text { header, payload } => {
                let header = header.as_slice();
                match offset.checked_sub(header.len()) {
                    None => (&header[offset..], payload.as_bytes()),
                    Some(into) => (&[], &payload.as_bytes()[into..]),
                }
            }
            Chunk::Raw(bytes) => (&bytes[offset..], &[]),
        }
    }
}

/// At most this many slices per `writev` while draining a backlog.
const MAX_SLICES: usize = 64;

impl State {
    /// Queues `chunk`, of which the first `written` bytes already went out.
    fn enqueue(&mut self, chunk: Chunk, written: usize) {
        if self.queue.is_empty() {
            self.offset = written;
            self.progress = Instant::now();
            // The connection's task writes the rest once the socket has room.
            self.wake();
        }
        self.queued_bytes += chunk.len() - written;
        if matches!(chunk, Chunk::Text { .. }) {
            self.queued_frames += 1;
        }
        self.queue.push_back(chunk);
    }

    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Marks the queue overflowed (once counted) and tells the connection.
    fn overflow(&mut self) {
        if !self.overflowed {
            self.overflowed = true;
            metrics::counter!("croupier_ws_slow_consumer_closes_total").increment(1);
            self.wake();
        }
    }

    /// Forgets `written` bytes from the front of the queue.
    fn consume(&mut self, mut written: usize) {
        self.queued_bytes -= written;
        self.progress = Instant::now();
        while let Some(first) = self.queue.front() {
            let rest = first.len() - self.offset;
            if written < rest {
                self.offset += written;
                return;
            }
            written -= rest;
            self.offset = 0;
            if matches!(first, Chunk::Text { .. }) {
                self.queued_frames -= 1;
            }
            self.queue.pop_front();
        }
    }

    /// Writes the queue while the socket takes it. `Ok` when the queue is
    /// empty, or when the socket is full and `cx` will be woken once it has
    /// room; `Err` when the connection failed.
    fn drain(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let mut count = 0;
            let mut offset = self.offset;
            'gather: for chunk in &self.queue {
                let (a, b) = chunk.slices(offset);
                offset = 0;
                for part in [a, b] {
                    if part.is_empty() {
                        continue;
                    }
                    if count == MAX_SLICES {
                        break 'gather;
                    }
                    slices[count] = IoSlice::new(part);
                    count += 1;
                }
            }
            match self.io.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => self.consume(written),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    // Registers `cx` for the moment the socket has room again.
                    match self.io.as_ref().poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(err)) => return Err(err),
                        Poll::Pending => return Ok(()),
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Drops every queued frame not yet begun; a frame partly written stays,
    /// since the peer must get it whole before anything else.
    fn discard(&mut self) {
        let keep = usize::from(self.offset > 0);
        while self.queue.len() > keep {
            if let Some(chunk) = self.queue.pop_back() {
                self.queued_bytes -= chunk.len();
                if matches!(chunk, Chunk::Text { .. }) {
                    self.queued_frames -= 1;
                }
            }
        }
    }
}

impl Socket {
    pub fn new(io: OwnedWriteHalf) -> Socket {
        Socket {
            state: Mutex::new(State {
                io,
                queue: VecDeque::new(),
                offset: 0,
                queued_bytes: 0,
                queued_frames: 0,
                max_frames: usize::MAX,
                max_bytes: usize::MAX,
                progress: Instant::now(),
                waker: None,
                removed: Vec::new(),
                overflowed: false,
                failed: false,
                attached: false,
                closed: false,
                sent: 0,
            }),
        }
    }

    /// A std mutex: held for a non-blocking write or a queue update, never
    /// across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes like a socket until a WebSocket session takes the connection
    /// over ([`channel`]); from then on, whole frames only, queued in order with the rooms' frames.
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut state = self.lock();
        if state.attached {
            Self::write_frames(&mut state, cx, buf)
        } else {
            Pin::new(&mut state.io).poll_write(cx, buf)
        }
    }

    /// As [`Socket::poll_write`]; once attached, only the first non-empty
    /// buffer is taken (tungstenite writes whole frames from one buffer).
    pub fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.lock();
        if state.attached {
            let buf = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            Self::write_frames(&mut state, cx, buf)
        } else {
            Pin::new(&mut state.io).poll_write_vectored(cx, bufs)
        }
    }

    /// Ready once everything queued is written.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        state.drain(cx)?;
        if state.queue.is_empty() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    /// A write of whole WebSocket frames (tungstenite's own: pongs, close
    /// frames) on the upgraded connection, in order with the frames of rooms.
    ///
    /// The frames are taken whole or not at all, so a frame never interleaves
    /// with another: written directly when nothing is queued (what the socket
    /// does not take is queued), else queued behind the rest while the queue
    /// stays within its byte bound; beyond it this waits for the socket.
    fn write_frames(
        state: &mut State,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if state.queue.is_empty() {
            let written = match state.io.try_write(buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                Err(err) => return Poll::Ready(Err(err)),
            };
            if written < buf.len() {
                state.enqueue(Chunk::Raw(buf.into()), written);
            }
        } else {
            if state.queued_bytes.saturating_add(buf.len()) > state.max_bytes {
                state.drain(cx)?;
                if !state.queue.is_empty() {
                    return Poll::Pending;
                }
            }
            state.enqueue(Chunk::Raw(buf.into()), 0);
        }
        if contains_close(buf) {
            state.closed = true;
        }
        Poll::Ready(Ok(buf.len()))
    }

    /// Shuts the write direction down (after the queue, if any).
    pub fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.lock();
        state.drain(cx)?;
        if !state.queue.is_empty() {
            return Poll::Pending;
        }
        Pin::new(&mut state.io).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").finish_non_exhaustive()
    }
}

/// Whether `buf`, a run of whole unmasked frames, holds a close frame.
fn contains_close(mut buf: &[u8]) -> bool {
    while let [first, second, rest @ ..] = buf {
        if first & 0x0f == 0x8 {
            return true;
        }
        let (len, rest) = match second & 0x7f {
            126 if rest.len() >= 2 => (
                usize::from(u16::from_be_bytes([rest[0], rest[1]])),
                &rest[2..],
            ),
            127 if rest.len() >= 8 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&rest[..8]);
                (
                    usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX),
                    &rest[8..],
                )
            }
            126 | 127 => return false,
            len => (usize::from(len), rest),
        };
        let masked = if second & 0x80 != 0 { 4 } else { 0 };
        buf = rest.get(len.saturating_add(masked)..).unwrap_or_default();
    }
    false
}

/// A room's handle on a member's connection, cloned into every membership.
///
/// It does not keep the connection's socket open: once the connection's task
/// ends, pushes fail and the room drops the member.
#[derive(Debug, Clone)]
pub struct Outbox {
    socket: Weak<Socket>,
}

/// The connection task's side.
pub struct Inbox {
    socket: Arc<Socket>,
}

/// Sets the bounds of the upgraded connection's queue: at most `frames` text
/// frames and `max_bytes` bytes (one frame larger than that still passes when
/// the queue is empty).
pub fn channel(socket: Arc<Socket>, frames: usize, max_bytes: usize) -> (Outbox, Inbox) {
    {
        let mut state = socket.lock();
        state.max_frames = frames;
        state.max_bytes = max_bytes;
        state.attached = true;
    }
    (
        Outbox {
            socket: Arc::downgrade(&socket),
        },
        Inbox { socket },
    )
}

/// Frames up to this size are encoded whole (header and payload in one
/// buffer) once per thread and event; larger ones are written with `writev`.
const ENCODE_ONCE_MAX: usize = 4096;

thread_local! {
    /// The last small frame this thread wrote, encoded. A room pushes the same
    /// rendered frame to every member, so each event is encoded once and every
    /// member costs one plain `write`, as few bytes handled as the kernel
    /// allows. Holding the frame keeps its buffer alive, so an equal address
    /// means the same frame.
    static ENCODED: RefCell<Option<(Frame, Box<[u8]>)>> = const { RefCell::new(None) };
}

/// One non-blocking write of a text frame; how many bytes the socket took.
fn write_frame(io: &OwnedWriteHalf, header: Header, frame: &Frame) -> io::Result<usize> {
    if frame.len() > ENCODE_ONCE_MAX {
        return io.try_write_vectored(&[
            IoSlice::new(header.as_slice()),
            IoSlice::new(frame.as_bytes()),
        ]);
    }
    ENCODED.with_borrow_mut(|cached| {
        if cached
            .as_ref()
            .is_some_and(|(last, _)| last.as_ptr() != frame.as_ptr() || last.len() != frame.len())
        {
            *cached = None;
        }
        let (_, bytes) = cached.get_or_insert_with(|| {
            let mut bytes = Vec::with_capacity(header.as_slice().len() + frame.len());
            bytes.extend_from_slice(header.as_slice());
            bytes.extend_from_slice(frame.as_bytes());
            (frame.clone(), bytes.into())
        });
        io.try_write(bytes)
    })
}

impl Outbox {
    /// Sends a text frame: written to the socket at once when nothing is queued
    /// before it, else queued. False when the connection must be dropped from
    /// the room: the queue overflowed (the connection is told to close with
    /// 1013), or the connection is closing or gone.
    pub fn push(&self, frame: &Frame) -> bool {
        let Some(socket) = self.socket.upgrade() else {
            return false;
        };
        let mut state = socket.lock();
        if state.closed || state.overflowed || state.failed {
            return false;
        }
        let header = Header::text(frame.len());
        if state.queue.is_empty() {
            let written = match write_frame(&state.io, header, frame) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                Err(err) => {
                    tracing::debug!(error = %err, "write failed");
                    state.failed = true;
                    state.wake();
                    return false;
                }
            };
            state.sent += 1;
            if written < header.as_slice().len() + frame.len() {
                state.enqueue(
                    Chunk::Text {
                        header,
                        payload: frame.clone(),
                    },
                    written,
                );
            }
            return true;
        }
        let len = header.as_slice().len() + frame.len();
        if state.queued_frames >= state.max_frames
            || state.queued_bytes.saturating_add(len) > state.max_bytes
        {
            state.overflow();
            return false;
        }
        state.sent += 1;
        // The connection's task was woken when the queue became non-empty and
        // writes this one after the others.
        state.enqueue(
            Chunk::Text {
                header,
                payload: frame.clone(),
            },
            0,
        );
        true
    }

    /// Tells the connection it is no longer a member of `key`.
    pub fn removed(&self, key: RoomKey) {
        let Some(socket) = self.socket.upgrade() else {
            return;
        };
        let mut state = socket.lock();
        if state.removed.len() >= state.max_frames {
            // As full as a queue can be: the connection closes anyway (1013),
            // which forgets every room.
            state.overflow();
            return;
        }
        state.removed.push(key);
        state.wake();
    }

    /// Closes the connection with 1013 (the hub could not keep it in order).
    pub fn overflow(&self) {
        if let Some(socket) = self.socket.upgrade() {
            socket.lock().overflow();
        }
    }
}

impl Inbox {
    /// Writes what is queued while the socket takes it, and resolves with the
    /// next thing the connection must act on.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Outbound> {
        let mut state = self.socket.lock();
        if state.failed {
            return Poll::Ready(Outbound::Failed);
        }
        if state.overflowed {
            return Poll::Ready(Outbound::Overflowed);
        }
        if let Some(key) = state.removed.pop() {
            return Poll::Ready(Outbound::Removed(key));
        }
        if let Err(err) = state.drain(cx) {
            tracing::debug!(error = %err, "write failed");
            state.failed = true;
            return Poll::Ready(Outbound::Failed);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Queues a ping (written at once if nothing waits before it).
    pub fn ping(&self) {
        const PING: [u8; 2] = [0x89, 0x00];
        let mut state = self.socket.lock();
        if state.closed || state.failed {
            return;
        }
        if state.queue.is_empty() {
            match state.io.try_write(&PING) {
                Ok(2) => {}
                Ok(n) => state.enqueue(Chunk::Raw(PING.into()), n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    state.enqueue(Chunk::Raw(PING.into()), 0)
                }
                Err(err) => {
                    tracing::debug!(error = %err, "write failed");
                    state.failed = true;
                    state.wake();
                }
            }
        } else {
            state.enqueue(Chunk::Raw(PING.into()), 0);
        }
    }

    /// How long the socket has taken nothing of a non-empty queue.
    pub fn stalled_for(&self) -> Option<Duration> {
        let state = self.socket.lock();
        (!state.queue.is_empty()).then(|| state.progress.elapsed())
    }

    /// No frame may be pushed any more: the connection is about to close. With
    /// `discard`, what is queued and not yet begun is dropped too (a client that
    /// fell behind resumes from its last version anyway).
    pub fn close(&self, discard: bool) {
        let mut state = self.socket.lock();
        state.closed = true;
        if discard {
            state.discard();
        }
    }

    /// Text frames sent or queued so far.
    pub fn sent(&self) -> u64 {
        self.socket.lock().sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: the socket under test, and the peer's end.
    async fn pair() -> (Arc<Socket>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, client) = tokio::join!(listener.accept(), client);
        let (server, _) = accepted.unwrap();
        let (_read, write) = server.into_split();
        (Arc::new(Socket::new(write)), client.unwrap())
    }

    fn frame(len: usize) -> Frame {
        Frame::from("x".repeat(len))
    }

    /// Reads one unmasked text frame's payload length.
    async fn read_frame(peer: &mut TcpStream) -> usize {
        let mut head = [0u8; 2];
        peer.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x81);
        let len = match head[1] {
            126 => usize::from(peer.read_u16().await.unwrap()),
            127 => peer.read_u64().await.unwrap() as usize,
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        peer.read_exact(&mut payload).await.unwrap();
        len
    }

    async fn next(inbox: &mut Inbox) -> Option<Outbound> {
        let poll = std::future::poll_fn(|cx| inbox.poll_next(cx));
        tokio::time::timeout(Duration::from_millis(50), poll)
            .await
            .ok()
    }

    #[tokio::test]
    async fn frames_are_written_directly_and_framed() {
        let (socket, mut peer) = pair().await;
        let (outbox, mut inbox) = channel(socket, 4, 1000);
        assert!(outbox.push(&frame(5)));
        assert!(outbox.push(&frame(300)));
        assert!(outbox.push(&frame(70_000)));
        assert!(next(&mut inbox).await.is_none(), "nothing to act on");
        assert_eq!(read_frame(&mut peer).await, 5);
        assert_eq!(read_frame(&mut peer).await, 300);
        // 70 KB passes an empty queue although the bound is 1000 bytes; the
        // kernel may leave part of it queued, which the connection writes.
        let reader = tokio::spawn(async move { read_frame(&mut peer).await });
        let drive = async { while next(&mut inbox).await.is_some() {} };
        let (read, ()) = tokio::join!(reader, drive);
        assert_eq!(read.unwrap(), 70_000);
        assert_eq!(inbox.sent(), 3);
    }

    /// Fills the kernel's buffers of a peer that does not read.
    fn fill(outbox: &Outbox) {
        let big = frame(64 * 1024);
        for _ in 0..10_000 {
            let Some(socket) = outbox.socket.upgrade() else {
                return;
            };
            if !socket.lock().queue.is_empty() {
                return;
            }
            drop(socket);
            assert!(outbox.push(&big.clone()));
        }
        panic!("the socket never filled");
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_as_well_as_frames() {
        let (socket, _peer) = pair().await;
        let (outbox, mut inbox) = channel(socket, 100, 10);
        fill(&outbox);
        // The queue holds part of a 64 KiB frame, far over 10 bytes.
        assert!(!outbox.push(&frame(6)));
        assert!(matches!(next(&mut inbox).await, Some(Outbound::Overflowed)));
        assert!(!outbox.push(&frame(1)), "no pushes after an overflow");
    }

    #[tokio::test]
    async fn the_frame_count_still_holds() {
        let (socket, _peer) = pair().await;
        let (outbox, mut inbox) = channel(socket, 3, usize::MAX);
        fill(&outbox);
        assert!(outbox.push(&frame(1)));
        assert!(outbox.push(&frame(1)));
        assert!(!outbox.push(&frame(1)), "a fourth queued frame");
        assert!(matches!(next(&mut inbox).await, Some(Outbound::Overflowed)));
    }

    #[tokio::test]
    async fn removal_reaches_the_connection_and_a_closed_one_takes_nothing() {
        let (socket, _peer) = pair().await;
        let (outbox, mut inbox) = channel(socket, 4, 1000);
        let key = RoomKey::parse("room").unwrap();
        outbox.removed(key.clone());
        assert!(matches!(next(&mut inbox).await, Some(Outbound::Removed(k)) if k == key));
        inbox.close(false);
        assert!(!outbox.push(&frame(1)));
        drop(inbox);
        assert!(!outbox.push(&frame(1)), "the socket is gone");
    }

    #[tokio::test]
    async fn tungstenites_frames_queue_behind_ours_and_a_close_ends_pushes() {
        let (socket, mut peer) = pair().await;
        let (outbox, mut inbox) = channel(socket.clone(), 100, usize::MAX);
        fill(&outbox);
        assert!(outbox.push(&frame(3)));
        let close = [0x88, 0x02, 0x03, 0xe8];
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            socket.poll_write(&mut cx, &close),
            Poll::Ready(Ok(4))
        ));
        assert!(!outbox.push(&frame(1)), "nothing after a close frame");
        // Everything arrives in order, the close frame last.
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.unwrap();
            all
        });
        let drive = async {
            while next(&mut inbox).await.is_some() {}
            std::future::poll_fn(|cx| socket.poll_shutdown(cx))
                .await
                .unwrap();
        };
        drive.await;
        drop(inbox);
        drop(outbox);
        let all = reader.await.unwrap();
        assert!(all.ends_with(&[0x81, 3, b'x', b'x', b'x', 0x88, 0x02, 0x03, 0xe8]));
    }

    #[test]
    fn close_frames_are_found_among_others() {
        assert!(contains_close(&[0x88, 0x00]));
        assert!(contains_close(&[0x8a, 0x01, 0x00, 0x88, 0x00]));
        assert!(!contains_close(&[0x8a, 0x01, 0x88]));
        assert!(!contains_close(&[0x81, 0x7e, 0x00, 0x02, 0x88, 0x88]));
    }
}
