//! What a run observed: counts, latency (HDR histograms), a per-second timeline, per-descriptor
//! outcomes, and the allowed events the bound check replays.

use std::collections::HashMap;

use hdrhistogram::Histogram;

use crate::target::{Failure, Reply, Verdict};

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

/// Tokens allowed to one bucket, with when the request was sent and when its answer came (µs
/// since the start): the server decided somewhere in between. For the bound check.
#[derive(Clone, Copy)]
struct Event {
    key: u32,
    slot: u16,
    sent_us: u64,
    done_us: u64,
    tokens: u32,
}

pub struct Recorder {
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    /// `errors` by kind, in the order of `Failure::ALL`.
    pub failures: [u64; Failure::ALL.len()],
    pub latency: Histogram<u64>,
    pub timeline: Vec<Second>,
    pub slots: Vec<SlotCounts>,
    track_bound: bool,
    /// Capacities of debt the bound allows (1 for settled costs, which may overdraw a bucket).
    debt: f64,
    events: Vec<Event>,
    shapes: HashMap<(u32, u16), (f64, f64)>,
    /// Concurrency: slots per key, and each granted slot's sure hold (key, from µs, to µs).
    max_in_flight: Option<u32>,
    holds: Vec<(u32, u64, u64)>,
}

impl Recorder {
    pub fn new(slots: usize, track_bound: bool, debt: f64) -> Self {
        Self {
            requests: 0,
            allowed: 0,
            denied: 0,
            errors: 0,
            failures: [0; Failure::ALL.len()],
            latency: Histogram::new_with_max(MAX_US, 3).expect("valid histogram bounds"),
            timeline: Vec::new(),
            slots: vec![SlotCounts::default(); slots],
            track_bound,
            debt,
            events: Vec::new(),
            shapes: HashMap::new(),
            max_in_flight: None,
            holds: Vec::new(),
        }
    }

    /// Checks in-flight counts (at most `max` held at once per key) instead of token buckets.
    pub fn with_max_in_flight(mut self, max: Option<u32>) -> Self {
        self.max_in_flight = max;
        self
    }

