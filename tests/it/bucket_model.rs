//! The bucket arithmetic of `src/core/bucket.rs` (and so of the Lua script, which the contract
//! suite holds to it) against a model in exact integers, over random shapes, costs and clocks.
//!
//! The model is the README's "The token bucket" written the obvious way: whole tokens in `i128`, time in whole
//! milliseconds, no doubles, no caps other than the rules' own. Time steps are chosen so that every
//! refill is a whole number of tokens (a rate in tokens per second with steps of whole seconds, or
//! a rate that is a multiple of 1000 with steps of milliseconds); then the doubles of the real
//! arithmetic must agree with the model exactly on verdicts and token counts, and within 1 ms on the
//! two times (a quotient rounded up may land one ulp above an integer).

use proptest::prelude::*;
use sluicegate_core::{Ask, BucketState, Decision, Op, Shape, apply, apply_group};

/// One bucket in the model: whole tokens (negative in debt) and the time they were counted.
#[derive(Clone, Copy, Debug)]
struct Model {
    tokens: i128,
    ts: i128,
}

#[derive(Clone, Copy, Debug)]
struct ModelShape {
    capacity: i128,
    /// Tokens per second.
    rate: i128,
}

#[derive(Debug, PartialEq)]
struct ModelDecision {
    allowed: bool,
    tokens: i128,
    /// Tokens taken (a charged take's cost, a take-up-to's grant).
    granted: i128,
    retry_after_ms: i128,
    reset_after_ms: i128,
}

fn ceil_div(a: i128, b: i128) -> i128 {
    debug_assert!(b > 0);
    if a <= 0 { 0 } else { (a + b - 1) / b }
}

/// "The token bucket": a bucket never seen is full; time refills it at `rate`, never above capacity; a clock
/// that steps back adds nothing and never moves the stored time back; debt is floored at -capacity.
fn model_refill(state: Option<Model>, now: i128, s: ModelShape) -> (i128, i128) {
    match state {
        None => (s.capacity, now),
        Some(m) => {
            let elapsed = (now - m.ts).max(0);
            let floor = m.tokens.max(-s.capacity);
            // Past the time that fills a bucket from its floor, it is full whatever it held.
            let tokens = if s.rate * elapsed >= 2 * s.capacity * 1000 {
                s.capacity
            } else {
                assert_eq!(s.rate * elapsed % 1000, 0, "steps keep refills whole");
                (floor + s.rate * elapsed / 1000).min(s.capacity)
            };
            (tokens, m.ts.max(now))
        }
    }
}

fn model_apply(
    state: Option<Model>,
    now: i128,
    s: ModelShape,
    op: Op,
) -> (ModelDecision, Option<Model>) {
    let (before, ts) = model_refill(state, now, s);
    let cost = op.cost() as i128;
    let mut need = cost;
    let (allowed, tokens, write, granted) = match op {
        Op::Take(_) => {
            if before >= cost {
                (true, before - cost, true, cost)
            } else {
                (false, before, false, 0)
            }
        }
        // As many of cost as there are, at least one; nothing without one.
        Op::TakeUpTo(_) => {
            need = 1;
            let granted = cost.max(1).min(before);
            if granted >= 1 {
                (true, before - granted, true, granted)
            } else {
                (false, before, false, 0)
            }
        }
        Op::Check(_) => (before >= cost, before, false, 0),
        Op::Refund(_) => (true, (before + cost).min(s.capacity), true, 0),
        Op::Force(_) => (before >= cost, (before - cost).max(-s.capacity), true, 0),
    };
    let decision = ModelDecision {
        allowed,
        tokens,
        granted,
        retry_after_ms: if allowed {
            0
        } else {
            ceil_div((need - tokens) * 1000, s.rate)
        },
        reset_after_ms: ceil_div((s.capacity - tokens) * 1000, s.rate),
    };
    (decision, write.then_some(Model { tokens, ts }))
}

