//! A circuit breaker per Redis node, judged on the node's Redis calls: one outcome per script call
//! or ping, never one per caller (a call carries many callers' decisions; counting those would let
//! one slow call open the circuit for everybody).
//!
//! Closed: calls go through. It opens when failures are spread over time, never on one moment:
//! - a streak of failed calls with no success between them, at least [`STREAK`] of them, the
//!   first at least REDIS_TIMEOUT_MS before the last (a node that stopped answering: every call
//!   times out, round after round);
//! - or, over the last [`window`], at least [`MIN_FAILURES`] failed calls, more than succeeded,
//!   spread over at least a timeout (a node that mostly fails).
//!
//! A blip shorter than the timeout fails the calls in flight during it, all at about the same
//! moment, and nobody else. Open: calls fail at once for the cooldown (doubling while the node stays down, up
//! to `MAX_COOLDOWN`). Then one probe goes through (half-open): success closes the breaker,
//! failure opens it again. The node makes the probe a PING of its own in the background
//! (`node.rs`), so no caller's request waits on a node that may still hang: with every replica
//! probing at 250 ms and 750 ms into an outage, callers made to carry the probes were enough to
//! put a second's p99 at the full timeout.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

/// Failed calls needed, at least, in the window to open.
pub const MIN_FAILURES: usize = 5;
/// Failed calls in a row (spread over a timeout) that open it.
pub const STREAK: u32 = 3;
/// Outcomes kept: enough for the window at any rate that matters (more only adds successes).
const KEPT: usize = 64;
const FIRST_COOLDOWN: Duration = Duration::from_millis(250);
const MAX_COOLDOWN: Duration = Duration::from_secs(4);

/// The span judged: two call timeouts. Longer, the successes from before an outage would outvote
/// its failures for that long.
pub fn window(timeout: Duration) -> Duration {
    timeout * 2
}

#[derive(Debug)]
enum State {
    /// The recent outcomes: (when, ok); and the current streak of failures: (first, last, count).
    Closed {
        recent: VecDeque<(Instant, bool)>,
        streak: Option<(Instant, Instant, u32)>,
    },
    Open {
        until: Instant,
        cooldown: Duration,
    },
    /// A probe is out; everyone else still fails fast.
    Probing {
        cooldown: Duration,
    },
}

fn closed() -> State {
    State::Closed {
        recent: VecDeque::with_capacity(KEPT),
        streak: None,
    }
}

/// One node's breaker; cheap to consult on every call.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    /// Mirrors "not closed" for a lock-free fast path and for the gauge.
    open: AtomicBool,
    /// REDIS_TIMEOUT_MS: failures must be spread over at least this long.
    timeout: Duration,
    on_change: Option<metrics::Gauge>,
    /// Its transitions' log lines, rate-limited.
    pub log: TransitionLog,
}

/// At most one transition line per breaker every [`TransitionLog::EVERY`]; the transitions left
/// out are counted in the next line. A breaker flapping under overload would otherwise write
/// dozens of lines a second; the gauge (`sluicegate_backend_circuit_open`) always shows the state.
#[derive(Debug, Default)]
pub struct TransitionLog {
    last: Mutex<Option<Instant>>,
    left_out: AtomicU64,
}

impl TransitionLog {
    pub const EVERY: Duration = Duration::from_secs(10);

    /// Whether a line may be written now: the number of transitions left out since the last one.
    pub fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.left_out.swap(0, Ordering::Relaxed))
    }
}

/// What the breaker says about a call about to be made.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead.
    Call,
    /// Go ahead: this call is the probe that may close the breaker.
    Probe,
    /// Fail at once.
    Reject,
}

