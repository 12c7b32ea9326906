//! What a run observed: counts, latency (HDR histograms), a per-second timeline, per-descriptor
//! outcomes, and the allowed events the bound check replays.

use std::collections::HashMap;

use hdrhistogram::Histogram;

use crate::target::{Reply, Verdict};

/// Latency is recorded in microseconds, up to a minute.
const MAX_US: u64 = 60_000_000;

pub struct Second {
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

impl Second {
    fn new() -> Self {
        Self {
            allowed: 0,
            denied: 0,
            errors: 0,
            // Two significant figures are plenty for a per-second p99 and keep it small.
            latency: Histogram::new_with_max(MAX_US, 2).expect("valid histogram bounds"),
        }
    }
}

/// Per-descriptor outcome counts (envoy); slot 0 for the others.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct SlotCounts {
    pub allowed: u64,
    pub denied: u64,
    pub unlimited: u64,
}

/// Tokens allowed to one bucket at one time (µs since the start), for the bound check.
#[derive(Clone, Copy)]
struct Event {
    key: u32,
    slot: u16,
    t_us: u64,
    tokens: u32,
}

pub struct Recorder {
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
    pub timeline: Vec<Second>,
    pub slots: Vec<SlotCounts>,
    track_bound: bool,
    events: Vec<Event>,
    shapes: HashMap<(u32, u16), (f64, f64)>,
}

impl Recorder {
    pub fn new(slots: usize, track_bound: bool) -> Self {
        Self {
            requests: 0,
            allowed: 0,
            denied: 0,
            errors: 0,
            latency: Histogram::new_with_max(MAX_US, 3).expect("valid histogram bounds"),
            timeline: Vec::new(),
            slots: vec![SlotCounts::default(); slots],
            track_bound,
            events: Vec::new(),
            shapes: HashMap::new(),
        }
    }

    /// Records one call that ended `done_us` after the start and took `latency_us`.
    pub fn record(&mut self, key: u32, tokens: u32, reply: &Reply, done_us: u64, latency_us: u64) {
        self.requests += 1;
        let latency = latency_us.clamp(1, MAX_US);
        let _ = self.latency.record(latency);
        let second = (done_us / 1_000_000) as usize;
        while self.timeline.len() <= second {
            self.timeline.push(Second::new());
        }
        let s = &mut self.timeline[second];
        let _ = s.latency.record(latency);
        match reply {
            None => {
                self.errors += 1;
                s.errors += 1;
            }
            Some((allowed, buckets)) => {
                if *allowed {
                    self.allowed += 1;
                    s.allowed += 1;
                } else {
                    self.denied += 1;
                    s.denied += 1;
                }
                for b in buckets {
                    let Some(counts) = self.slots.get_mut(b.slot as usize) else {
                        continue;
                    };
                    match b.verdict {
                        Verdict::Allowed => counts.allowed += 1,
                        Verdict::Denied => counts.denied += 1,
                        Verdict::Unlimited => counts.unlimited += 1,
                    }
                    if let (true, Verdict::Allowed, Some(shape)) =
                        (self.track_bound, b.verdict, b.shape)
                    {
                        self.shapes.entry((key, b.slot)).or_insert(shape);
                        self.events.push(Event {
                            key,
                            slot: b.slot,
                            t_us: done_us,
                            tokens,
                        });
                    }
                }
            }
        }
    }

    /// Folds `other` into `self`.
    pub fn merge(&mut self, other: Recorder) {
        self.requests += other.requests;
        self.allowed += other.allowed;
        self.denied += other.denied;
        self.errors += other.errors;
        let _ = self.latency.add(&other.latency);
        for (i, s) in other.timeline.into_iter().enumerate() {
            while self.timeline.len() <= i {
                self.timeline.push(Second::new());
            }
            let mine = &mut self.timeline[i];
            mine.allowed += s.allowed;
            mine.denied += s.denied;
            mine.errors += s.errors;
            let _ = mine.latency.add(&s.latency);
        }
        for (mine, theirs) in self.slots.iter_mut().zip(other.slots) {
            mine.allowed += theirs.allowed;
            mine.denied += theirs.denied;
            mine.unlimited += theirs.unlimited;
        }
        self.events.extend(other.events);
        for (k, v) in other.shapes {
            self.shapes.entry(k).or_insert(v);
        }
    }

    /// Replays the allowed events of every bucket in time order: the tokens allowed up to any
    /// moment t must not exceed `capacity + rate * t` (t from the start of the run, when no bucket
    /// can hold more than its capacity). An event is counted at its answer's arrival, after the
    /// server decided it, so the check never blames the limiter for the client's delays.
    pub fn check_bound(&mut self) -> Bound {
        self.events
            .sort_unstable_by_key(|e| (e.key, e.slot, e.t_us));
        let mut bound = Bound::default();
        let mut i = 0;
        while i < self.events.len() {
            let (key, slot) = (self.events[i].key, self.events[i].slot);
            let (capacity, rate) = self.shapes[&(key, slot)];
            bound.buckets += 1;
            let mut allowed = 0.0;
            let mut violated = false;
            while i < self.events.len() && (self.events[i].key, self.events[i].slot) == (key, slot)
            {
                let e = self.events[i];
                allowed += f64::from(e.tokens);
                let limit = capacity + rate * e.t_us as f64 / 1e6;
                if allowed > limit + 1e-6 && !violated {
                    violated = true;
                    bound.violations += 1;
                    if bound.first.is_none() {
                        bound.first = Some(format!(
                            "key #{key}, descriptor {slot}: {allowed} tokens allowed by {:.3} s, bound {limit:.3}",
                            e.t_us as f64 / 1e6
                        ));
                    }
                }
                i += 1;
            }
        }
        bound.checked = true;
        bound
    }
}

#[derive(Clone, Debug, Default)]
pub struct Bound {
    pub checked: bool,
    pub buckets: usize,
    pub violations: usize,
    pub first: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::BucketAnswer;

    fn allowed(shape: (f64, f64)) -> Reply {
        Some((
            true,
            vec![BucketAnswer {
                slot: 0,
                verdict: Verdict::Allowed,
                shape: Some(shape),
            }],
        ))
    }

    #[test]
    fn bound_holds_for_a_token_bucket_and_catches_excess() {
        let mut ok = Recorder::new(1, true);
        // capacity 2, 1 per second: 2 at once, then one per second.
        for (i, t) in [0, 1, 1_000_000, 2_000_000].into_iter().enumerate() {
            ok.record(7, 1, &allowed((2.0, 1.0)), t + 10, 5);
            assert_eq!(ok.requests, i as u64 + 1);
        }
        let b = ok.check_bound();
        assert_eq!((b.buckets, b.violations), (1, 0));

        let mut bad = Recorder::new(1, true);
        for t in [0, 1, 2] {
            bad.record(7, 1, &allowed((2.0, 1.0)), t, 5);
        }
        let b = bad.check_bound();
        assert_eq!(b.violations, 1, "{b:?}");
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Recorder::new(1, false);
        let mut b = Recorder::new(1, false);
        a.record(1, 1, &allowed((1.0, 1.0)), 10, 100);
        b.record(1, 1, &None, 2_500_000, 300);
        b.record(2, 1, &Some((false, vec![])), 2_600_000, 300);
        a.merge(b);
        assert_eq!((a.requests, a.allowed, a.denied, a.errors), (3, 1, 1, 1));
        assert_eq!(a.timeline.len(), 3);
        assert_eq!(a.timeline[2].errors, 1);
        assert_eq!(a.latency.len(), 3);
    }
}
