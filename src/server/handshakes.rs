//! Admission of TLS handshakes on the gRPC port: before any authentication, the cheapest attack
//! is a connection that never sends a ClientHello. The accept loop never waits for one:
//!
//! - a handshake has [`HANDSHAKE_TIMEOUT`] to finish;
//! - one peer address has at most [`PER_PEER`] handshakes in progress; a connection beyond that
//!   is closed at once (`sluicegate_shed_total{reason="handshake"}`);
//! - at most [`MAX_IN_PROGRESS`] in all; a new connection beyond that cuts the oldest handshake
//!   in progress, so a flood of idle connections from many addresses cannot keep a new client
//!   out either: it only shortens how long the flood's own connections may dawdle.
//!
//! A real client finishes its handshake in a round trip or two: none of this touches it.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

/// How long a client may take to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in progress from one peer address at most.
pub const PER_PEER: usize = 32;
/// Handshakes in progress at most; beyond, the oldest is cut.
pub const MAX_IN_PROGRESS: usize = 512;

#[derive(Default)]
struct State {
    per_peer: HashMap<IpAddr, usize>,
    /// In progress, oldest first: each one's cancel switch.
    in_progress: BTreeMap<u64, CancellationToken>,
    next: u64,
}

/// The handshakes in progress, shared by the accept loop and the handshake tasks.
#[derive(Default)]
pub struct Handshakes {
    state: Mutex<State>,
    shed: Option<metrics::Counter>,
    cut: Option<metrics::Counter>,
}

/// A handshake admitted: cancelled when a newer one needs its place; dropping it frees the place.
pub struct Ticket {
    gate: Arc<Handshakes>,
    peer: IpAddr,
    id: u64,
    pub cancelled: CancellationToken,
}

impl Handshakes {
    /// With the shed counters: refused at the per-peer cap, and cut for a newer one.
    pub fn counted(shed: metrics::Counter, cut: metrics::Counter) -> Self {
        Self {
            state: Mutex::default(),
            shed: Some(shed),
            cut: Some(cut),
        }
    }

    /// A place for a handshake from `peer`, or None when that peer has [`PER_PEER`] in progress
    /// (close the connection). Never waits.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Ticket> {
        let mut s = self.state.lock();
        let mine = s.per_peer.entry(peer).or_insert(0);
        if *mine >= PER_PEER {
            drop(s);
            if let Some(c) = &self.shed {
                c.increment(1);
            }
            return None;
        }
        *mine += 1;
        if s.in_progress.len() >= MAX_IN_PROGRESS
            && let Some((_, oldest)) = s.in_progress.pop_first()
        {
            oldest.cancel();
            if let Some(c) = &self.cut {
                c.increment(1);
            }
        }
        let id = s.next;
        s.next += 1;
        let cancelled = CancellationToken::new();
        s.in_progress.insert(id, cancelled.clone());
        Some(Ticket {
            gate: self.clone(),
            peer,
            id,
            cancelled,
        })
    }

    /// Handshakes in progress now.
    #[cfg(test)]
    pub fn in_progress(&self) -> usize {
        self.state.lock().in_progress.len()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock();
        s.in_progress.remove(&self.id);
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_capped_and_the_oldest_is_cut_when_full() {
        let gate = Arc::new(Handshakes::default());
        let flood: IpAddr = "10.0.0.1".parse().unwrap();
        let tickets: Vec<Ticket> = (0..PER_PEER).map(|_| gate.admit(flood).unwrap()).collect();
        assert!(gate.admit(flood).is_none(), "one peer: at most PER_PEER");
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(gate.admit(other).is_some(), "another peer is not held up");
        drop(tickets);
        assert_eq!(gate.in_progress(), 0);
        assert!(gate.admit(flood).is_some(), "places come back");

        // Full from many peers: a newcomer cuts the oldest handshake in progress.
        let many: Vec<Ticket> = (0..MAX_IN_PROGRESS)
            .map(|i| {
                let ip = IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8]);
                gate.admit(ip).unwrap()
            })
            .collect();
        let newcomer = gate.admit("10.9.9.9".parse().unwrap()).unwrap();
        assert!(many[0].cancelled.is_cancelled());
        assert!(!many[1].cancelled.is_cancelled());
        assert!(!newcomer.cancelled.is_cancelled());
        assert_eq!(gate.in_progress(), MAX_IN_PROGRESS);
    }
}
