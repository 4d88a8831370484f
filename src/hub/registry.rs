//! This instance's open WebSocket connections, so that an admin `disconnect`
//! arriving over the bus can reach the one it names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Connections {
    kicks: Arc<Mutex<HashMap<String, CancellationToken>>>,
    next: Arc<AtomicU64>,
}

/// A registered connection: its numeric id (for room membership), its public id
/// (instance-qualified, for the admin API) and the token an admin kick cancels.
pub struct Registration {
    pub number: u64,
    pub id: String,
    pub kicked: CancellationToken,
}

impl Connections {
    pub fn register(&self, instance: &str) -> Registration {
        let number = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{instance}-{number}");
        let kicked = CancellationToken::new();
        self.lock().insert(id.clone(), kicked.clone());
        Registration { number, id, kicked }
    }

    pub fn unregister(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Closes the named connection if this instance holds it.
    pub fn kick(&self, id: &str) -> bool {
        match self.lock().get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        // Never held across an await; the map stays consistent even after a panic.
        self.kicks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Open WebSockets per client address, so that one address cannot take every
/// slot of the instance.
#[derive(Clone, Default)]
pub struct ClientSlots {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One client's slot; given back when dropped (the connection ended).
pub struct ClientSlot {
    slots: ClientSlots,
    client: IpAddr,
}

impl ClientSlots {
    /// Takes a slot for `client` unless it already holds `max`.
    pub fn try_take(&self, client: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut open = self.lock();
        let held = open.entry(client).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
        })
    }

    /// Connections held by `client`.
    pub fn held(&self, client: IpAddr) -> usize {
        self.lock().get(&client).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Never held across an await; a count map stays consistent after a panic.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        if let Some(held) = open.get_mut(&self.client) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.client);
            }
        }
    }
}
