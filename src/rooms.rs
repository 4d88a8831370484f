//! Room operations shared by the HTTP API and the WebSocket protocol: reads with
//! access control, and mutations that are checked against the client's quotas
//! and the room's protection, then handed to the room's task in the hub, which
//! commits them and fans them out.

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{Auth, TokenError};
use crate::bus::{ControlMessage, DynControlPlane};
use crate::domain::{Change, MutationId, Room, RoomKey};
use crate::hub::{Greeting, Hub, Member, Snapshot, Written};
use crate::quota::{Quotas, RateLimited};
use crate::store::{DynStore, Mutation, Page, RoomAuth, RoomSummary, StoreError, StoreStats};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("too many requests; try again later")]
    RateLimited(RateLimited),
}

impl From<RateLimited> for AccessError {
    fn from(refused: RateLimited) -> Self {
        AccessError::RateLimited(refused)
    }
}

/// Who asks for a change: the client's address (its quotas) and its claim to
/// the room (a token, or a membership that was admitted with one).
#[derive(Debug, Clone, Copy)]
pub struct Writer<'a> {
    pub client: IpAddr,
    pub token: Option<&'a str>,
    /// A WebSocket membership whose token was checked when it joined.
    pub joined_with_token: bool,
}

impl<'a> Writer<'a> {
    /// An HTTP request: its client and the bearer token it carried, if any.
    pub fn request(client: IpAddr, token: Option<&'a str>) -> Self {
        Writer {
            client,
            token,
            joined_with_token: false,
        }
    }
}

/// The one door to rooms for the HTTP API and the WebSocket sessions: they
/// read, change, join and leave rooms only through it, never through the
/// hub, the bus or the store behind it.
#[derive(Clone)]
pub struct Rooms {
    store: DynStore,
    /// Announcing a room's change of access to every instance.
    control: DynControlPlane,
    hub: Hub,
    auth: Arc<Auth>,
    quotas: Arc<Quotas>,
    max_history: usize,
}

impl Rooms {
    /// Puts the room operations together over this instance's hub (which
    /// publishes room events) and the cluster's store and control plane.
    pub fn new(
        store: DynStore,
        hub: Hub,
        control: DynControlPlane,
        auth: Arc<Auth>,
        quotas: Arc<Quotas>,
        max_history: usize,
    ) -> Self {
        Rooms {
            store,
            control,
            hub,
            auth,
            quotas,
            max_history,
        }
    }

    /// Checks every room this instance follows against the store and repairs
    /// what differs (the periodic repair; see `Hub::verify_all`).
    pub async fn verify_all(&self) -> Result<usize, StoreError> {
        self.hub.verify_all().await
    }

    /// Room tokens and passwords.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Forgets clients whose quotas no longer restrict them (periodic upkeep).
    pub fn prune_quotas(&self) {
        self.quotas.prune();
    }

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
        let snapshot = self.current(key).await?;
        if let Some(snapshot) = &snapshot
            && snapshot.protected
        {
            self.auth.verify(token, key)?;
        }
        Ok(snapshot)
    }

    /// The room as this instance knows it, without access control.
    async fn current(&self, key: &RoomKey) -> Result<Option<Arc<Snapshot>>, StoreError> {
        Ok(Some(match self.hub.snapshot(key) {
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
        }))
    }

    /// Checks access to a room without needing its contents.
    pub async fn authorize(&self, key: &RoomKey, token: Option<&str>) -> Result<(), AccessError> {
        self.read(key, token).await.map(|_| ())
    }

    /// Commits a change through the room's task, which delivers the event to
    /// local members and publishes it to the other instances before it answers.
    /// The caller may acknowledge only after this returns `Ok`: the store has
    /// committed by then (invariant 1). A repeated mutation id changes nothing and
    /// publishes nothing.
    ///
    /// Before that, the writer's quotas are taken (one write; one new room if
    /// the room does not exist yet) and its token checked against the room as
    /// this instance knows it. The store checks protection once more where it
    /// applies the change, so a room protected meanwhile is still refused.
    pub async fn mutate(
        &self,
        writer: Writer<'_>,
        key: RoomKey,
        change: Change,
        mutation_id: Option<MutationId>,
    ) -> Result<Written, AccessError> {
        self.quotas.write(writer.client)?;
        let token = writer
            .token
            .map(|token| self.auth.verify(Some(token), &key));
        let authorized = writer.joined_with_token || matches!(token, Some(Ok(())));
        match self.current(&key).await? {
            None => self.quotas.create_room(writer.client)?,
            Some(room) if room.protected && !authorized => {
                let refused = match token {
                    Some(Err(err)) => err,
                    _ => TokenError::Missing,
                };
                return Err(refused.into());
            }
            Some(_) => {}
        }
        let written = self
            .hub
            .mutate(Mutation {
                key,
                change,
                mutation_id,
                max_history: self.max_history,
                authorized,
            })
            .await?;
        Ok(written)
    }

    /// Creates a room (protected iff `password_hash` is given) unless it exists,
    /// and answers with the room as it is. When this call created it with a
    /// password, every instance is told, so that members who joined the key
    /// while nothing protected it are removed.
    pub async fn create(
        &self,
        key: &RoomKey,
        password_hash: Option<String>,
    ) -> Result<RoomAuth, StoreError> {
        let protecting = password_hash.is_some();
        let created = self.store.create_room(key, password_hash.clone()).await?;
        if protecting && created.password_hash == password_hash {
            // Local members first: this instance must not wait on the bus.
            self.hub.protected(key);
            let message = ControlMessage::Protected {
                key: key.to_string(),
            };
            if let Err(err) = self.control.control(message).await {
                // Members elsewhere stay joined until they write (the store
                // refuses them) or reconnect.
                tracing::warn!(room = %key, error = %err, "cannot announce a protected room");
            }
        }
        Ok(created)
    }

    /// Makes a connection a member of a room and sends it its greeting. Returns
    /// once the room counts it, so every event committed afterwards reaches it.
    /// A room protected since the caller's token check refuses with
    /// [`StoreError::AuthRequired`].
    pub async fn join(
        &self,
        key: &RoomKey,
        member: Member,
        greeting: Greeting,
    ) -> Result<(), StoreError> {
        self.hub.join(key, member, greeting).await
    }

    /// Ends a connection's membership of a room (nothing if it had none).
    pub fn leave(&self, key: &RoomKey, conn_id: u64) {
        self.hub.leave(key, conn_id);
    }

    /// The room's protection as stored: whether it exists and its password hash.
    pub async fn access(&self, key: &RoomKey) -> Result<Option<RoomAuth>, StoreError> {
        self.store.room_auth(key).await
    }

    /// One page of stored rooms, most recently changed first, and how many there are.
    pub async fn list(&self, page: Page) -> Result<(Vec<RoomSummary>, u64), StoreError> {
        self.store.list_rooms(page).await
    }

    /// The room as the store holds it, protected or not: for the operator's
    /// API, which is authorised as a whole rather than per room.
    pub async fn read_unchecked(&self, key: &RoomKey) -> Result<Option<Room>, StoreError> {
        self.store.room(key).await
    }

    /// Totals over every stored room.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.store.stats().await
    }
}
