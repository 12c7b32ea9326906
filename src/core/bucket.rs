//! The token bucket of SPEC section 2, as one pure function.
//!
//! `lua/token_bucket.lua` is the same arithmetic, written in the same order so that both give the
//! same doubles; the shared contract suite (`tests/backend_contract.rs`) holds them to it.

use super::Shape;

/// What is stored per bucket: the tokens left and when they were counted (ms on the backend's
/// clock). A bucket with no state is full.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketState {
    pub tokens: f64,
    pub ts_ms: f64,
}

/// What a request does to its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Spend `cost` tokens if they are there; a denial spends nothing.
    Take(u64),
    /// Answer as `Take(max(cost, 1))` would, but change nothing.
    Check(u64),
    /// Give `cost` tokens back (Envoy's `is_negative_hits`), never above capacity. Always allowed.
    Refund(u64),
}

impl Op {
    /// The number the Lua script receives as its mode argument (every argument is a positive number).
    pub fn lua_mode(self) -> u8 {
        match self {
            Op::Take(_) => 1,
            Op::Check(_) => 2,
            Op::Refund(_) => 3,
        }
    }

    /// The cost as the script and the arithmetic see it: check-only asks about at least one token.
    pub fn cost(self) -> u64 {
        match self {
            Op::Take(c) | Op::Refund(c) => c,
            Op::Check(c) => c.max(1),
        }
    }
}

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Tokens left after the decision (for a check, the tokens there now).
    pub tokens_remaining: f64,
    /// 0 when allowed, else how long until `cost` tokens are there.
    pub retry_after_ms: u64,
    /// How long until the bucket is full again.
    pub reset_after_ms: u64,
}

/// Decides `op` against a bucket last seen as `state` (None: never seen, or expired), at `now_ms`.
///
/// Returns the decision and the state to store (None for a check, which writes nothing).
pub fn apply(
    state: Option<BucketState>,
    now_ms: f64,
    shape: Shape,
    op: Op,
) -> (Decision, Option<BucketState>) {
    let capacity = shape.capacity();
    let rate = shape.rate();
    let full_ms = shape.full_refill_ms() as f64;

    let (mut tokens, ts) = match state {
        None => (capacity, now_ms),
        Some(s) => {
            // A clock that stepped back adds nothing, and no idle time adds more than a full refill.
            let elapsed = (now_ms - s.ts_ms).clamp(0.0, full_ms);
            let refilled = (s.tokens + rate * elapsed / 1000.0).min(capacity);
            // Never move `ts` backwards: that would count the same interval twice later.
            (refilled, s.ts_ms.max(now_ms))
        }
    };

    let cost = op.cost() as f64;
    let mut retry_after_ms = 0;
    let allowed = match op {
        Op::Refund(_) => {
            tokens = (tokens + cost).min(capacity);
            true
        }
        Op::Take(_) | Op::Check(_) => {
            let allowed = tokens >= cost;
            if allowed {
                if let Op::Take(_) = op {
                    tokens -= cost;
                }
            } else {
                retry_after_ms = ceil_ms((cost - tokens) / rate * 1000.0);
            }
            allowed
        }
    };

    let decision = Decision {
        allowed,
        tokens_remaining: tokens,
        retry_after_ms,
        reset_after_ms: ceil_ms((capacity - tokens) / rate * 1000.0),
    };
    let write = match op {
        Op::Check(_) => None,
        Op::Take(_) | Op::Refund(_) => Some(BucketState { tokens, ts_ms: ts }),
    };
    (decision, write)
}