impl Breaker {
    /// A closed breaker; `gauge` (sluicegate_backend_circuit_open{node}) follows its state.
    pub fn new(timeout: Duration, gauge: Option<metrics::Gauge>) -> Self {
        if let Some(g) = &gauge {
            g.set(0.0);
        }
        Self {
            state: Mutex::new(closed()),
            open: AtomicBool::new(false),
            timeout,
            on_change: gauge,
            log: TransitionLog::default(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    fn set_open(&self, open: bool) {
        if self.open.swap(open, Ordering::Relaxed) != open
            && let Some(g) = &self.on_change
        {
            g.set(if open { 1.0 } else { 0.0 });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go now.
    pub fn permit(&self) -> Permit {
        if !self.is_open() {
            return Permit::Call;
        }
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => Permit::Call,
            State::Open { until, cooldown } if Instant::now() >= until => {
                *state = State::Probing { cooldown };
                Permit::Probe
            }
            State::Open { .. } | State::Probing { .. } => Permit::Reject,
        }
    }

    /// Records how one Redis call went (`ok: false` only for the node's fault: timeouts,
    /// connections); `probe` when it carried the probe. Any answer proves the node is back; a
    /// failure of a call sent before the breaker opened changes nothing. Returns true when this
    /// outcome opened or closed the breaker.
    pub fn record(&self, probe: bool, ok: bool) -> bool {
        let now = Instant::now();
        let mut state = self.lock();
        let was_open = !matches!(*state, State::Closed { .. });
        let next = match (&mut *state, ok) {
            (State::Closed { recent, streak }, _) => {
                if recent.len() == KEPT {
                    recent.pop_front();
                }
                recent.push_back((now, ok));
                *streak = match (*streak, ok) {
                    (_, true) => None,
                    // A failure long after the last one starts a streak of its own.
                    (Some((first, last, n)), false)
                        if now.duration_since(last) <= window(self.timeout) =>
                    {
                        Some((first, now, n + 1))
                    }
                    (_, false) => Some((now, now, 1)),
                };
                let streak_opens = streak.is_some_and(|(first, last, n)| {
                    n >= STREAK && last.duration_since(first) >= self.timeout
                });
                (!ok && (streak_opens || self.mostly_failed(recent, now))).then(|| State::Open {
                    until: now + FIRST_COOLDOWN,
                    cooldown: FIRST_COOLDOWN,
                })
            }
            (_, true) => Some(closed()),
            (State::Probing { cooldown }, false) if probe => {
                let cooldown = (*cooldown * 2).min(MAX_COOLDOWN);
                Some(State::Open {
                    until: now + cooldown,
                    cooldown,
                })
            }
            _ => None,
        };
        if let Some(next) = next {
            *state = next;
        }
        let open = !matches!(*state, State::Closed { .. });
        drop(state);
        self.set_open(open);
        open != was_open
    }

    /// Within the window: at least MIN_FAILURES failed calls, more failures than successes, and
    /// the first and last failure at least a call timeout apart.
    fn mostly_failed(&self, recent: &VecDeque<(Instant, bool)>, now: Instant) -> bool {
        let since = now.checked_sub(window(self.timeout));
        let in_window = recent
            .iter()
            .filter(|(at, _)| since.is_none_or(|s| *at >= s));
        let (mut failures, mut successes, mut first_failure) = (0, 0, None);
        for (at, ok) in in_window {
            if *ok {
                successes += 1;
            } else {
                failures += 1;
                first_failure.get_or_insert(*at);
            }
        }
        failures >= MIN_FAILURES
            && failures > successes
            && first_failure.is_some_and(|first| now.duration_since(first) >= self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(15);

    /// A node that is down: every call times out, round after round.
    async fn fail_rounds(b: &Breaker, rounds: usize, calls_per_round: usize) {
        for _ in 0..rounds {
            tokio::time::advance(TIMEOUT).await;
            for _ in 0..calls_per_round {
                b.record(false, false);
            }
        }
    }

    /// A breaker flapping 50 times a second for a minute writes 6 lines, each counting what it
    /// left out.
    #[tokio::test(start_paused = true)]
    async fn transition_lines_are_rate_limited_with_a_count() {
        let log = TransitionLog::default();
        let mut lines = Vec::new();
        for _ in 0..3000 {
            if let Some(left_out) = log.admit() {
                lines.push(left_out);
            }
            tokio::time::advance(Duration::from_millis(20)).await;
        }
        assert_eq!(lines.len(), 6, "{lines:?}");
        assert_eq!(lines[0], 0);
        assert!(lines[1..].iter().all(|&n| n == 499), "{lines:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_stays_down_opens_it_and_a_probe_closes_it() {
        let b = Breaker::new(TIMEOUT, None);
        fail_rounds(&b, 1, 2).await;
        assert!(!b.is_open(), "one round of calls failed at one moment");
        fail_rounds(&b, 1, 2).await;
        assert!(b.is_open(), "a second round, a timeout later");
        assert_eq!(b.permit(), Permit::Reject);
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Reject, "one probe at a time");
        assert!(!b.record(true, false), "a failed probe keeps it open");
        assert!(b.is_open());
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert_eq!(b.permit(), Permit::Reject, "the cooldown doubled");
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert_eq!(b.permit(), Permit::Probe);
        assert!(b.record(true, true));
        assert!(!b.is_open());
        assert_eq!(b.permit(), Permit::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blip_shorter_than_the_timeout_never_opens_it() {
        // Many calls in flight fail together (a pause of the server): one moment, not a trend.
        let b = Breaker::new(TIMEOUT, None);
        for _ in 0..KEPT {
            b.record(false, false);
        }
        assert!(!b.is_open(), "failures all at one moment");
        tokio::time::advance(TIMEOUT / 2).await;
        b.record(false, true);
        b.record(false, false);
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn successes_before_an_outage_do_not_outvote_it() {
        // A busy node: many good calls, then it stops answering. One call in flight (one
        // connection) fails per timeout.
        let b = Breaker::new(TIMEOUT, None);
        for _ in 0..KEPT {
            b.record(false, true);
        }
        fail_rounds(&b, 3, 1).await;
        assert!(b.is_open(), "three timeouts in a row, two timeouts apart");
    }

    #[tokio::test(start_paused = true)]
    async fn successes_among_the_failures_keep_it_closed() {
        let b = Breaker::new(TIMEOUT, None);
        for _ in 0..8 {
            tokio::time::advance(TIMEOUT).await;
            b.record(false, false);
            b.record(false, true);
            b.record(false, true);
        }
        assert!(!b.is_open(), "a third of the calls failed: not most");
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let b = Breaker::new(TIMEOUT, None);
        fail_rounds(&b, 1, 4).await;
        tokio::time::advance(window(TIMEOUT) * 2).await;
        b.record(false, false);
        assert!(!b.is_open(), "four old failures and one new one");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_from_a_call_sent_earlier_closes_it() {
        let b = Breaker::new(TIMEOUT, None);
        fail_rounds(&b, 3, 2).await;
        assert!(b.is_open());
        assert!(!b.record(false, false), "a late failure changes nothing");
        assert!(b.record(false, true), "any answer proves the node is back");
        assert!(!b.is_open());
    }
}