    /// Records one call sent `sent_us` after the start (its intended start in the open loop) that
    /// ended `done_us` after it and took `latency_us`.
    pub fn record(&mut self, key: u32, reply: &Reply, sent_us: u64, done_us: u64, latency_us: u64) {
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
            Err(kind) => {
                self.errors += 1;
                self.failures[*kind as usize] += 1;
                s.errors += 1;
            }
            Ok((allowed, buckets)) => {
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
                    if let (true, Some((from, to))) = (self.track_bound, b.held_us) {
                        self.holds.push((key, from, to));
                    }
                    match b.verdict {
                        Verdict::Allowed => counts.allowed += 1,
                        Verdict::Denied => counts.denied += 1,
                        Verdict::Unlimited => counts.unlimited += 1,
                    }
                    if let (true, Verdict::Allowed, Some(shape)) =
                        (self.track_bound, b.verdict, b.shape)
                    {
                        self.shapes.entry((key, b.slot)).or_insert(shape);
                        // Leased: the bucket decided when the lease was taken.
                        let (sent_us, done_us) = b.taken_us.unwrap_or((sent_us, done_us));
                        self.events.push(Event {
                            key,
                            slot: b.slot,
                            sent_us,
                            done_us,
                            tokens: b.tokens,
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
        for (mine, theirs) in self.failures.iter_mut().zip(other.failures) {
            *mine += theirs;
        }
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
        self.holds.extend(other.holds);
        for (k, v) in other.shapes {
            self.shapes.entry(k).or_insert(v);
        }
    }

    /// Checks every bucket over every interval: the tokens allowed by decisions made within
    /// `[t1, t2]` must not exceed `capacity + rate * (t2 - t1)` (a bucket holds at most its
    /// capacity at any moment, then refills at its rate), so a burst after an idle stretch is
    /// caught as well as an excess since the start.
    ///
    /// A decision happened between its request's send and its answer's arrival. With a bucket's
    /// events sorted by send time, the decisions of events `i..=j` all lie within
    /// `[sent_i, max done of 1..=j]`, which is never shorter than the true interval, so the
    /// check never blames the limiter for the client's delays. It runs in one pass per bucket:
    /// with prefix sums `S`, a violation is `S_j - rate * D_j + max_i(rate * sent_i - S_(i-1)) >
    /// capacity`, where `D_j` is the latest answer among the first `j`.
    pub fn check_bound(&mut self) -> Bound {
        if let Some(max) = self.max_in_flight {
            return self.check_in_flight(max);
        }
        self.events
            .sort_unstable_by_key(|e| (e.key, e.slot, e.sent_us));
        let mut bound = Bound::default();
        for events in self
            .events
            .chunk_by(|a, b| (a.key, a.slot) == (b.key, b.slot))
        {
            let (key, slot) = (events[0].key, events[0].slot);
            let (capacity, rate) = self.shapes[&(key, slot)];
            let rate_us = rate / 1e6;
            bound.buckets += 1;
            let (mut sum, mut latest_done, mut best_start) = (0.0f64, 0u64, f64::NEG_INFINITY);
            for e in events {
                // The window may start at this event: what its start allows, net of what came before.
                best_start = best_start.max(rate_us * e.sent_us as f64 - sum);
                sum += f64::from(e.tokens);
                latest_done = latest_done.max(e.done_us);
                let excess =
                    sum - rate_us * latest_done as f64 + best_start - capacity * (1.0 + self.debt);
                // 1e-6 of a token absorbs float rounding; tokens are whole.
                if excess > 1e-6 {
                    bound.violations += 1;
                    if bound.first.is_none() {
                        bound.first = Some(format!(
                            "key #{key}, descriptor {slot}: {:.3} tokens more than capacity {capacity} + rate {rate}/s (+ debt) allow, in a window ending at {:.3} s",
                            excess,
                            latest_done as f64 / 1e6
                        ));
                    }
                    break;
                }
            }
        }
        bound.checked = true;
        bound
    }
}

impl Recorder {
    /// Checks that no key ever had more than `max` slots held at once. Each hold is the time the
    /// caller surely held its slot (granted answer received .. release sent), inside the
    /// server's hold, so an overlap of more than `max` here is one there too; a hold ending when
    /// another starts is not counted as overlapping (ends are swept first).
    fn check_in_flight(&mut self, max: u32) -> Bound {
        let mut bound = Bound {
            checked: true,
            ..Bound::default()
        };
        // (key, time, +1 start / -1 end); ends sort before starts at one time.
        let mut edges: Vec<(u32, u64, i8)> = Vec::with_capacity(self.holds.len() * 2);
        for &(key, from, to) in &self.holds {
            edges.push((key, from, 1));
            edges.push((key, to, -1));
        }
        edges.sort_unstable();
        for edges in edges.chunk_by(|a, b| a.0 == b.0) {
            bound.buckets += 1;
            let mut held = 0i64;
            for &(key, at, step) in edges {
                held += i64::from(step);
                if held > i64::from(max) {
                    bound.violations += 1;
                    if bound.first.is_none() {
                        bound.first = Some(format!(
                            "key #{key}: {held} slots held at once at {:.3} s, more than --max-in-flight {max}",
                            at as f64 / 1e6
                        ));
                    }
                    break;
                }
            }
        }
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
        Ok((
            true,
            vec![BucketAnswer {
                slot: 0,
                verdict: Verdict::Allowed,
                shape: Some(shape),
                tokens: 1,
                held_us: None,
                taken_us: None,
            }],
        ))
    }

    /// Records an allowed event sent at `t` µs, answered 10 µs later.
    fn at(r: &mut Recorder, key: u32, t: u64, shape: (f64, f64)) {
        r.record(key, &allowed(shape), t, t + 10, 10);
    }

    #[test]
    fn bound_holds_for_a_token_bucket_and_catches_excess() {
        let mut ok = Recorder::new(1, true, 0.0);
        // capacity 2, 1 per second: 2 at once, then one per second.
        for (i, t) in [0, 1, 1_000_000, 2_000_000].into_iter().enumerate() {
            at(&mut ok, 7, t, (2.0, 1.0));
            assert_eq!(ok.requests, i as u64 + 1);
        }
        let b = ok.check_bound();
        assert_eq!((b.buckets, b.violations), (1, 0));

        let mut bad = Recorder::new(1, true, 0.0);
        for t in [0, 1, 2] {
            at(&mut bad, 7, t, (2.0, 1.0));
        }
        let b = bad.check_bound();
        assert_eq!(b.violations, 1, "{b:?}");
    }

    #[test]
    fn a_burst_after_an_idle_stretch_is_caught() {
        // capacity 2, 1 per second. Idle for 10 s, then 5 at once: the total since the start (5 of
        // 12 allowed) is fine, but no window may hold more than 2 + its refill.
        let mut r = Recorder::new(1, true, 0.0);
        at(&mut r, 1, 0, (2.0, 1.0));
        for t in [10_000_000, 10_000_001, 10_000_002, 10_000_003, 10_000_004] {
            at(&mut r, 1, t, (2.0, 1.0));
        }
        let b = r.check_bound();
        assert_eq!(b.violations, 1, "{b:?}");
        // The same burst spread at the rate passes.
        let mut r = Recorder::new(1, true, 0.0);
        for i in 0..12u64 {
            at(&mut r, 1, 10_000_000 + i * 1_000_000, (2.0, 1.0));
        }
        at(&mut r, 1, 10_000_001, (2.0, 1.0));
        assert_eq!(r.check_bound().violations, 0);
    }

    #[test]
    fn slow_answers_are_not_blamed_on_the_limiter() {
        // Two decisions 1 s apart on a bucket of 1 at 1/s, whose answers both arrive late and
        // together: fine, the window of the decisions spans their sends.
        let mut r = Recorder::new(1, true, 0.0);
        r.record(1, &allowed((1.0, 1.0)), 0, 1_500_000, 10);
        r.record(1, &allowed((1.0, 1.0)), 1_000_000, 1_500_001, 10);
        assert_eq!(r.check_bound().violations, 0);
    }

    #[test]
    fn in_flight_overlaps_beyond_max_are_caught() {
        let hold = |from: u64, to: u64| -> Reply {
            Ok((
                true,
                vec![BucketAnswer {
                    slot: 0,
                    verdict: Verdict::Allowed,
                    shape: None,
                    tokens: 1,
                    held_us: Some((from, to)),
                    taken_us: None,
                }],
            ))
        };
        let mut ok = Recorder::new(1, true, 0.0).with_max_in_flight(Some(2));
        // Two at once, a third starting as one ends: never more than 2.
        for (from, to) in [(0, 100), (10, 200), (100, 300)] {
            ok.record(1, &hold(from, to), 0, 0, 1);
        }
        ok.record(2, &hold(0, 1000), 0, 0, 1);
        let b = ok.check_bound();
        assert_eq!((b.buckets, b.violations), (2, 0), "{b:?}");
        let mut bad = Recorder::new(1, true, 0.0).with_max_in_flight(Some(2));
        for (from, to) in [(0, 100), (10, 200), (99, 300)] {
            bad.record(1, &hold(from, to), 0, 0, 1);
        }
        let b = bad.check_bound();
        assert_eq!(b.violations, 1, "{b:?}");
        assert!(b.first.unwrap().contains("3 slots held"));
    }

    #[test]
    fn merge_adds_up() {
        let mut a = Recorder::new(1, false, 0.0);
        let mut b = Recorder::new(1, false, 0.0);
        a.record(1, &allowed((1.0, 1.0)), 0, 10, 100);
        b.record(1, &Err(Failure::Shed), 2_499_000, 2_500_000, 300);
        b.record(2, &Ok((false, vec![])), 2_599_000, 2_600_000, 300);
        a.record(3, &Err(Failure::Deadline), 2_699_000, 2_700_000, 300);
        a.record(3, &Err(Failure::Shed), 2_799_000, 2_800_000, 300);
        a.merge(b);
        assert_eq!((a.requests, a.allowed, a.denied, a.errors), (5, 1, 1, 3));
        // deadline, shed, unavailable, other
        assert_eq!(a.failures, [1, 2, 0, 0]);
        assert_eq!(a.timeline.len(), 3);
        assert_eq!(a.timeline[2].errors, 3);
        assert_eq!(a.latency.len(), 5);
    }
}
