//! The token bucket of the README's "The token bucket", as pure functions: one request ([`apply`]) and a group of
//! requests decided together, all or nothing ([`apply_group`]).
//!
//! `lua/token_bucket.lua` is the same arithmetic, written in the same order so that both give the
//! same doubles; the shared contract suite (`tests/it/backend_contract.rs`) holds them to it.

use super::Shape;

/// The largest figure an answer carries (2^53 - 1 ms): every integer up to it is exact in a double,
/// so Lua and Rust cap at the same value and no input (a huge cost, a tiny rate) can overflow a
/// reply or turn a denial into an error.
pub const MAX_MS: u64 = (1 << 53) - 1;

/// What is stored per bucket: the tokens left (negative when in debt) and when they were counted
/// (ms on the backend's clock). A bucket with no state is full.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BucketState {
    pub tokens: f64,
    pub ts_ms: f64,
}

/// What a request does to its bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Spend `cost` tokens if they are there; a denial spends nothing and writes nothing.
    Take(u64),
    /// Spend as many of `cost` whole tokens as are there, at least 1: a lease of what the bucket
    /// can give (`up_to`). Denied, spending nothing, when not even one token is there.
    TakeUpTo(u64),
    /// Answer whether `cost` tokens are there, change nothing. A check of 0 is allowed unless the
    /// bucket is in debt (Envoy's `hits_addend: 0`).
    Check(u64),
    /// Give `cost` tokens back (Envoy's `is_negative_hits`, a Settle below its reservation), never
    /// above capacity. Always allowed.
    Refund(u64),
    /// Charge `cost` whatever is left, down to `-capacity` (debt): a cost known only after the work.
    /// Allowed only if the tokens were there before; the charge lands either way.
    Force(u64),
}

impl Op {
    /// The tokens the operation is about.
    pub fn cost(self) -> u64 {
        match self {
            Op::Take(c) | Op::TakeUpTo(c) | Op::Check(c) | Op::Refund(c) | Op::Force(c) => c,
        }
    }

    /// The tokens that must be there for the operation to be allowed: its cost, one for a
    /// take-up-to.
    pub fn need(self) -> u64 {
        match self {
            Op::TakeUpTo(_) => 1,
            other => other.cost(),
        }
    }

    /// The same question without spending: a take becomes the check of what it needs; anything
    /// else is unchanged.
    pub fn as_check(self) -> Op {
        match self {
            Op::Take(_) | Op::TakeUpTo(_) => Op::Check(self.need()),
            other => other,
        }
    }

    /// Whether the operation can add tokens (a cached "not enough tokens" no longer holds after it).
    pub fn adds_tokens(self) -> bool {
        matches!(self, Op::Refund(_))
    }
}

/// The answer for one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// Tokens left after the decision (for a check, the tokens there now); negative in debt.
    pub tokens_remaining: f64,
    /// 0 when allowed, else how long until `cost` tokens are there (one, for a take-up-to; at
    /// most [`MAX_MS`]).
    pub retry_after_ms: u64,
    /// How long until the bucket is full again (at most [`MAX_MS`]).
    pub reset_after_ms: u64,
    /// Answered by this replica without asking the backend: a denial the local deny cache could
    /// prove, or a rule that blocks everything (0 per unit).
    pub without_backend: bool,
    /// Tokens this decision took from the bucket: a charged take's cost, what a take-up-to could
    /// give; 0 for anything else (a denial, a take its group vetoed, a check, refund or charge).
    pub granted: u64,
}

/// What is asked of one bucket: its shape, the operation, and whether a denial vetoes the group
/// it is part of (false for a shadow-mode rule, whose denial is reported but never enforced).
/// The backends' requests and the script's operations carry one each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ask {
    pub shape: Shape,
    pub op: Op,
    pub veto: bool,
}

impl Ask {
    /// An operation whose denial counts (the usual case).
    pub fn new(shape: Shape, op: Op) -> Self {
        Self {
            shape,
            op,
            veto: true,
        }
    }
}

/// The bucket as it is at `now_ms`, refilled since it was stored.
fn refill(state: Option<BucketState>, now_ms: f64, shape: Shape) -> (f64, f64) {
    let capacity = shape.capacity();
    match state {
        None => (capacity, now_ms),
        Some(s) => {
            // A clock that stepped back adds nothing. The window is capped at the time a bucket
            // at its floor (-capacity) needs to fill; for a bucket not in debt that is the same
            // as the full refill, since tokens are capped at capacity anyway.
            let window = 2.0 * shape.full_refill_ms() as f64;
            let elapsed = (now_ms - s.ts_ms).clamp(0.0, window);
            // A stored debt deeper than this shape allows (the shape changed) counts at the floor.
            let tokens = (s.tokens.max(-capacity) + shape.rate() * elapsed / 1000.0).min(capacity);
            // Never move `ts` backwards: that would count the same interval twice later.
            (tokens, s.ts_ms.max(now_ms))
        }
    }
}

