//! The adaptive concurrency limit: how many decision calls sluicegate works on at once follows what
//! the backend and the CPU can do, so that excess is shed at once instead of queued.
//!
//! AIMD on measured latency, per window of [`WINDOW`]: a call's latency is from when the gRPC
//! layer took it up to its answer, so it includes the wait for a turn on the runtime and in a Redis
//! node's queue, where overload shows first. When more than one call in ten took longer than the
//! target (MAX_QUEUE_MS), the limit drops by a quarter; when the window was healthy and the calls
//! in progress came near the limit, it grows by a tenth. It stays between [`FLOOR`] and the hard
//! cap (MAX_CONCURRENT_REQUESTS). Multiplicative both ways: from the cap to the floor or back takes
//! a few seconds, and a load step is followed within a few windows.
//!
//! The hot path is two atomic operations and an `Instant`; the window's tally takes a lock for a
//! few instructions per call, never across an `.await`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// How long one window of samples lasts before the limit moves.
pub const WINDOW: Duration = Duration::from_millis(100);
/// The limit never goes below this: a burst of honest calls on a slow moment still gets through.
pub const FLOOR: usize = 32;
/// Where the limit starts (or the hard cap, if lower): enough for any steady load this service
/// answers within its target on one machine; it grows when used and healthy.
pub const START: usize = 512;
/// Samples a window needs before it moves the limit (a quiet window waits for more).
const MIN_SAMPLES: u32 = 16;

#[derive(Debug)]
struct Window {
    started: Instant,
    samples: u32,
    slow: u32,
    /// The most calls in progress seen during the window.
    peak: usize,
}

#[derive(Debug)]
pub struct Adaptive {
    limit: AtomicUsize,
    in_progress: AtomicUsize,
    hard: usize,
    target: Duration,
    window: Mutex<Window>,
    on_change: Option<metrics::Gauge>,
}

/// A call admitted: its latency is recorded and its place freed when it is dropped (answered, or
/// dropped because its caller went away: either way it took that long).
pub struct Admitted {
    limiter: Arc<Adaptive>,
    /// When the call was admitted (taken up by the gRPC layer).
    pub started: Instant,
    in_progress: usize,
}

impl Adaptive {
    /// A limit aiming at latencies under `target`, never above `hard`; `gauge` shows it.
    pub fn new(hard: usize, target: Duration, gauge: Option<metrics::Gauge>) -> Self {
        let start = START.min(hard).max(1);
        if let Some(g) = &gauge {
            g.set(start as f64);
        }
        Self {
            limit: AtomicUsize::new(start),
            in_progress: AtomicUsize::new(0),
            hard,
            target,
            window: Mutex::new(Window {
                started: Instant::now(),
                samples: 0,
                slow: 0,
                peak: 0,
            }),
            on_change: gauge,
        }
    }

    /// The limit now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// A place for a call, or None when the limit is reached (shed it). Never waits.
    pub fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let before = self.in_progress.fetch_add(1, Ordering::AcqRel);
        if before >= self.limit() {
            self.in_progress.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Admitted {
            limiter: self.clone(),
            started: Instant::now(),
            in_progress: before + 1,
        })
    }

    fn record(&self, latency: Duration, in_progress: usize, now: Instant) {
        let mut w = self.window.lock();
        w.samples += 1;
        if latency > self.target {
            w.slow += 1;
        }
        w.peak = w.peak.max(in_progress);
        if now.duration_since(w.started) < WINDOW || w.samples < MIN_SAMPLES {
            return;
        }
        let limit = self.limit();
        let next = if w.slow * 10 > w.samples {
            (limit - limit / 4).max(FLOOR.min(self.hard))
        } else if w.peak * 4 >= limit * 3 {
            (limit + (limit / 10).max(1)).min(self.hard)
        } else {
            limit
        };
        *w = Window {
            started: now,
            samples: 0,
            slow: 0,
            peak: 0,
        };
        drop(w);
        if next != limit {
            self.limit.store(next, Ordering::Relaxed);
            if let Some(g) = &self.on_change {
                g.set(next as f64);
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let now = Instant::now();
        self.limiter.in_progress.fetch_sub(1, Ordering::AcqRel);
        self.limiter
            .record(now.duration_since(self.started), self.in_progress, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one window of `n` calls of `latency` each, `in_progress` at once.
    fn window(a: &Adaptive, start: Instant, n: u32, latency: Duration, in_progress: usize) {
        for i in 0..n {
            let at = start + WINDOW * (i + 1) / n;
            a.record(latency, in_progress, at);
        }
    }

    #[test]
    fn slow_windows_shrink_the_limit_to_the_floor_and_healthy_busy_ones_grow_it_to_the_cap() {
        let a = Adaptive::new(2000, Duration::from_millis(10), None);
        let t0 = a.window.lock().started;
        assert_eq!(a.limit(), START);
        let mut at = t0;
        // Slow: down by a quarter per window, never below the floor.
        window(&a, at, 100, Duration::from_millis(50), 500);
        assert_eq!(a.limit(), START - START / 4);
        for _ in 0..40 {
            at += WINDOW;
            window(&a, at, 100, Duration::from_millis(50), 500);
        }
        assert_eq!(a.limit(), FLOOR);
        // Healthy but idle: the limit stays where it is.
        at += WINDOW;
        window(&a, at, 100, Duration::from_millis(1), 2);
        assert_eq!(a.limit(), FLOOR);
        // Healthy and busy (calls in progress near the limit): up by a tenth, up to the cap.
        let mut last = FLOOR;
        for _ in 0..100 {
            at += WINDOW;
            let limit = a.limit();
            window(&a, at, 100, Duration::from_millis(1), limit);
            assert!(a.limit() >= last);
            last = a.limit();
        }
        assert_eq!(a.limit(), 2000);
    }

    #[test]
    fn a_few_slow_calls_do_not_move_it_and_a_quiet_window_waits_for_samples() {
        let a = Adaptive::new(10_000, Duration::from_millis(10), None);
        let t0 = a.window.lock().started;
        // One call in twenty slow: healthy.
        for i in 0..100u32 {
            let slow = i % 20 == 0;
            let latency = Duration::from_millis(if slow { 30 } else { 1 });
            a.record(latency, 10, t0 + WINDOW * (i + 1) / 100);
        }
        assert_eq!(a.limit(), START);
        // Too few samples: no move, however slow.
        for i in 0..(MIN_SAMPLES - 1) {
            a.record(
                Duration::from_secs(1),
                10,
                t0 + WINDOW * 3 + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(a.limit(), START);
    }

    #[test]
    fn admission_stops_at_the_limit_and_a_place_comes_back_when_a_call_ends() {
        let a = Arc::new(Adaptive::new(3, Duration::from_millis(10), None));
        let held: Vec<_> = (0..3).map(|_| a.try_admit().unwrap()).collect();
        assert!(a.try_admit().is_none());
        drop(held);
        assert!(a.try_admit().is_some());
    }
}
