//! One room's task: the mirror of the room and its local members.
//!
//! The task is the only place that touches its members and mirror, so ordering
//! needs no locks: commands are handled one at a time, in arrival order.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use chrono::Utc;
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};

use super::view::{Snapshot, View};
use super::{Command, Greeting, Hub, Member};
use crate::domain::{History, RoomEvent, RoomKey, Version};
use crate::protocol::frames::{self, Dialect, Frame};
use crate::store::StoreError;

/// How long events that arrived ahead of a gap wait for the missing ones
/// before the room task reads them from the store's event log.
const GAP_WAIT: Duration = Duration::from_millis(5);

struct Mirror {
    history: History,
    version: Version,
    /// `None` while the room does not exist in the store yet.
    epoch: Option<Arc<str>>,
    /// `None` until known: a room created after the mirror was loaded may have
    /// been created with a password.
    protected: Option<bool>,
}

struct RoomTask {
    hub: Hub,
    key: RoomKey,
    generation: u64,
    view: Arc<View>,
    mirror: Option<Mirror>,
    recent: VecDeque<RoomEvent>,
    /// Events that arrived ahead of a gap, waiting for the gap to be filled.
    pending: BTreeMap<Version, RoomEvent>,
    members: Vec<Member>,
}

pub(super) fn spawn(
    hub: Hub,
    key: RoomKey,
    generation: u64,
    view: Arc<View>,
    rx: mpsc::UnboundedReceiver<Command>,
) {
    let task = RoomTask {
        hub,
        key,
        generation,
        view,
        mirror: None,
        recent: VecDeque::new(),
        pending: BTreeMap::new(),
        members: Vec::new(),
    };
    tokio::spawn(task.run(rx));
}

