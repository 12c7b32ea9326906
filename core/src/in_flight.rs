//! In-flight (concurrency) limits: at most `max` leases per key, each freed by its release or by
//! its TTL. The arithmetic of one key's leases, pure (time is passed in), run by the memory
//! backend as is and by `lua/in_flight.lua` in Redis: the README's "In-flight limits".
//!
//! A lease is an id and an expiry. Every operation first drops the leases whose expiry has passed
//! (a caller that crashed, an Envoy whose stream-done call was lost: the TTL frees its slot), and
//! says how many it dropped, so that leaks show in the metrics.

/// The longest lease TTL a caller may ask for: a day. A longer request renews.
pub const MAX_LEASE_MS: u32 = 86_400_000;
/// A lease id's length bound: ids are ours (random) or Envoy's `x-request-id`.
pub const MAX_LEASE_ID_BYTES: usize = 128;

/// What is asked of one key's leases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// Take a slot under `id` if fewer than `max` are held; an id already held is refused (two
    /// requests may not share one slot).
    Acquire { max: u32, ttl_ms: u32 },
    /// Free the slot of `id` (nothing when it is not held: idempotent).
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

/// One key's leases: (id, expiry in ms). Small: at most `max` of them.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    held: Vec<(Box<str>, f64)>,
}

impl Leases {
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// When the last lease expires (the key may be forgotten then).
    pub fn expires_at(&self) -> f64 {
        self.held.iter().map(|(_, e)| *e).fold(f64::MIN, f64::max)
    }

    /// Applies `op` for lease `id` at `now_ms`.
    pub fn apply(&mut self, now_ms: f64, id: &str, op: LeaseOp) -> InFlight {
        let before = self.held.len();
        self.held.retain(|(_, expiry)| *expiry > now_ms);
        let expired = (before - self.held.len()) as u32;
        let at = self.held.iter().position(|(held, _)| **held == *id);
        let done = match (op, at) {
            (LeaseOp::Acquire { .. }, Some(_)) => false,
            (LeaseOp::Acquire { max, ttl_ms }, None) => {
                let free = self.held.len() < max as usize;
                if free {
                    self.held.push((id.into(), now_ms + f64::from(ttl_ms)));
                }
                free
            }
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
}
