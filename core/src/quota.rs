//! Sharing one global limit between many Envoys by their demand (Envoy's quota protocol, RLQS).
//!
//! Each Envoy enforces its own token bucket for a quota bucket; the server sets each one's rate and
//! depth so that together they make the rule's bucket. Every participant (an Envoy's bucket, on
//! any replica) reports its demand: requests per second, allowed plus denied. From the fleet's
//! total the arithmetic here gives each its share:
//!
//! - under the limit (total demand `E <= rate`): each gets its demand plus an equal part of what
//!   is left, `e + (rate - E) / N`, so a participant whose traffic grows has room at once;
//! - over it: each gets `rate * e / E`, so a client's chance of admission, `rate / E`, is the same
//!   whichever Envoy it reached.
//!
//! Either way the shares add up to the rule's rate, and the depths to its burst. Demand has a floor
//! (`MIN_DEMAND` of the rate) so an idle participant keeps a small share and is never sent a
//! bucket that cannot fill. Pure: the server measures demand, exchanges totals between replicas
//! through the backend, and calls these.

use crate::Shape;

/// The least demand a participant counts with, as a fraction of the rule's rate.
pub const MIN_DEMAND: f64 = 0.01;

/// A participant keeps its assignment while the new one is within this fraction of it: every
/// change makes Envoy build a new, full bucket, so noise in the reports must not cause one.
pub const HYSTERESIS: f64 = 0.05;

/// The longest fill interval sent (a year): rates smaller than a token a year are rounded up.
const MAX_FILL_SECS: u64 = 31_536_000;

/// A bucket's demand summed over the fleet (every replica's participants).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fleet {
    /// Requests per second, each participant counted with at least its floor ([`counted_demand`]).
    pub demand: f64,
    pub participants: u32,
}

/// The demand a participant counts with: what it reported, at least the floor.
pub fn counted_demand(demand: f64, shape: Shape) -> f64 {
    let demand = if demand.is_finite() { demand } else { 0.0 };
    demand.max(shape.rate() * MIN_DEMAND)
}

/// A participant's share of the rule's rate, tokens per second. `demand` is its counted demand;
/// `fleet` includes it.
pub fn share(demand: f64, fleet: Fleet, shape: Shape) -> f64 {
    let rate = shape.rate();
    // The fleet as this replica last heard it may not include a participant that just arrived.
    let participants = f64::from(fleet.participants.max(1));
    let total = fleet.demand.max(demand);
    if total <= rate {
        demand + (rate - total) / participants
    } else {
        rate * demand / total
    }
}

/// What Envoy 1.40 enforces: `max_tokens` deep, `tokens_per_fill` every `fill_secs` (Envoy refills
/// continuously at that rate, but truncates the interval to whole seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_secs: u64,
}

impl TokenBucket {
    /// The bucket for a share of `rate` tokens per second of `shape`. The fill interval depends
    /// only on the rule (a minute, or long enough that the rule's rate fills 100 tokens), so the
    /// token count carries the precision: within one token per interval, rounded down, and at least
    /// one (a bucket never stops filling).
    pub fn for_share(rate: f64, shape: Shape) -> TokenBucket {
        let fill_secs = fill_secs(shape);
        let tokens_per_fill = to_count(rate * fill_secs as f64);
        let depth = if shape.rate() > 0.0 {
            shape.capacity() * rate / shape.rate()
        } else {
            shape.capacity()
        };
        TokenBucket {
            max_tokens: to_count(depth),
            tokens_per_fill,
            fill_secs,
        }
    }

    /// The rate this bucket refills at, tokens per second.
    pub fn rate(&self) -> f64 {
        f64::from(self.tokens_per_fill) / self.fill_secs as f64
    }

    /// Whether `next` is close enough to `self` to keep `self` (see [`HYSTERESIS`]).
    pub fn keeps(&self, next: &TokenBucket) -> bool {
        let near = |old: u32, new: u32| f64::from(old.abs_diff(new)) <= f64::from(old) * HYSTERESIS;
        self.fill_secs == next.fill_secs
            && near(self.tokens_per_fill, next.tokens_per_fill)
            && near(self.max_tokens, next.max_tokens)
    }
}

/// The rule's fill interval: at least a minute, and long enough that the whole rate fills 100
/// tokens, so shares keep two significant digits.
fn fill_secs(shape: Shape) -> u64 {
    let rate = shape.rate();
    if rate <= 0.0 {
        return MAX_FILL_SECS;
    }
    ((100.0 / rate).ceil() as u64).clamp(60, MAX_FILL_SECS)
}

