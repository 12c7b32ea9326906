//! In-flight limits from the client: Acquire a slot before the work, Renew it while a long piece
//! of work runs, Release it after.

use std::time::Duration;

use sluicegate_proto::sluicegate::v1::{
    AcquireRequest, AcquireResponse, ReleaseRequest, RenewRequest,
};

use crate::{Client, Error, FailureMode};

/// A slot of an in-flight limit, or the refusal of one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The slot is held: do the work, then [`Client::release`] it.
    pub granted: bool,
    /// The lease's id; `None` when refused, or granted by the failure mode (no slot behind it).
    pub id: Option<String>,
    /// Leases held on the key after the call (0 when the failure mode answered).
    pub in_flight: u32,
    /// When refused: when the earliest lease expires, at the latest (a release may come sooner).
    pub retry_after: Duration,
    /// The failure mode answered (this client's, or sluicegate's because its backend failed).
    pub degraded: bool,
    /// The key it was acquired for.
    pub key: String,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

impl Client {
    /// Takes one of `max_in_flight` slots of `key` for at most `ttl` (at most a day): released by
    /// [`Client::release`], or by the TTL if this process never gets to it (a crash). When
    /// sluicegate cannot answer, the failure mode decides (a granted lease then has no id).
    pub async fn acquire(
        &self,
        key: &str,
        max_in_flight: u32,
        ttl: Duration,
    ) -> Result<Lease, Error> {
        let proto = AcquireRequest {
            key: key.to_string(),
            max_in_flight,
            lease_ttl_ms: millis(ttl),
        };
        let answer = self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.acquire(r).await
            })
            .await;
        match answer {
            Ok(r) => Ok(lease(key, r)),
            Err(e @ Error::Unavailable(_)) => {
                let granted = match self.failure_mode() {
                    FailureMode::Error => return Err(e),
                    FailureMode::Allow => true,
                    FailureMode::Deny => false,
                };
                Ok(Lease {
                    granted,
                    id: None,
                    in_flight: 0,
                    retry_after: if granted {
                        Duration::ZERO
                    } else {
                        crate::FALLBACK_RETRY_AFTER
                    },
                    degraded: true,
                    key: key.to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Extends a held lease to `ttl` from now; `false` when it is no longer held (it expired,
    /// or was released). A lease without an id has nothing to renew: `true` (it never expires).
    pub async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, Error> {
        let Some(id) = &lease.id else {
            return Ok(lease.granted);
        };
        let proto = RenewRequest {
            key: lease.key.clone(),
            lease_id: id.clone(),
            lease_ttl_ms: millis(ttl),
        };
        let r = self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.renew(r).await
            })
            .await?;
        Ok(r.granted)
    }

    /// Frees the lease's slot; `false` when it was not held any more (expired, released before).
    /// Idempotent. A lease without an id holds no slot: `false`, and no call is made.
    pub async fn release(&self, lease: &Lease) -> Result<bool, Error> {
        let Some(id) = &lease.id else {
            return Ok(false);
        };
        let proto = ReleaseRequest {
            key: lease.key.clone(),
            lease_id: id.clone(),
        };
        let r = self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.release(r).await
            })
            .await?;
        Ok(r.released)
    }
}

fn lease(key: &str, r: AcquireResponse) -> Lease {
    Lease {
        granted: r.granted,
        id: Some(r.lease_id).filter(|id| r.granted && !id.is_empty()),
        in_flight: r.in_flight,
        retry_after: Duration::from_millis(r.retry_after_ms),
        degraded: r.degraded,
        key: key.to_string(),
    }
}
