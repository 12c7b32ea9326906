//! In-flight (concurrency) limits: at most `max` leases per key, each freed by its release or by
//! its TTL. The arithmetic of one key's leases, pure (time is passed in), run by the memory
//! backend as is and by `lua/in_flight.lua` in Redis: the README's "In-flight limits".
//!
//! A lease is an id and an expiry. Every operation first drops the leases whose expiry has passed
//! (a caller that crashed, an Envoy whose stream-done call was lost: the TTL frees its slot), and
//! says how many it dropped, so that leaks show in the metrics.
//!
//! Paired acquires (Envoy's): every acquire is followed by a release of the same id, granted or
//! not (the stream-done call), and ids are the client's when Envoy keeps an `x-request-id` it was
//! sent. A refused acquire is therefore remembered, and the next release of its id frees nothing
//! (it is the refused request's own): otherwise a request naming a held id, refused, would free
//! that slot with its release while the holder still runs, and a client could hold any number.

/// The longest lease TTL a caller may ask for: a day. A longer request renews.
pub const MAX_LEASE_MS: u32 = 86_400_000;
/// A lease id's length bound: ids are ours (random) or Envoy's `x-request-id`.
pub const MAX_LEASE_ID_BYTES: usize = 128;

/// Whether `id` can name a lease: 1 to [`MAX_LEASE_ID_BYTES`] bytes, no control characters
/// (`lua/in_flight.lua` marks remembered refusals with a leading `\x01`).
pub fn lease_id_ok(id: &str) -> bool {
    (1..=MAX_LEASE_ID_BYTES).contains(&id.len()) && !id.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// What is asked of one key's leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take a slot under `id` if fewer than `max` are held; an id already held is refused (two
    /// requests may not share one slot). `paired`: a release of `id` follows whatever the answer
    /// (Envoy's stream-done call), so a refusal is remembered for `ttl_ms` and that release frees
    /// nothing.
    Acquire { max: u32, ttl_ms: u32, paired: bool },
    /// Free the slot of `id` (nothing when it is not held: idempotent; nothing when a refused
    /// paired acquire of `id` is pending: that release is the refused request's).
    Release,
    /// Extend the lease of `id`, if it is still held.
    Renew { ttl_ms: u32 },
}

/// The answer for one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// Acquire and Renew: the lease is held now. Release: it was held and is freed now.
    pub done: bool,
    /// Leases held on the key after the operation.
    pub in_flight: u32,
    /// A refused Acquire: when the earliest lease expires, at the latest (a release may come
    /// sooner). 0 otherwise.
    pub retry_after_ms: u64,
    /// Leases that had expired without a release, dropped by this operation.
    pub expired: u32,
}

/// The most refused paired acquires of one id remembered at once (`lua/in_flight.lua` keeps the
/// count in 11 bits of a score); beyond it a refusal is not remembered.
pub const MAX_PENDING_REFUSALS: u32 = 2047;

/// One key's leases: (id, expiry in ms), at most `max` of them; and the refused paired acquires
/// whose release is still to come: (id, how many, expiry in ms).
#[derive(Clone, Debug, Default)]
pub struct Leases {
    held: Vec<(Box<str>, f64)>,
    refused: Vec<(Box<str>, u32, f64)>,
}