/// A group in the model: every request in order; if a vetoing one is denied (all or nothing),
/// start again from the states before and apply only the refunds and forced charges.
fn model_group(
    states: &mut [Option<Model>],
    reqs: &[(usize, ModelShape, Op, bool)],
    now: i128,
    all_or_nothing: bool,
) -> Vec<ModelDecision> {
    let before = states.to_vec();
    let mut out = Vec::new();
    let mut vetoed = false;
    for &(slot, s, op, veto) in reqs {
        let (d, w) = model_apply(states[slot], now, s, op);
        if let Some(w) = w {
            states[slot] = Some(w);
        }
        vetoed |= veto && !d.allowed;
        out.push(d);
    }
    if !(all_or_nothing && vetoed) {
        return out;
    }
    states.copy_from_slice(&before);
    for (i, &(slot, s, op, _)) in reqs.iter().enumerate() {
        match op {
            Op::Refund(_) | Op::Force(_) => {
                let (d, w) = model_apply(states[slot], now, s, op);
                states[slot] = w.or(states[slot]);
                out[i] = d;
            }
            Op::Take(c) | Op::TakeUpTo(c) | Op::Check(c) => {
                let (d, _) = model_apply(states[slot], now, s, Op::Check(c));
                out[i] = ModelDecision {
                    allowed: out[i].allowed,
                    retry_after_ms: out[i].retry_after_ms,
                    ..d
                };
            }
        }
    }
    out
}

fn same(real: &Decision, model: &ModelDecision, context: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(real.allowed, model.allowed, "verdict, {}", context);
    prop_assert_eq!(real.granted as i128, model.granted, "taken, {}", context);
    prop_assert_eq!(
        real.tokens_remaining,
        model.tokens as f64,
        "tokens, {}",
        context
    );
    let near = |a: u64, b: i128| (a as i128 - b).abs() <= 1;
    prop_assert!(
        near(real.retry_after_ms, model.retry_after_ms),
        "retry_after {} vs {}, {}",
        real.retry_after_ms,
        model.retry_after_ms,
        context
    );
    prop_assert!(
        near(real.reset_after_ms, model.reset_after_ms),
        "reset_after {} vs {}, {}",
        real.reset_after_ms,
        model.reset_after_ms,
        context
    );
    Ok(())
}

/// A shape and the time step (ms) that keeps its refills whole: tokens per second with steps of
/// seconds, or thousands of tokens per second with steps of milliseconds. Small and large buckets.
fn shape_and_step() -> impl Strategy<Value = (ModelShape, i128)> {
    prop_oneof![
        (1i128..=50, 1i128..=50).prop_map(|(c, r)| (
            ModelShape {
                capacity: c,
                rate: r
            },
            1000
        )),
        (1i128..=1_000_000_000_000, 1i128..=1_000_000).prop_map(|(c, r)| (
            ModelShape {
                capacity: c,
                rate: r
            },
            1000
        )),
        (1i128..=100_000, 1i128..=20).prop_map(|(c, k)| (
            ModelShape {
                capacity: c,
                rate: k * 1000
            },
            1
        )),
    ]
}

/// An operation with a cost scaled to the bucket: mostly around capacity, sometimes 0, sometimes
/// far beyond it.
fn op_for(capacity: i128) -> impl Strategy<Value = Op> {
    let c = capacity as u64;
    let cost = prop_oneof![
        2 => Just(0u64),
        6 => 0..=c.saturating_add(1),
        1 => Just(c),
        1 => c..=c.saturating_mul(3),
    ];
    (0u8..5, cost).prop_map(|(kind, cost)| match kind {
        0 => Op::Take(cost),
        1 => Op::Check(cost),
        2 => Op::Refund(cost),
        3 => Op::Force(cost),
        _ => Op::TakeUpTo(cost),
    })
}

/// Clock moves in steps, mostly forward, sometimes standing still or stepping back.
fn clock_moves() -> impl Strategy<Value = i128> {
    prop_oneof![
        3 => Just(0i128),
        6 => 1i128..=5,
        2 => 5i128..=5000,
        1 => -10i128..=-1,
    ]
}

fn real_shape(s: ModelShape) -> Shape {
    Shape::new(s.capacity as f64, s.rate as f64).unwrap()
}

/// Shapes for a group (one per bucket) and its rounds of requests: (bucket, operation, veto).
type Rounds = Vec<Vec<(usize, Op, bool)>>;