impl RoomTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        metrics::gauge!("croupier_rooms_active").increment(1.0);
        let bus = self.hub.inner.bus.clone();
        // Subscribe before the first snapshot is read, so an event committed after
        // the snapshot cannot pass by unseen. If the bus is down, local events still
        // flow and the bus asks for a catch-up once it is back.
        if let Err(err) = bus.subscribe(&self.key).await {
            tracing::warn!(room = %self.key, error = %err, "bus subscribe failed");
        }
        let linger = self.hub.inner.config.linger;
        let read_linger = self.hub.inner.config.read_linger;
        // When an event arrived ahead of a gap: the moment to stop waiting for the
        // missing ones and read them from the store.
        let mut gap_deadline: Option<Instant> = None;
        loop {
            let deadline = match gap_deadline {
                Some(deadline) => Some(deadline),
                None if self.members.is_empty() => Some(Instant::now() + linger),
                None => None,
            };
            let received = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline, rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            };
            match received {
                Some(Some(command)) => self.handle(command).await,
                Some(None) => break,
                None if gap_deadline.is_some() => self.catch_up().await,
                None if self.view.idle() < read_linger => continue,
                None if self.hub.try_retire(&self.key, self.generation, &rx) => break,
                None => continue,
            }
            gap_deadline = match gap_deadline {
                _ if self.pending.is_empty() => None,
                None => Some(Instant::now() + GAP_WAIT),
                // Still missing after a catch-up: try again later.
                Some(deadline) if deadline <= Instant::now() => Some(Instant::now() + GAP_WAIT),
                waiting => waiting,
            };
            if self.mirror.as_ref().is_some_and(|m| m.protected.is_none()) {
                self.learn_protection().await;
            }
        }
        self.view.clear();
        if let Err(err) = bus.unsubscribe(&self.key).await {
            tracing::debug!(room = %self.key, error = %err, "bus unsubscribe failed");
        }
        metrics::gauge!("croupier_rooms_active").decrement(1.0);
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Join {
                member,
                greeting,
                reply,
            } => {
                let result = self.join(member, greeting).await;
                let _ = reply.send(result);
            }
            Command::Leave { conn_id } => self.members.retain(|m| m.conn_id != conn_id),
            Command::Event(event) => self.on_event(event).await,
            Command::CatchUp => {
                if self.mirror.is_some() {
                    self.catch_up().await;
                }
            }
            Command::Protected => self.on_protected().await,
            Command::Watch => {
                self.view.touch();
                if self.mirror.is_none()
                    && let Err(err) = self.load().await
                {
                    tracing::debug!(room = %self.key, error = %err, "cannot load a read room");
                }
            }
        }
    }

    /// Publishes the mirror as the room's read snapshot, or withdraws the
    /// snapshot while the mirror cannot answer a read on its own.
    fn publish_view(&self) {
        match &self.mirror {
            Some(Mirror {
                history,
                version,
                epoch: Some(epoch),
                protected: Some(protected),
            }) if !self.view.shows(epoch, *version) => self.view.publish(Arc::new(Snapshot::new(
                *version,
                epoch.clone(),
                *protected,
                history.clone(),
            ))),
            // Already shown: a writer here offered this version before the
            // event reached the task; no need to copy the history again.
            Some(Mirror {
                epoch: Some(_),
                protected: Some(_),
                ..
            }) => {}
            _ => self.view.clear(),
        }
    }

    /// The room came into existence after the mirror was loaded: ask the store
    /// whether it was created with a password (fixed from then on).
    async fn learn_protection(&mut self) {
        let Some(epoch) = self.mirror.as_ref().and_then(|m| m.epoch.clone()) else {
            return;
        };
        match self.hub.inner.store.room(&self.key).await {
            Ok(Some(room)) if room.epoch == epoch => {
                if let Some(mirror) = &mut self.mirror {
                    mirror.protected = Some(room.protected);
                }
                self.publish_view();
            }
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(room = %self.key, error = %err, "cannot look up room protection")
            }
        }
    }

    async fn load(&mut self) -> Result<(), StoreError> {
        let room = self.hub.inner.store.room(&self.key).await?;
        self.mirror = Some(match room {
            Some(room) => Mirror {
                history: room.history,
                version: room.version,
                epoch: Some(room.epoch),
                protected: Some(room.protected),
            },
            None => Mirror {
                history: History::default(),
                version: 0,
                epoch: None,
                protected: None,
            },
        });
        self.recent.clear();
        self.pending.clear();
        self.publish_view();
        Ok(())
    }

    async fn join(&mut self, member: Member, greeting: Greeting) -> Result<(), StoreError> {
        if self.mirror.is_none() {
            self.load().await?;
        }
        self.members.retain(|m| m.conn_id != member.conn_id);
        let Some(mirror) = &self.mirror else {
            return Err(StoreError::Internal(
                "room mirror missing after load".into(),
            ));
        };
        // The room may have become protected after the connection checked it.
        if mirror.protected == Some(true) && !member.authorized {
            return Err(StoreError::AuthRequired);
        }
        let epoch = mirror.epoch.as_deref();
        let mut greeting_frames: Vec<(Frame, &'static str)> = Vec::new();
        match greeting {
            Greeting::Sync => greeting_frames.push((
                frames::full_state(
                    member.dialect,
                    &self.key,
                    &mirror.history,
                    mirror.version,
                    epoch,
                ),
                frames::full_state_type(member.dialect),
            )),
            Greeting::HistoryUpdate => greeting_frames.push((
                frames::history_update(&self.key, &mirror.history),
                "historyUpdate",
            )),
            Greeting::Nothing => {}
            Greeting::Resume {
                version,
                epoch: client_epoch,
            } => {
                let replay = if client_epoch.is_some_and(|e| Some(e.as_str()) != epoch) {
                    None
                } else {
                    self.missed_events(version).await
                };
                let Some(mirror) = self.mirror.as_ref() else {
                    return Err(StoreError::Internal(
                        "room mirror missing after load".into(),
                    ));
                };
                match replay {
                    Some(events) => {
                        for event in &events {
                            greeting_frames.push((
                                frames::event(member.dialect, event, &mirror.history),
                                frames::frame_type(member.dialect, &event.change),
                            ));
                        }
                        greeting_frames.push((
                            frames::recovered(&self.key, mirror.version, epoch),
                            "recovered",
                        ));
                    }
                    None => {
                        metrics::counter!("croupier_ws_resyncs_total").increment(1);
                        greeting_frames.push((
                            frames::sync_v2(
                                &self.key,
                                &mirror.history,
                                mirror.version,
                                mirror.epoch.as_deref(),
                            ),
                            "sync",
                        ));
                    }
                }
            }
        }
        for (_, kind) in &greeting_frames {
            metrics::counter!("croupier_ws_messages_sent_total", "type" => *kind).increment(1);
        }
        if greeting_frames
            .into_iter()
            .all(|(frame, _)| member.outbox.push(frame))
        {
            self.members.push(member);
        }
        Ok(())
    }

    /// The events after `version` up to the mirror's version, if every one can
    /// be replayed (from memory, else from the store's log) and they fit the
    /// member's queue. `None` means "send a full sync instead".
    async fn missed_events(&self, version: Version) -> Option<Vec<RoomEvent>> {
        let mirror = self.mirror.as_ref()?;
        if version > mirror.version {
            return None;
        }
        let missing = (mirror.version - version) as usize;
        if missing + 2 > self.hub.inner.config.queue_capacity {
            return None;
        }
        if missing == 0 {
            return Some(Vec::new());
        }
        if self
            .recent
            .front()
            .is_some_and(|e| e.version <= version + 1)
        {
            return Some(
                self.recent
                    .iter()
                    .filter(|e| e.version > version)
                    .cloned()
                    .collect(),
            );
        }
        let events = self
            .hub
            .inner
            .store
            .events_since(&self.key, version)
            .await
            .ok()??;
        let events: Vec<RoomEvent> = events
            .into_iter()
            .filter(|e| e.version <= mirror.version && Some(&e.epoch) == mirror.epoch.as_ref())
            .collect();
        (events.len() == missing).then_some(events)
    }

    async fn on_event(&mut self, event: RoomEvent) {
        let Some(mirror) = &self.mirror else {
            // Not loaded: there are no members yet; the first join reads the store.
            return;
        };
        if mirror.epoch.as_ref().is_some_and(|e| *e != event.epoch) {
            // The room was recreated or the database restored: start over.
            self.resync_all().await;
            return;
        }
        if event.version <= mirror.version {
            return; // already delivered (the same event came by two paths)
        }
        if event.version > mirror.version + 1 {
            // Usually the missing events are already on their way: writers of
            // one committed group are answered in any order, and publishes may
            // overtake each other. The run loop reads the store only if they do
            // not arrive within `GAP_WAIT`.
            self.pending.insert(event.version, event);
            return;
        }
        self.apply_and_deliver(event);
        self.drain_pending();
    }

    /// Delivers everything the store has after the mirror's version.
    async fn catch_up(&mut self) {
        let Some(version) = self.mirror.as_ref().map(|m| m.version) else {
            return;
        };
        match self.hub.inner.store.events_since(&self.key, version).await {
            Ok(Some(events)) => {
                for event in events {
                    let current = self.mirror.as_ref().map(|m| (m.version, m.epoch.clone()));
                    match current {
                        Some((_, Some(epoch))) if epoch != event.epoch => {
                            self.resync_all().await;
                            return;
                        }
                        Some((v, _)) if event.version == v + 1 => self.apply_and_deliver(event),
                        _ => {}
                    }
                }
                self.drain_pending();
            }
            Ok(None) => self.resync_all().await,
            Err(err) => {
                tracing::warn!(room = %self.key, error = %err, "cannot fill event gap; closing members so they resume");
                self.drop_all_members();
            }
        }
    }

    fn drain_pending(&mut self) {
        while let Some(mirror) = &self.mirror {
            let next = mirror.version + 1;
            self.pending.retain(|v, _| *v >= next);
            match self.pending.remove(&next) {
                Some(event) => self.apply_and_deliver(event),
                None => break,
            }
        }
    }

    /// Reloads the room and sends every member its full state.
    async fn resync_all(&mut self) {
        if let Err(err) = self.load().await {
            tracing::warn!(room = %self.key, error = %err, "cannot reload room; closing members so they resume");
            self.drop_all_members();
            return;
        }
        let Some(mirror) = &self.mirror else { return };
        metrics::counter!("croupier_ws_resyncs_total").increment(self.members.len() as u64);
        for member in &self.members {
            let kind = frames::full_state_type(member.dialect);
            metrics::counter!("croupier_ws_messages_sent_total", "type" => kind).increment(1);
        }
        let mut rendered: [Option<Frame>; 3] = Default::default();
        let key = &self.key;
        self.members.retain(|member| {
            let frame = rendered[dialect_slot(member.dialect)]
                .get_or_insert_with(|| {
                    frames::full_state(
                        member.dialect,
                        key,
                        &mirror.history,
                        mirror.version,
                        mirror.epoch.as_deref(),
                    )
                })
                .clone();
            member.outbox.push(frame)
        });
    }

    /// The room was created with a password while members could join it
    /// openly: every member without a valid token is removed, told so in its
    /// dialect, and gets nothing further from the room. Protection never goes
    /// away again, so the message needs no check; the mirror is reloaded to
    /// learn the new room's epoch and protection.
    async fn on_protected(&mut self) {
        let key = &self.key;
        self.members.retain(|member| {
            if member.authorized {
                return true;
            }
            let message = "this room is now protected; a token is required";
            let (frame, kind) = match member.dialect {
                Dialect::V2 => (frames::auth_required(key, message), "authRequired"),
                Dialect::V1 | Dialect::Seed => (frames::error("auth_required", message), "error"),
            };
            metrics::counter!("croupier_ws_messages_sent_total", "type" => kind).increment(1);
            member.outbox.push(frame);
            member.outbox.removed(key.clone());
            false
        });
        if self.mirror.is_some()
            && let Err(err) = self.load().await
        {
            tracing::warn!(room = %self.key, error = %err, "cannot reload a protected room; closing members so they rejoin");
            self.drop_all_members();
        }
    }

    fn drop_all_members(&mut self) {
        for member in self.members.drain(..) {
            member.outbox.overflow();
        }
        self.mirror = None;
        self.pending.clear();
        self.recent.clear();
        self.view.clear();
    }

    fn apply_and_deliver(&mut self, event: RoomEvent) {
        let Some(mirror) = &mut self.mirror else {
            return;
        };
        mirror.history.apply(&event.change);
        mirror.version = event.version;
        if mirror.epoch.is_none() {
            mirror.epoch = Some(event.epoch.clone());
        }
        let mut rendered: [Option<Frame>; 3] = Default::default();
        let mut sent = [0u64; 3];
        let history = &mirror.history;
        self.members.retain(|member| {
            let slot = dialect_slot(member.dialect);
            let frame = rendered[slot]
                .get_or_insert_with(|| frames::event(member.dialect, &event, history))
                .clone();
            sent[slot] += 1;
            member.outbox.push(frame)
        });
        for dialect in [Dialect::V2, Dialect::V1, Dialect::Seed] {
            let count = sent[dialect_slot(dialect)];
            if count > 0 {
                let kind = frames::frame_type(dialect, &event.change);
                metrics::counter!("croupier_ws_messages_sent_total", "type" => kind)
                    .increment(count);
            }
        }
        let latency = (Utc::now() - event.committed_at)
            .to_std()
            .unwrap_or_default();
        metrics::histogram!("croupier_fanout_latency_seconds").record(latency.as_secs_f64());
        self.publish_view();

        self.recent.push_back(event);
        while self.recent.len() > self.hub.inner.config.recent_events {
            self.recent.pop_front();
        }
    }
}

fn dialect_slot(dialect: Dialect) -> usize {
    match dialect {
        Dialect::V2 => 0,
        Dialect::V1 => 1,
        Dialect::Seed => 2,
    }
}
