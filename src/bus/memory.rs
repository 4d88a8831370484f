//! In-process bus. The embedded default runs one instance on it; tests run
//! several instances in one process on a shared [`MemoryBroker`] to exercise the
//! cross-instance paths without Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::{
    Broker, BusError, BusHealth, ConnectionInfo, ControlMessage, ControlPlane, Inbound,
    InboundHandler,
};
use crate::domain::{RoomEvent, RoomKey};
use async_trait::async_trait;

struct Peer {
    instance: String,
    handler: InboundHandler,
    rooms: HashSet<RoomKey>,
}

#[derive(Default)]
struct BrokerState {
    peers: Vec<Peer>,
    presence: HashMap<String, ConnectionInfo>,
    joins: HashMap<String, u64>,
}

/// The shared half: every [`MemoryBus`] connected to one broker sees the others.
/// A std `Mutex` is right here: it is never held across an `.await`, and handlers
/// only forward into channels.
#[derive(Clone, Default)]
pub struct MemoryBroker {
    state: Arc<Mutex<BrokerState>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects one instance; `handler` receives what the others publish.
    pub fn connect(&self, instance: &str, handler: InboundHandler) -> MemoryBus {
        let mut state = self.lock();
        state.peers.push(Peer {
            instance: instance.to_owned(),
            handler,
            rooms: HashSet::new(),
        });
        MemoryBus {
            broker: self.clone(),
            instance: instance.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BrokerState> {
        // A poisoned lock only means another thread panicked mid-update of plain
        // maps; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One instance's connection to a [`MemoryBroker`]; both halves of the bus.
pub struct MemoryBus {
    broker: MemoryBroker,
    instance: String,
}

impl Drop for MemoryBus {
    fn drop(&mut self) {
        let mut state = self.broker.lock();
        state.peers.retain(|p| p.instance != self.instance);
        state.presence.retain(|_, c| c.instance != self.instance);
    }
}

#[async_trait]
impl Broker for MemoryBus {
    async fn publish(&self, event: &RoomEvent) -> Result<(), BusError> {
        let handlers: Vec<InboundHandler> = {
            let state = self.broker.lock();
            state
                .peers
                .iter()
                .filter(|p| p.instance != self.instance && p.rooms.contains(&event.key))
                .map(|p| p.handler.clone())
                .collect()
        };
        for handler in handlers {
            handler(Inbound::Event(event.clone()));
        }
        metrics::counter!("croupier_bus_messages_total", "direction" => "out").increment(1);
        Ok(())
    }

    async fn subscribe(&self, key: &RoomKey) -> Result<(), BusError> {
        let mut state = self.broker.lock();
        if let Some(peer) = state.peers.iter_mut().find(|p| p.instance == self.instance) {
            peer.rooms.insert(key.clone());
        }
        Ok(())
    }

    async fn unsubscribe(&self, key: &RoomKey) -> Result<(), BusError> {
        let mut state = self.broker.lock();
        if let Some(peer) = state.peers.iter_mut().find(|p| p.instance == self.instance) {
            peer.rooms.remove(key);
        }
        Ok(())
    }
}

#[async_trait]
impl ControlPlane for MemoryBus {
    async fn control(&self, message: ControlMessage) -> Result<(), BusError> {
        let handlers: Vec<InboundHandler> = self
            .broker
            .lock()
            .peers
            .iter()
            .map(|p| p.handler.clone())
            .collect();
        for handler in handlers {
            handler(Inbound::Control(message.clone()));
        }
        Ok(())
    }

    async fn put_presence(&self, info: &ConnectionInfo) -> Result<(), BusError> {
        self.broker
            .lock()
            .presence
            .insert(info.id.clone(), info.clone());
        Ok(())
    }

    async fn remove_presence(&self, connection_id: &str) -> Result<(), BusError> {
        self.broker.lock().presence.remove(connection_id);
        Ok(())
    }

    async fn presence(&self) -> Result<Vec<ConnectionInfo>, BusError> {
        // In-process presence needs no expiry: entries leave with their connection,
        // and all of an instance's entries leave when its bus is dropped.
        Ok(self.broker.lock().presence.values().cloned().collect())
    }

    async fn count_join(&self, key: &RoomKey) -> Result<(), BusError> {
        *self.broker.lock().joins.entry(key.to_string()).or_default() += 1;
        Ok(())
    }

    async fn join_counts(&self) -> Result<HashMap<String, u64>, BusError> {
        Ok(self.broker.lock().joins.clone())
    }

    async fn health(&self) -> BusHealth {
        BusHealth::Disabled
    }
}