/// Decides `op` against a bucket last seen as `state` (None: never seen, or expired), at `now_ms`.
///
/// Returns the decision and the state to store (None when nothing changes: a check, a denial).
pub fn apply(
    state: Option<BucketState>,
    now_ms: f64,
    shape: Shape,
    op: Op,
) -> (Decision, Option<BucketState>) {
    let capacity = shape.capacity();
    let (before, ts) = refill(state, now_ms, shape);
    let cost = op.cost() as f64;
    // What a denial waits for: the cost, or the one token a take-up-to needs.
    let need = op.need() as f64;
    let (allowed, tokens, write, granted) = match op {
        Op::Take(c) if before >= cost => (true, before - cost, true, c),
        Op::TakeUpTo(c) if before >= need => {
            let granted = c.max(1).min(before as u64);
            (true, before - granted as f64, true, granted)
        }
        Op::TakeUpTo(_) => (false, before, false, 0),
        Op::Take(_) | Op::Check(_) => (before >= cost, before, false, 0),
        Op::Refund(_) => (true, (before + cost).min(capacity), true, 0),
        Op::Force(_) => (before >= cost, (before - cost).max(-capacity), true, 0),
    };
    let decision = Decision {
        allowed,
        tokens_remaining: tokens,
        retry_after_ms: if allowed {
            0
        } else {
            capped_ms((need - tokens) / shape.rate() * 1000.0)
        },
        reset_after_ms: capped_ms((capacity - tokens) / shape.rate() * 1000.0),
        without_backend: false,
        granted,
    };
    (decision, write.then_some(BucketState { tokens, ts_ms: ts }))
}

/// How long a stored bucket lives: until it would be full again, and at least the full-refill
/// time ("The token bucket" in the README; a bucket in debt needs longer). Deleting it then changes nothing.
pub fn ttl_ms(decision: &Decision, shape: Shape) -> u64 {
    decision.reset_after_ms.max(shape.full_refill_ms())
}

/// Decides a group of requests at one instant, in order. `slots[i]` is the index in `states` of
/// request i's bucket (requests on the same bucket share a slot and see each other's effect).
///
/// With `all_or_nothing`, a denial of any vetoing request means no Take of the group is charged:
/// the states are rolled back and only the refunds and forced charges (which always land) are
/// applied again. Each answer keeps its own verdict; a Take that was not charged reports the
/// tokens that are really there.
///
/// `states` is updated in place; `dirty[slot]` tells which states must be written back.
pub fn apply_group(
    states: &mut [Option<BucketState>],
    dirty: &mut [bool],
    slots: &[usize],
    reqs: &[Ask],
    now_ms: f64,
    all_or_nothing: bool,
) -> Vec<Decision> {
    debug_assert_eq!(slots.len(), reqs.len());
    let original: Vec<Option<BucketState>> = if all_or_nothing {
        states.to_vec()
    } else {
        Vec::new()
    };
    let mut decisions = Vec::with_capacity(reqs.len());
    let mut vetoed = false;
    for (&slot, r) in slots.iter().zip(reqs) {
        let (d, write) = apply(states[slot], now_ms, r.shape, r.op);
        if let Some(w) = write {
            states[slot] = Some(w);
            dirty[slot] = true;
        }
        vetoed |= r.veto && !d.allowed;
        decisions.push(d);
    }
    if !(all_or_nothing && vetoed) {
        return decisions;
    }
    states.copy_from_slice(&original);
    dirty.iter_mut().for_each(|d| *d = false);
    for ((&slot, r), decision) in slots.iter().zip(reqs).zip(decisions.iter_mut()) {
        match r.op {
            Op::Refund(_) | Op::Force(_) => {
                let (d, write) = apply(states[slot], now_ms, r.shape, r.op);
                if let Some(w) = write {
                    states[slot] = Some(w);
                    dirty[slot] = true;
                }
                *decision = d;
            }
            Op::Take(_) | Op::TakeUpTo(_) | Op::Check(_) => {
                // Not charged: the figures of the bucket as it is, the verdict as it was.
                let (now, _) = apply(states[slot], now_ms, r.shape, r.op.as_check());
                *decision = Decision {
                    allowed: decision.allowed,
                    retry_after_ms: decision.retry_after_ms,
                    ..now
                };
            }
        }
    }
    decisions
}