fn ceil_ms(ms: f64) -> u64 {
    // `as` saturates and maps NaN to 0; the inputs here are finite and non-negative.
    ms.ceil().max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(c: f64, r: f64) -> Shape {
        Shape::new(c, r).unwrap()
    }

    /// Runs `ops` at the given times against one bucket, returning each decision.
    fn run(shape: Shape, ops: &[(f64, Op)]) -> Vec<Decision> {
        let mut state = None;
        ops.iter()
            .map(|&(now, op)| {
                let (d, w) = apply(state, now, shape, op);
                if w.is_some() {
                    state = w;
                }
                d
            })
            .collect()
    }

    #[test]
    fn new_bucket_is_full() {
        let (d, w) = apply(None, 5.0, shape(10.0, 1.0), Op::Take(1));
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 9.0);
        assert_eq!(d.reset_after_ms, 1000);
        assert_eq!(
            w,
            Some(BucketState {
                tokens: 9.0,
                ts_ms: 5.0
            })
        );
    }

    #[test]
    fn exact_allow_deny_sequence_and_figures() {
        let s = shape(3.0, 1.0);
        let d = run(s, &[(0.0, Op::Take(1)); 4]);
        let allowed: Vec<bool> = d.iter().map(|d| d.allowed).collect();
        assert_eq!(allowed, [true, true, true, false]);
        assert_eq!(d[2].tokens_remaining, 0.0);
        assert_eq!(d[3].retry_after_ms, 1000);
        assert_eq!(d[3].reset_after_ms, 3000);
        assert_eq!(d[3].tokens_remaining, 0.0);
    }

    #[test]
    fn refill_is_continuous_and_capped() {
        let s = shape(10.0, 2.0);
        let d = run(
            s,
            &[
                (0.0, Op::Take(10)),
                (1500.0, Op::Check(0)),    // 3 tokens back
                (100_000.0, Op::Check(0)), // long idle: full, not more
            ],
        );
        assert_eq!(d[1].tokens_remaining, 3.0);
        assert_eq!(d[1].reset_after_ms, 3500);
        assert_eq!(d[2].tokens_remaining, 10.0);
        assert_eq!(d[2].reset_after_ms, 0);
    }

    #[test]
    fn denied_request_costs_nothing() {
        let s = shape(5.0, 1.0);
        let d = run(
            s,
            &[(0.0, Op::Take(4)), (0.0, Op::Take(2)), (0.0, Op::Take(1))],
        );
        assert!(!d[1].allowed);
        assert_eq!(d[1].tokens_remaining, 1.0);
        assert_eq!(d[1].retry_after_ms, 1000);
        assert!(d[2].allowed);
        assert_eq!(d[2].tokens_remaining, 0.0);
    }

    #[test]
    fn clock_stepping_back_adds_nothing() {
        let s = shape(10.0, 10.0);
        let d = run(
            s,
            &[
                (10_000.0, Op::Take(10)),
                (9_000.0, Op::Check(0)),  // one second in the past
                (10_000.0, Op::Check(0)), // back to the present: still nothing gained
                (10_100.0, Op::Check(0)), // 100 ms later: one token
            ],
        );
        assert_eq!(d[1].tokens_remaining, 0.0);
        assert_eq!(d[2].tokens_remaining, 0.0);
        assert!((d[3].tokens_remaining - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_step_back_does_not_rewind_the_stored_time() {
        let s = shape(10.0, 10.0);
        let (_, w) = apply(None, 10_000.0, s, Op::Take(10));
        let (_, w) = apply(w, 9_000.0, s, Op::Take(0));
        assert_eq!(w.unwrap().ts_ms, 10_000.0);
    }

    #[test]
    fn check_writes_nothing_and_asks_for_at_least_one() {
        let s = shape(2.0, 1.0);
        let (d, w) = apply(None, 0.0, s, Op::Check(0));
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 2.0);
        assert_eq!(w, None);
        let state = Some(BucketState {
            tokens: 0.5,
            ts_ms: 0.0,
        });
        let (d, _) = apply(state, 0.0, s, Op::Check(0));
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 500);
        let (d, _) = apply(state, 0.0, s, Op::Check(2));
        assert_eq!(d.retry_after_ms, 1500);
    }

    #[test]
    fn refund_adds_back_up_to_capacity() {
        let s = shape(5.0, 1.0);
        let d = run(
            s,
            &[
                (0.0, Op::Take(4)),
                (0.0, Op::Refund(3)),
                (0.0, Op::Refund(10)),
            ],
        );
        assert_eq!(d[1].tokens_remaining, 4.0);
        assert!(d[1].allowed);
        assert_eq!(d[2].tokens_remaining, 5.0);
        assert_eq!(d[2].reset_after_ms, 0);
    }

    #[test]
    fn a_smaller_shape_caps_stored_tokens() {
        let state = Some(BucketState {
            tokens: 100.0,
            ts_ms: 0.0,
        });
        let (d, _) = apply(state, 0.0, shape(10.0, 1.0), Op::Take(1));
        assert_eq!(d.tokens_remaining, 9.0);
    }
}
