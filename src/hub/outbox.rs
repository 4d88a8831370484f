//! A connection's outbound queue, bounded twice: by frames and by bytes.
//!
//! Room tasks and the connection itself push into it without waiting; the
//! connection's task drains it into the socket. A count bound alone does not
//! bound memory: a member that never reads can pin a thousand different
//! full-history frames. So every frame also counts its bytes while queued, and
//! a push past either bound cancels `overflow`: the connection closes with 1013
//! and the client resumes from its last version, instead of silently missing
//! events or holding memory others need.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use crate::domain::RoomKey;
use crate::protocol::frames::Frame;

/// What a connection's task takes from its queue.
#[derive(Debug)]
pub enum Outbound {
    /// A rendered frame for the socket.
    Frame(Frame),
    /// The room removed this connection (it became protected and the
    /// connection holds no token for it); the connection forgets the room.
    Removed(RoomKey),
}

/// The sending side, cloned into every membership of the connection.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Cancelled when the queue overflowed.
    overflow: CancellationToken,
}

/// The connection task's side.
pub struct Inbox {
    rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
}

/// A queue of at most `frames` entries and `max_bytes` bytes of frames (one
/// frame larger than that still passes when the queue is empty).
pub fn channel(frames: usize, max_bytes: usize) -> (Outbox, Inbox) {
    let (tx, rx) = mpsc::channel(frames);
    let shared = Arc::new(Shared {
        queued_bytes: AtomicUsize::new(0),
        max_bytes,
        overflow: CancellationToken::new(),
    });
    (
        Outbox {
            tx,
            shared: shared.clone(),
        },
        Inbox { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame; false when the connection must be dropped from the room:
    /// the queue overflowed (the connection is told to close with 1013) or the
    /// connection is gone.
    pub fn push(&self, frame: Frame) -> bool {
        let len = frame.len();
        let before = self.shared.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before > 0 && before + len > self.shared.max_bytes {
            self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return self.overflowed();
        }
        match self.tx.try_send(Outbound::Frame(frame)) {
            Ok(()) => true,
            Err(err) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                match err {
                    TrySendError::Full(_) => self.overflowed(),
                    TrySendError::Closed(_) => false,
                }
            }
        }
    }

    /// Tells the connection it is no longer a member of `key`. If the queue is
    /// full the connection is closing anyway (1013), which forgets every room.
    pub fn removed(&self, key: RoomKey) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Outbound::Removed(key)) {
            self.overflowed();
        }
    }

    /// Closes the connection with 1013 (the hub could not keep it in order).
    pub fn overflow(&self) {
        self.shared.overflow.cancel();
    }

    /// Cancelled once the connection must close because it fell behind.
    pub fn overflow_token(&self) -> &CancellationToken {
        &self.shared.overflow
    }

    fn overflowed(&self) -> bool {
        if !self.shared.overflow.is_cancelled() {
            metrics::counter!("croupier_ws_slow_consumer_closes_total").increment(1);
        }
        self.shared.overflow.cancel();
        false
    }
}

impl Inbox {
    /// The next entry; its bytes no longer count against the bound.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let next = self.rx.recv().await;
        if let Some(Outbound::Frame(frame)) = &next {
            self.shared
                .queued_bytes
                .fetch_sub(frame.len(), Ordering::Relaxed);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Frame {
        Frame::from("x".repeat(len))
    }

    #[tokio::test]
    async fn bytes_bound_the_queue_as_well_as_frames() {
        let (outbox, mut inbox) = channel(100, 10);
        assert!(outbox.push(frame(6)));
        assert!(!outbox.push(frame(6)), "12 bytes would exceed 10");
        assert!(outbox.overflow_token().is_cancelled());
        let Some(Outbound::Frame(first)) = inbox.recv().await else {
            panic!("the first frame stays queued");
        };
        assert_eq!(first.len(), 6);
    }

    #[tokio::test]
    async fn a_large_frame_passes_an_empty_queue_and_bytes_are_given_back() {
        let (outbox, mut inbox) = channel(100, 10);
        assert!(outbox.push(frame(50)));
        assert!(inbox.recv().await.is_some());
        assert!(outbox.push(frame(8)));
        assert!(!outbox.overflow_token().is_cancelled());
    }

    #[tokio::test]
    async fn the_frame_count_still_holds() {
        let (outbox, _inbox) = channel(2, 1000);
        assert!(outbox.push(frame(1)));
        assert!(outbox.push(frame(1)));
        assert!(!outbox.push(frame(1)));
        assert!(outbox.overflow_token().is_cancelled());
    }
}
