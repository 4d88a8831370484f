//! This instance's open WebSocket connections, so that an admin `disconnect`
//! arriving over the bus can reach the one it names.

use std::collections::HashMap;
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
