//! Room operations shared by the HTTP API and the WebSocket protocol: reads with
//! access control, and mutations that commit first and fan out second.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::{Auth, TokenError};
use crate::bus::DynBus;
use crate::domain::{Change, MutationId, RoomKey};
use crate::hub::{Hub, Snapshot};
use crate::store::{Applied, DynStore, Mutation, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a mutation waits for its event to be published before answering.
const PUBLISH_WAIT: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Rooms {
    pub store: DynStore,
    pub bus: DynBus,
    pub hub: Hub,
    pub auth: Arc<Auth>,
    pub max_history: usize,
}

impl Rooms {
    /// Reads a room, enforcing its token if it is protected. `Ok(None)`: never created.
    ///
    /// A room this instance follows is answered from the hub's snapshot; any
    /// other existing room is read from the store and followed from then on,
    /// so repeated reads of a hot room cost no round trip.
    pub async fn read(
        &self,
        key: &RoomKey,
        token: Option<&str>,
    ) -> Result<Option<Arc<Snapshot>>, AccessError> {
        let snapshot = match self.hub.snapshot(key) {
            Some(snapshot) => {
                metrics::counter!("croupier_room_reads_total", "source" => "snapshot").increment(1);
                snapshot
            }
            None => {
                metrics::counter!("croupier_room_reads_total", "source" => "store").increment(1);
                match self.store.room(key).await? {
                    Some(room) => {
                        self.hub.watch(key);
                        Arc::new(Snapshot::from(room))
                    }
                    None => return Ok(None),
                }
            }
        };
        if snapshot.protected {
            self.auth.verify(token, key)?;
        }
        Ok(Some(snapshot))
    }

    /// Checks access to a room without needing its contents.
    pub async fn authorize(&self, key: &RoomKey, token: Option<&str>) -> Result<(), AccessError> {
        self.read(key, token).await.map(|_| ())
    }

    /// Commits a change, then hands the event to local members and to the bus.
    /// The caller may acknowledge only after this returns `Ok`: the store has
    /// committed by then (invariant 1). A repeated mutation id changes nothing and
    /// publishes nothing.
    pub async fn mutate(
        &self,
        key: RoomKey,
        change: Change,
        mutation_id: Option<MutationId>,
    ) -> Result<Applied, StoreError> {
        let applied = self
            .store
            .apply(Mutation {
                key,
                change,
                mutation_id,
                max_history: self.max_history,
            })
            .await?;
        self.hub.offer(&applied.room);
        if !applied.duplicate {
            self.hub.deliver(applied.event.clone());
            // The write is already durable, and a lost publish is repaired by the
            // receivers' gap filling and catch-up, so the publish runs on its own.
            let bus = self.bus.clone();
            let event = applied.event.clone();
            let publishing = tokio::spawn(async move {
                if let Err(err) = bus.publish(&event).await {
                    tracing::warn!(room = %event.key, version = event.version, error = %err, "bus publish failed");
                }
            });
            // Waiting for it (briefly: not through a Redis outage) means the
            // other instances normally have the event before the writer hears
            // back, so its next read elsewhere already sees its write.
            let _ = tokio::time::timeout(PUBLISH_WAIT, publishing).await;
        }
        Ok(applied)
    }
}