fn group_case() -> impl Strategy<Value = (Vec<(ModelShape, i128)>, Rounds)> {
    prop::collection::vec(shape_and_step(), 1..4).prop_flat_map(|shapes| {
        let caps: Vec<i128> = shapes.iter().map(|(s, _)| s.capacity).collect();
        let request = (0..caps.len())
            .prop_flat_map(move |slot| (Just(slot), op_for(caps[slot]), any::<bool>()));
        let rounds = prop::collection::vec(prop::collection::vec(request, 1..8), 1..6);
        (Just(shapes), rounds)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn one_bucket_matches_the_exact_model(
        (s, step, ops) in shape_and_step().prop_flat_map(|(s, step)| {
            (Just(s), Just(step), prop::collection::vec((clock_moves(), op_for(s.capacity)), 1..60))
        }),
    ) {
        let shape = real_shape(s);
        let (mut real, mut model): (Option<BucketState>, Option<Model>) = (None, None);
        let mut now: i128 = 1_700_000_000_000;
        for (i, &(moves, op)) in ops.iter().enumerate() {
            now += moves * step;
            let (d, w) = apply(real, now as f64, shape, op);
            let (md, mw) = model_apply(model, now, s, op);
            same(&d, &md, &format!("step {i}: {op:?} at {now} on {s:?}"))?;
            prop_assert_eq!(w.is_some(), mw.is_some(), "writes, step {}", i);
            if let (Some(w), Some(mw)) = (w, mw) {
                prop_assert_eq!(w.tokens, mw.tokens as f64);
                prop_assert_eq!(w.ts_ms, mw.ts as f64);
                real = Some(w);
                model = Some(mw);
            }
        }
    }

    #[test]
    fn groups_match_the_exact_model(
        (shapes, rounds) in group_case(),
        moves in prop::collection::vec(clock_moves(), 6),
        all_or_nothing in any::<bool>(),
    ) {
        // Every bucket of the group refills by whole tokens with the coarsest step among them.
        let step = shapes.iter().map(|(_, st)| *st).max().unwrap();
        let n = shapes.len();
        let mut real: Vec<Option<BucketState>> = vec![None; n];
        let mut model: Vec<Option<Model>> = vec![None; n];
        let mut now: i128 = 1_700_000_000_000;
        for (round, requests) in rounds.iter().enumerate() {
            now += moves[round] * step;
            let reqs: Vec<(usize, ModelShape, Op, bool)> = requests
                .iter()
                .map(|&(slot, op, veto)| (slot, shapes[slot].0, op, veto))
                .collect();
            let slots: Vec<usize> = reqs.iter().map(|r| r.0).collect();
            let group: Vec<Ask> = reqs
                .iter()
                .map(|&(_, s, op, veto)| Ask { shape: real_shape(s), op, veto })
                .collect();
            let mut dirty = vec![false; n];
            let decisions =
                apply_group(&mut real, &mut dirty, &slots, &group, now as f64, all_or_nothing);
            let expected = model_group(&mut model, &reqs, now, all_or_nothing);
            for (i, (d, md)) in decisions.iter().zip(&expected).enumerate() {
                same(d, md, &format!("round {round}, request {i}: {:?}", reqs[i]))?;
            }
            for slot in 0..n {
                let (r, m) = (real[slot], model[slot]);
                prop_assert_eq!(
                    r.map(|r| (r.tokens, r.ts_ms)),
                    m.map(|m| (m.tokens as f64, m.ts as f64)),
                    "state of bucket {}",
                    slot
                );
            }
        }
    }
}

#[test]
fn the_model_can_tell_a_wrong_answer() {
    // The comparison is not vacuous: an answer off by one token or with the wrong verdict is seen.
    let s = ModelShape {
        capacity: 3,
        rate: 1,
    };
    let (md, _) = model_apply(None, 0, s, Op::Take(2));
    let (d, _) = apply(None, 0.0, real_shape(s), Op::Take(2));
    assert!(same(&d, &md, "right").is_ok());
    let off = Decision {
        tokens_remaining: d.tokens_remaining + 1.0,
        ..d
    };
    assert!(same(&off, &md, "off by one").is_err());
    let flipped = Decision {
        allowed: !d.allowed,
        ..d
    };
    assert!(same(&flipped, &md, "flipped").is_err());
}