/// `v` rounded down to a count of at least 1 that fits Envoy's uint32.
fn to_count(v: f64) -> u32 {
    if v.is_nan() {
        return 1;
    }
    v.floor().clamp(1.0, f64::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(capacity: f64, rate: f64) -> Shape {
        Shape::new(capacity, rate).unwrap()
    }

    fn fleet(demands: &[f64], s: Shape) -> Fleet {
        Fleet {
            demand: demands.iter().map(|&d| counted_demand(d, s)).sum(),
            participants: demands.len() as u32,
        }
    }

    #[test]
    fn over_the_limit_shares_follow_demand() {
        let s = shape(100.0, 100.0);
        let f = fleet(&[300.0, 100.0], s);
        assert!((share(300.0, f, s) - 75.0).abs() < 1e-9);
        assert!((share(100.0, f, s) - 25.0).abs() < 1e-9);
    }

    #[test]
    fn under_the_limit_the_headroom_is_split_evenly() {
        let s = shape(100.0, 100.0);
        let f = fleet(&[30.0, 20.0], s);
        assert!((share(30.0, f, s) - 55.0).abs() < 1e-9);
        assert!((share(20.0, f, s) - 45.0).abs() < 1e-9);
        // Alone, a participant gets the whole limit.
        let alone = fleet(&[3.0], s);
        assert!((share(3.0, alone, s) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn an_idle_participant_keeps_a_small_share() {
        let s = shape(100.0, 100.0);
        let idle = counted_demand(0.0, s);
        let f = fleet(&[500.0, 0.0], s);
        let small = share(idle, f, s);
        assert!(small > 0.0 && small < 1.0, "{small}");
        assert!(TokenBucket::for_share(small, s).tokens_per_fill >= 1);
    }

    #[test]
    fn shares_add_up_to_the_rate_and_the_buckets_stay_within_it() {
        // Deterministic pseudo-random fleets: the sum of shares is the rate, and the buckets sent
        // exceed it by at most one token per participant and fill interval.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2_000 {
            let rate = 0.01 + (next() % 100_000) as f64 / 10.0;
            let capacity = 1.0 + (next() % 10_000) as f64;
            let s = shape(capacity, rate);
            let n = 1 + (next() % 12) as usize;
            let demands: Vec<f64> = (0..n)
                .map(|_| (next() % 1_000_000) as f64 / 100.0)
                .collect();
            let f = fleet(&demands, s);
            let shares: Vec<f64> = demands
                .iter()
                .map(|&d| share(counted_demand(d, s), f, s))
                .collect();
            let sum: f64 = shares.iter().sum();
            assert!((sum - rate).abs() <= rate * 1e-9, "{sum} != {rate}");
            let buckets: Vec<TokenBucket> = shares
                .iter()
                .map(|&r| TokenBucket::for_share(r, s))
                .collect();
            let fill = buckets[0].fill_secs as f64;
            let tokens: f64 = buckets.iter().map(|b| f64::from(b.tokens_per_fill)).sum();
            assert!(
                tokens <= rate * fill + n as f64,
                "{tokens} > {}",
                rate * fill
            );
            let depth: f64 = buckets.iter().map(|b| f64::from(b.max_tokens)).sum();
            assert!(depth <= capacity + n as f64 + 1e-6, "{depth} > {capacity}");
        }
    }

    #[test]
    fn the_fill_interval_depends_on_the_rule_only() {
        let s = shape(100.0, 100.0);
        let a = TokenBucket::for_share(75.0, s);
        let b = TokenBucket::for_share(25.0, s);
        assert_eq!(a.fill_secs, 60);
        assert_eq!(a.fill_secs, b.fill_secs);
        assert_eq!(a.tokens_per_fill, 4_500);
        assert_eq!(a.max_tokens, 75);
        assert!((a.rate() - 75.0).abs() < 1e-9);
        // 10 per hour: 100 tokens take ten hours to fill.
        let slow = shape(10.0, 10.0 / 3600.0);
        assert_eq!(
            TokenBucket::for_share(10.0 / 3600.0, slow).fill_secs,
            36_000
        );
    }

    #[test]
    fn small_changes_keep_the_assignment() {
        let s = shape(100.0, 100.0);
        let a = TokenBucket::for_share(75.0, s);
        assert!(a.keeps(&TokenBucket::for_share(74.0, s)));
        assert!(!a.keeps(&TokenBucket::for_share(60.0, s)));
    }
}
