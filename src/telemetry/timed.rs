//! A backend wrapper that records the duration and the failures of every backend call.

use std::time::Instant;

use metrics::{Counter, Histogram};

use super::names;
use sluicegate_core::Decision;
use sluicegate_core::backend::{Backend, BackendError, BucketRequest, ErrorKind};

/// Wraps a backend; the metrics handles are registered once, at construction.
pub struct Timed<B> {
    inner: B,
    duration: Histogram,
    errors: [Counter; 4],
}

impl<B: Backend> Timed<B> {
    pub fn new(inner: B) -> Self {
        let backend = inner.name();
        let err = |kind: ErrorKind| metrics::counter!(names::BACKEND_ERRORS, "backend" => backend, "kind" => kind.as_str());
        Self {
            duration: metrics::histogram!(names::BACKEND_DURATION, "backend" => backend),
            errors: [
                err(ErrorKind::Timeout),
                err(ErrorKind::Connection),
                err(ErrorKind::Script),
                err(ErrorKind::Other),
            ],
            inner,
        }
    }

    fn count_error(&self, e: &BackendError) {
        let i = match e.kind {
            ErrorKind::Timeout => 0,
            ErrorKind::Connection | ErrorKind::Moved => 1,
            ErrorKind::Script => 2,
            ErrorKind::Other => 3,
            // No call was made: the breaker's gauge (or the shed counter) tells, not the error
            // counter.
            ErrorKind::CircuitOpen | ErrorKind::Shed => return,
        };
        self.errors[i].increment(1);
    }
}

impl<B: Backend> Backend for Timed<B> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        let started = Instant::now();
        let result = self.inner.decide(req).await;
        // Answered here (the deny cache, a lease): no backend call to time.
        if !matches!(&result, Ok(d) if d.without_backend) {
            self.duration.record(started.elapsed().as_secs_f64());
        }
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        let started = Instant::now();
        let results = self.inner.decide_group(reqs, all_or_nothing).await;
        if !results
            .iter()
            .all(|r| matches!(r, Ok(d) if d.without_backend))
        {
            self.duration.record(started.elapsed().as_secs_f64());
        }
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .for_each(|e| self.count_error(e));
        results
    }

    async fn settle(
        &self,
        req: sluicegate_core::backend::SettleRequest<'_>,
    ) -> Result<sluicegate_core::backend::Settled, BackendError> {
        let started = Instant::now();
        let result = self.inner.settle(req).await;
        self.duration.record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    async fn lease(
        &self,
        req: sluicegate_core::backend::LeaseRequest<'_>,
    ) -> Result<sluicegate_core::InFlight, BackendError> {
        let started = Instant::now();
        let result = self.inner.lease(req).await;
        self.duration.record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.inner.ping().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    fn leases(&self) -> Option<sluicegate_core::backend::redis::LeaseStats> {
        self.inner.leases()
    }

    /// Timed and counted like every backend call: one per replica and RLQS interval.
    async fn exchange_demand(
        &self,
        replica: &str,
        ttl_ms: u64,
        shares: &[sluicegate_core::backend::DemandShare<'_>],
    ) -> Result<Vec<sluicegate_core::quota::Fleet>, BackendError> {
        let started = Instant::now();
        let result = self.inner.exchange_demand(replica, ttl_ms, shares).await;
        self.duration.record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }
}
