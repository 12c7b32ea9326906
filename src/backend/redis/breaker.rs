//! A circuit breaker per Redis node: after consecutive failures, calls for the node fail at once
//! (FAILURE_MODE answers them without waiting out REDIS_TIMEOUT_MS each) until a probe succeeds.
//!
//! Closed: calls go through; `FAILURES_TO_OPEN` failures in a row open it. Open: calls fail at
//! once for the cooldown (doubling while the node stays down, up to `MAX_COOLDOWN`). Then one
//! call goes through as a probe (half-open): success closes the breaker, failure opens it again.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

const FAILURES_TO_OPEN: u32 = 5;
const FIRST_COOLDOWN: Duration = Duration::from_millis(250);
const MAX_COOLDOWN: Duration = Duration::from_secs(4);

#[derive(Debug)]
enum State {
    Closed {
        failures: u32,
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

/// One node's breaker; cheap to consult on every call.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    /// Mirrors "not closed" for a lock-free fast path and for the gauge.
    open: AtomicBool,
    on_change: Option<metrics::Gauge>,
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
    /// A closed breaker; `gauge` (tollgate_backend_circuit_open{node}) follows its state.
    pub fn new(gauge: Option<metrics::Gauge>) -> Self {
        if let Some(g) = &gauge {
            g.set(0.0);
        }
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            open: AtomicBool::new(false),
            on_change: gauge,
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

    /// Records how a call went (`ok: false` only for the node's fault: timeouts, connections).
    /// Any answer proves the node is back; a failure of a call sent before the breaker opened
    /// changes nothing. Returns true when this outcome opened or closed the breaker.
    pub fn record(&self, permit: &Permit, ok: bool) -> bool {
        let mut state = self.lock();
        let was_open = !matches!(*state, State::Closed { .. });
        let next = match (&*state, ok) {
            (_, true) => Some(State::Closed { failures: 0 }),
            (State::Closed { failures }, false) if failures + 1 < FAILURES_TO_OPEN => {
                Some(State::Closed {
                    failures: failures + 1,
                })
            }
            (State::Closed { .. }, false) => Some(State::Open {
                until: Instant::now() + FIRST_COOLDOWN,
                cooldown: FIRST_COOLDOWN,
            }),
            (State::Probing { cooldown }, false) if *permit == Permit::Probe => {
                let cooldown = (*cooldown * 2).min(MAX_COOLDOWN);
                Some(State::Open {
                    until: Instant::now() + cooldown,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_a_probe() {
        let b = Breaker::new(None);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert_eq!(b.permit(), Permit::Call);
            b.record(&Permit::Call, false);
        }
        assert!(!b.is_open(), "one short of the threshold");
        b.record(&Permit::Call, true);
        for _ in 0..FAILURES_TO_OPEN {
            b.record(&Permit::Call, false);
        }
        assert!(b.is_open());
        assert_eq!(b.permit(), Permit::Reject);
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert_eq!(b.permit(), Permit::Probe);
        assert_eq!(b.permit(), Permit::Reject, "one probe at a time");
        assert!(
            !b.record(&Permit::Probe, false),
            "a failed probe keeps it open"
        );
        assert!(b.is_open());
        assert_eq!(b.permit(), Permit::Reject);
        tokio::time::advance(FIRST_COOLDOWN).await;
        assert_eq!(b.permit(), Permit::Reject, "the cooldown doubled");
        tokio::time::advance(FIRST_COOLDOWN).await;
        let probe = b.permit();
        assert_eq!(probe, Permit::Probe);
        assert!(b.record(&probe, true));
        assert!(!b.is_open());
        assert_eq!(b.permit(), Permit::Call);
    }
}
