//! Who may open another connection: a per-instance cap (a semaphore, as in
//! mini-redis) and a per-address cap. A [`Slot`] is held by the connection's
//! socket itself, so an upgraded WebSocket keeps counting until it closes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refusal {
    InstanceFull,
    AddressFull,
}

impl Refusal {
    pub(super) fn label(self) -> &'static str {
        match self {
            Refusal::InstanceFull => "instance",
            Refusal::AddressFull => "address",
        }
    }
}

pub(super) struct Admission {
    slots: Arc<Semaphore>,
    capacity: u32,
    per_address: usize,
    /// Behind a trusted proxy every request arrives from the proxy's (private)
    /// address; capping it would cap the whole site. See [`exempt`].
    exempt_private: bool,
    /// Open connections by address. A std mutex: held for a map update, never
    /// across an `.await`.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; dropping it gives both slots back.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    address: Option<IpAddr>,
    admission: Arc<Admission>,
}

impl Admission {
    pub(super) fn new(capacity: usize, per_address: usize, exempt_private: bool) -> Arc<Self> {
        let capacity = u32::try_from(capacity).unwrap_or(u32::MAX);
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            per_address,
            exempt_private,
            open: Mutex::default(),
        })
    }

    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::InstanceFull)?;
        let address = (!(self.exempt_private && exempt(peer))).then(|| address_key(peer));
        if let Some(address) = address {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let count = open.entry(address).or_default();
            if *count >= self.per_address {
                return Err(Refusal::AddressFull);
            }
            *count += 1;
        }
        metrics::gauge!("croupier_http_connections").increment(1.0);
        Ok(Slot {
            _permit: permit,
            address,
            admission: self.clone(),
        })
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.capacity as usize - self.slots.available_permits()
    }

    /// Resolves once every connection has closed.
    pub(super) async fn all_closed(&self) {
        let _all = self.slots.acquire_many(self.capacity).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!("croupier_http_connections").decrement(1.0);
        let Some(address) = self.address else {
            return;
        };
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&address);
            }
        }
    }
}

/// One client, one key: an IPv6 host owns a whole /64, so counting its
/// addresses one by one would cap nothing.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
            }
        },
    }
}

/// Addresses a reverse proxy of ours sits on: loopback and private ranges.
/// Only consulted with `TRUST_PROXY` on; a public client is capped either way.
fn exempt(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => exempt(IpAddr::V4(v4)),
            // fc00::/7 is IPv6's private range (unique local addresses).
            None => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_per_address_and_gives_slots_back() {
        let admission = Admission::new(10, 2, false);
        let a = admission.admit(ip("10.0.0.1")).unwrap();
        let _b = admission.admit(ip("10.0.0.1")).unwrap();
        assert!(matches!(
            admission.admit(ip("10.0.0.1")),
            Err(Refusal::AddressFull)
        ));
        let _other = admission.admit(ip("10.0.0.2")).unwrap();
        drop(a);
        let _c = admission.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(admission.open(), 3);
    }

    #[test]
    fn caps_the_instance() {
        let admission = Admission::new(1, 5, false);
        let _a = admission.admit(ip("10.0.0.1")).unwrap();
        assert!(matches!(
            admission.admit(ip("10.0.0.2")),
            Err(Refusal::InstanceFull)
        ));
    }

    #[test]
    fn ipv6_is_counted_per_64_and_proxies_are_exempt_when_trusted() {
        let admission = Admission::new(10, 1, true);
        let _a = admission.admit(ip("2001:db8::1")).unwrap();
        assert!(admission.admit(ip("2001:db8::2")).is_err());
        let _b = admission.admit(ip("2001:db8:0:1::1")).unwrap();
        let _p1 = admission.admit(ip("10.1.2.3")).unwrap();
        let _p2 = admission.admit(ip("10.1.2.3")).unwrap();
        let _l = admission.admit(ip("::1")).unwrap();
        let _l2 = admission.admit(ip("::1")).unwrap();
    }
}