impl Leases {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.refused.is_empty()
    }

    /// When the last lease or remembered refusal expires (the key may be forgotten then).
    pub fn expires_at(&self) -> f64 {
        let refused = self.refused.iter().map(|(_, _, e)| *e);
        self.held
            .iter()
            .map(|(_, e)| *e)
            .chain(refused)
            .fold(f64::MIN, f64::max)
    }

    /// Applies `op` for lease `id` at `now_ms`.
    pub fn apply(&mut self, now_ms: f64, id: &str, op: LeaseOp) -> InFlight {
        let before = self.held.len();
        self.held.retain(|(_, expiry)| *expiry > now_ms);
        self.refused.retain(|(_, _, expiry)| *expiry > now_ms);
        let expired = (before - self.held.len()) as u32;
        let at = self.held.iter().position(|(held, _)| **held == *id);
        let done = match (op, at) {
            (LeaseOp::Acquire { .. }, Some(_)) => false,
            (LeaseOp::Acquire { max, ttl_ms, .. }, None) => {
                let free = self.held.len() < max as usize;
                if free {
                    self.held.push((id.into(), now_ms + f64::from(ttl_ms)));
                }
                free
            }
            (LeaseOp::Release, _) if self.forgive(id) => false,
            (LeaseOp::Release, Some(i)) => {
                self.held.swap_remove(i);
                true
            }
            (LeaseOp::Renew { ttl_ms }, Some(i)) => {
                self.held[i].1 = now_ms + f64::from(ttl_ms);
                true
            }
            (LeaseOp::Release | LeaseOp::Renew { .. }, None) => false,
        };
        if let (
            LeaseOp::Acquire {
                paired: true,
                ttl_ms,
                ..
            },
            false,
        ) = (op, done)
        {
            self.remember_refusal(id, now_ms + f64::from(ttl_ms));
        }
        let retry_after_ms = match op {
            LeaseOp::Acquire { .. } if !done => self.first_expiry_ms(now_ms),
            _ => 0,
        };
        InFlight {
            done,
            in_flight: self.held.len() as u32,
            retry_after_ms,
            expired,
        }
    }

    /// A refused paired acquire of `id` whose release is still to come: count it down. True when
    /// there was one (this release is that request's, and frees nothing).
    fn forgive(&mut self, id: &str) -> bool {
        let Some(i) = self.refused.iter().position(|(r, _, _)| **r == *id) else {
            return false;
        };
        self.refused[i].1 -= 1;
        if self.refused[i].1 == 0 {
            self.refused.swap_remove(i);
        }
        true
    }

    fn remember_refusal(&mut self, id: &str, expires_at: f64) {
        match self.refused.iter_mut().find(|(r, _, _)| **r == *id) {
            Some((_, n, e)) => {
                *n = (*n + 1).min(MAX_PENDING_REFUSALS);
                *e = expires_at;
            }
            None => self.refused.push((id.into(), 1, expires_at)),
        }
    }

    /// Milliseconds from `now_ms` until the earliest lease expires, rounded up (0: none held).
    fn first_expiry_ms(&self, now_ms: f64) -> u64 {
        self.held
            .iter()
            .map(|(_, e)| (e - now_ms).max(0.0).ceil() as u64)
            .min()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACQ: LeaseOp = LeaseOp::Acquire {
        max: 2,
        ttl_ms: 1000,
        paired: false,
    };

    #[test]
    fn at_most_max_and_a_release_frees_a_slot() {
        let mut l = Leases::default();
        assert!(l.apply(0.0, "a", ACQ).done);
        assert!(l.apply(1.0, "b", ACQ).done);
        let refused = l.apply(2.0, "c", ACQ);
        assert!(!refused.done);
        assert_eq!((refused.in_flight, refused.retry_after_ms), (2, 998));
        let freed = l.apply(3.0, "a", LeaseOp::Release);
        assert_eq!((freed.done, freed.in_flight), (true, 1));
        // Idempotent: a second release changes nothing.
        assert!(!l.apply(4.0, "a", LeaseOp::Release).done);
        assert!(l.apply(5.0, "c", ACQ).done);
    }

    #[test]
    fn expired_leases_free_their_slots_and_are_counted() {
        let mut l = Leases::default();
        l.apply(0.0, "a", ACQ);
        l.apply(500.0, "b", ACQ);
        let after = l.apply(1000.0, "c", ACQ);
        assert_eq!((after.done, after.in_flight, after.expired), (true, 2, 1));
        // An expired lease can be neither renewed nor released.
        assert!(!l.apply(1600.0, "b", LeaseOp::Renew { ttl_ms: 1000 }).done);
        assert!(!l.apply(1600.0, "b", LeaseOp::Release).done);
    }

    #[test]
    fn a_renewed_lease_lives_on_and_an_id_holds_one_slot() {
        let mut l = Leases::default();
        l.apply(0.0, "a", ACQ);
        assert!(l.apply(900.0, "a", LeaseOp::Renew { ttl_ms: 1000 }).done);
        assert_eq!(l.apply(1500.0, "b", ACQ).in_flight, 2);
        let twice = l.apply(1600.0, "a", ACQ);
        assert!(!twice.done, "an id already held is refused");
        assert_eq!(twice.in_flight, 2);
    }

    #[test]
    fn a_refused_paired_acquire_releases_nothing_of_the_holder() {
        let paired = LeaseOp::Acquire {
            max: 1,
            ttl_ms: 1000,
            paired: true,
        };
        let mut l = Leases::default();
        assert!(l.apply(0.0, "a", paired).done);
        // Two more requests naming "a" (a client's own x-request-id): refused.
        assert!(!l.apply(1.0, "a", paired).done);
        assert!(!l.apply(2.0, "a", paired).done);
        // Their releases come first: "a" stays held, nobody else gets in.
        assert!(!l.apply(3.0, "a", LeaseOp::Release).done);
        assert!(!l.apply(4.0, "a", LeaseOp::Release).done);
        assert!(!l.apply(5.0, "b", paired).done);
        assert!(!l.apply(6.0, "b", LeaseOp::Release).done, "b's own release");
        // The holder's release frees it.
        let freed = l.apply(7.0, "a", LeaseOp::Release);
        assert_eq!((freed.done, freed.in_flight), (true, 0));
        assert!(l.is_empty());
        // A refusal whose release never came is forgotten after its TTL.
        l.apply(8.0, "c", paired);
        assert!(!l.apply(9.0, "d", paired).done);
        assert!(!l.is_empty());
        assert!(l.apply(1009.0, "d", paired).done, "c expired");
        assert!(
            l.apply(1010.0, "d", LeaseOp::Release).done,
            "d's refusal is forgotten"
        );
    }
}
