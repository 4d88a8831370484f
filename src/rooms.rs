//! Room operations shared by the HTTP API and the WebSocket protocol: reads with
//! access control, and mutations that commit first and fan out second.

use std::sync::Arc;

use crate::auth::{Auth, TokenError};
use crate::bus::DynBus;
use crate::domain::{Change, MutationId, Room, RoomKey};
use crate::hub::Hub;
use crate::store::{Applied, DynStore, Mutation, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

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
    pub async fn read(
        &self,
        key: &RoomKey,
        token: Option<&str>,
    ) -> Result<Option<Room>, AccessError> {
        let room = self.store.room(key).await?;
        if let Some(room) = &room
            && room.protected
        {
            self.auth.verify(token, key)?;
        }
        Ok(room)
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
        if !applied.duplicate {
            self.hub.deliver(applied.event.clone());
            // Publishing is fire-and-forget: the write is already durable, and a lost
            // publish is repaired by the receivers' gap filling and catch-up.
            let bus = self.bus.clone();
            let event = applied.event.clone();
            tokio::spawn(async move {
                if let Err(err) = bus.publish(&event).await {
                    tracing::warn!(room = %event.key, version = event.version, error = %err, "bus publish failed");
                }
            });
        }
        Ok(applied)
    }
}