/// Milliseconds rounded up, capped at [`MAX_MS`] (an infinite quotient, from a tiny rate, too).
pub fn capped_ms(ms: f64) -> u64 {
    if ms >= MAX_MS as f64 {
        MAX_MS
    } else {
        // `as` maps NaN to 0 and saturates below 0; the inputs here are finite or +inf.
        ms.ceil().max(0.0) as u64
    }
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
                (1500.0, Op::Check(1)),    // 3 tokens back
                (100_000.0, Op::Check(1)), // long idle: full, not more
            ],
        );
        assert_eq!(d[1].tokens_remaining, 3.0);
        assert_eq!(d[1].reset_after_ms, 3500);
        assert_eq!(d[2].tokens_remaining, 10.0);
        assert_eq!(d[2].reset_after_ms, 0);
    }

    #[test]
    fn denied_request_costs_nothing_and_writes_nothing() {
        let s = shape(5.0, 1.0);
        let (_, w) = apply(None, 0.0, s, Op::Take(4));
        let (d, write) = apply(w, 0.0, s, Op::Take(2));
        assert!(!d.allowed);
        assert_eq!(write, None, "a denial must not write");
        assert_eq!(d.tokens_remaining, 1.0);
        assert_eq!(d.retry_after_ms, 1000);
        let (d, _) = apply(w, 0.0, s, Op::Take(1));
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 0.0);
    }

    #[test]
    fn clock_stepping_back_adds_nothing() {
        let s = shape(10.0, 10.0);
        let d = run(
            s,
            &[
                (10_000.0, Op::Take(10)),
                (9_000.0, Op::Check(1)),  // one second in the past
                (10_000.0, Op::Check(1)), // back to the present: still nothing gained
                (10_100.0, Op::Check(1)), // 100 ms later: one token
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
        let (_, w) = apply(w, 9_000.0, s, Op::Refund(1));
        assert_eq!(w.unwrap().ts_ms, 10_000.0);
    }

    #[test]
    fn check_writes_nothing_and_zero_is_ok_unless_in_debt() {
        let s = shape(2.0, 1.0);
        let (d, w) = apply(None, 0.0, s, Op::Check(1));
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 2.0);
        assert_eq!(w, None);
        let half = Some(BucketState {
            tokens: 0.5,
            ts_ms: 0.0,
        });
        let (d, _) = apply(half, 0.0, s, Op::Check(1));
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 500);
        let (d, _) = apply(half, 0.0, s, Op::Check(2));
        assert_eq!(d.retry_after_ms, 1500);
        // 0 hits: OK at exactly 0 tokens (as envoyproxy/ratelimit at exactly the limit), over in debt.
        let empty = Some(BucketState {
            tokens: 0.0,
            ts_ms: 0.0,
        });
        assert!(apply(empty, 0.0, s, Op::Check(0)).0.allowed);
        let debt = Some(BucketState {
            tokens: -1.0,
            ts_ms: 0.0,
        });
        let (d, _) = apply(debt, 0.0, s, Op::Check(0));
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1000);
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
    fn forced_charges_land_down_to_minus_capacity_and_refill_back() {
        let s = shape(10.0, 1.0);
        let d = run(
            s,
            &[
                (0.0, Op::Take(3)),       // 7 left
                (0.0, Op::Force(12)),     // not there, charged anyway: -5
                (0.0, Op::Take(1)),       // refused until the debt is paid
                (0.0, Op::Force(1000)),   // floors at -capacity
                (10_000.0, Op::Take(1)),  // 10 s later: 0 tokens, still refused
                (11_000.0, Op::Take(1)),  // one more second: 1 token
                (40_000.0, Op::Check(1)), // long idle: full
            ],
        );
        assert!(!d[1].allowed, "the tokens were not there");
        assert_eq!(d[1].tokens_remaining, -5.0);
        assert_eq!(d[1].retry_after_ms, 17_000, "12 tokens from -5");
        assert_eq!(d[1].reset_after_ms, 15_000);
        assert!(!d[2].allowed);
        assert_eq!(d[3].tokens_remaining, -10.0);
        assert!(!d[4].allowed);
        assert!(d[5].allowed);
        assert_eq!(d[6].tokens_remaining, 10.0);
        // Allowed when the tokens were there.
        let (d, _) = apply(None, 0.0, s, Op::Force(4));
        assert!(d.allowed);
        assert_eq!(d.tokens_remaining, 6.0);
    }

    #[test]
    fn debt_refills_continuously_for_twice_the_full_refill() {
        let s = shape(10.0, 1.0);
        let debt = Some(BucketState {
            tokens: -10.0,
            ts_ms: 0.0,
        });
        // 15 s after -10: 5 tokens (a window of one full refill would stop at 0).
        let (d, _) = apply(debt, 15_000.0, s, Op::Check(1));
        assert_eq!(d.tokens_remaining, 5.0);
        let (d, _) = apply(debt, 25_000.0, s, Op::Check(1));
        assert_eq!(d.tokens_remaining, 10.0);
        // A debt stored under a larger shape counts at this shape's floor.
        let deep = Some(BucketState {
            tokens: -100.0,
            ts_ms: 0.0,
        });
        assert_eq!(apply(deep, 0.0, s, Op::Check(1)).0.tokens_remaining, -10.0);
    }

    #[test]
    fn figures_are_capped_never_overflowed() {
        // A huge cost and a tiny rate: a denial with figures at the cap, not an overflow.
        let s = shape(10.0, 1e-17);
        let (d, w) = apply(None, 0.0, s, Op::Take(u64::MAX));
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, MAX_MS);
        assert_eq!(w, None);
        let (d, _) = apply(None, 0.0, s, Op::Take(1));
        assert!(d.allowed);
        assert_eq!(d.reset_after_ms, MAX_MS);
        assert_eq!(capped_ms(f64::INFINITY), MAX_MS);
        assert_eq!(capped_ms(1e300), MAX_MS);
        assert_eq!(capped_ms(0.2), 1);
    }

    #[test]
    fn ttl_is_the_full_refill_or_longer_in_debt() {
        let s = shape(10.0, 2.0);
        let (d, _) = apply(None, 0.0, s, Op::Take(1));
        assert_eq!(ttl_ms(&d, s), 5_000);
        let (d, _) = apply(None, 0.0, s, Op::Force(15));
        assert_eq!(d.tokens_remaining, -5.0);
        assert_eq!(ttl_ms(&d, s), 7_500);
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

    fn req(op: Op, veto: bool) -> Ask {
        Ask {
            shape: shape(5.0, 1.0),
            op,
            veto,
        }
    }

    #[test]
    fn group_all_or_nothing_charges_nothing_on_a_denial() {
        let mut states = [
            None,
            Some(BucketState {
                tokens: 1.0,
                ts_ms: 0.0,
            }),
        ];
        let mut dirty = [false; 2];
        let reqs = [req(Op::Take(2), true), req(Op::Take(2), true)];
        let d = apply_group(&mut states, &mut dirty, &[0, 1], &reqs, 0.0, true);
        assert!(d[0].allowed, "its own verdict stays");
        assert_eq!(d[0].tokens_remaining, 5.0, "but it was not charged");
        assert!(!d[1].allowed);
        assert_eq!(states[0], None);
        assert_eq!(dirty, [false, false]);

        // Without all_or_nothing the first is charged.
        let mut dirty = [false; 2];
        let d = apply_group(&mut states, &mut dirty, &[0, 1], &reqs, 0.0, false);
        assert_eq!(d[0].tokens_remaining, 3.0);
        assert_eq!(dirty, [true, false]);
    }

    #[test]
    fn group_forced_charges_and_refunds_land_and_shadow_never_vetoes() {
        let mut states = [None, None, None];
        let mut dirty = [false; 3];
        let reqs = [
            req(Op::Take(1), true),
            req(Op::Force(3), true),
            req(Op::Take(9), true), // denied: vetoes
            req(Op::Refund(1), true),
        ];
        let d = apply_group(&mut states, &mut dirty, &[0, 1, 2, 1], &reqs, 0.0, true);
        assert_eq!(states[0], None, "the take was rolled back");
        assert_eq!(states[1].unwrap().tokens, 3.0, "force and refund landed");
        assert_eq!(d[1].tokens_remaining, 2.0);
        assert_eq!(d[3].tokens_remaining, 3.0);
        assert!(!d[2].allowed);

        // A shadow denial does not veto.
        let mut states = [None, None];
        let mut dirty = [false; 2];
        let reqs = [req(Op::Take(1), true), req(Op::Take(9), false)];
        let d = apply_group(&mut states, &mut dirty, &[0, 1], &reqs, 0.0, true);
        assert!(!d[1].allowed);
        assert_eq!(states[0].unwrap().tokens, 4.0);
    }

    #[test]
    fn group_requests_on_one_bucket_see_each_other() {
        let mut states = [None];
        let mut dirty = [false];
        let reqs = [req(Op::Take(3), true), req(Op::Take(3), false)];
        let d = apply_group(&mut states, &mut dirty, &[0, 0], &reqs, 0.0, true);
        assert!(d[0].allowed);
        assert!(!d[1].allowed, "only 2 left after the first");
        assert_eq!(states[0].unwrap().tokens, 2.0);
    }
}
