//! What an Envoy is told for one quota bucket, as the protos of Envoy 1.40 say it.

use std::time::Duration;

use sluicegate_core::quota::TokenBucket;
use sluicegate_proto::envoy::service::rate_limit_quota::v3::{
    BucketId,
    rate_limit_quota_response::{
        BucketAction,
        bucket_action::{self, AbandonAction, QuotaAssignmentAction},
    },
};
use sluicegate_proto::envoy::r#type::v3::{
    RateLimitStrategy, TokenBucket as TokenBucketProto, rate_limit_strategy,
};

/// An assignment for one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// ALLOW_ALL: no rule, `unlimited`, or `shadow_mode`.
    AllowAll,
    /// DENY_ALL: 0 requests per unit.
    DenyAll,
    /// This Envoy's share of the rule's bucket.
    Bucket(TokenBucket),
}

impl Assignment {
    /// Whether `next` may be left unsent because the Envoy already has `self` (Envoy rebuilds a
    /// full token bucket whenever the one it is sent differs).
    pub fn keeps(&self, next: &Assignment) -> bool {
        match (self, next) {
            (Assignment::Bucket(old), Assignment::Bucket(new)) => old.keeps(new),
            (old, new) => old == new,
        }
    }

    /// Which assignment kind this is, for logs and the status page.
    pub fn kind(&self) -> &'static str {
        match self {
            Assignment::AllowAll => "allow_all",
            Assignment::DenyAll => "deny_all",
            Assignment::Bucket(_) => "token_bucket",
        }
    }
}

/// The action assigning `a` to `id` for `ttl`.
pub fn assign(id: &BucketId, a: Assignment, ttl: Duration) -> BucketAction {
    let strategy = match a {
        Assignment::AllowAll => rate_limit_strategy::Strategy::BlanketRule(
            rate_limit_strategy::BlanketRule::AllowAll as i32,
        ),
        Assignment::DenyAll => rate_limit_strategy::Strategy::BlanketRule(
            rate_limit_strategy::BlanketRule::DenyAll as i32,
        ),
        Assignment::Bucket(b) => rate_limit_strategy::Strategy::TokenBucket(TokenBucketProto {
            max_tokens: b.max_tokens,
            tokens_per_fill: Some(b.tokens_per_fill),
            fill_interval: Some(fill_interval(b.fill_secs)),
        }),
    };
    BucketAction {
        bucket_id: Some(id.clone()),
        bucket_action: Some(bucket_action::BucketAction::QuotaAssignmentAction(
            QuotaAssignmentAction {
                assignment_time_to_live: Some(duration(ttl)),
                rate_limit_strategy: Some(RateLimitStrategy {
                    strategy: Some(strategy),
                }),
            },
        )),
    }
}

/// The action telling Envoy to forget `id` (an idle bucket: its next request starts it again).
pub fn abandon(id: &BucketId) -> BucketAction {
    BucketAction {
        bucket_id: Some(id.clone()),
        bucket_action: Some(bucket_action::BucketAction::AbandonAction(AbandonAction {})),
    }
}

/// `secs` whole seconds, plus as many nanoseconds. Envoy 1.40 computes the fill rate from the whole
/// seconds only, but decides whether an assignment changed its bucket by comparing the
/// nanoseconds only (`protoTokenBucketsEq`): a bucket whose interval changed and whose token
/// counts did not would keep its old rate. The nanoseconds make every interval distinct (at most
/// 32 ms for a year's interval, below the whole second Envoy reads, so the rate does not move).
fn fill_interval(secs: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: i32::try_from(secs % 1_000_000_000).unwrap_or(0),
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_that_differ_differ_in_nanoseconds() {
        let minute = fill_interval(60);
        let hour = fill_interval(3_600);
        assert_eq!(minute.seconds, 60);
        assert_ne!(minute.nanos, hour.nanos);
        assert!(fill_interval(31_536_000).nanos < 1_000_000_000);
    }

    #[test]
    fn a_share_becomes_a_token_bucket_with_a_ttl() {
        let id = BucketId::default();
        let b = TokenBucket {
            max_tokens: 75,
            tokens_per_fill: 4_500,
            fill_secs: 60,
        };
        let action = assign(&id, Assignment::Bucket(b), Duration::from_secs(15));
        let Some(bucket_action::BucketAction::QuotaAssignmentAction(q)) = action.bucket_action
        else {
            panic!("not an assignment");
        };
        assert_eq!(q.assignment_time_to_live.unwrap().seconds, 15);
        let Some(rate_limit_strategy::Strategy::TokenBucket(t)) =
            q.rate_limit_strategy.unwrap().strategy
        else {
            panic!("not a token bucket");
        };
        assert_eq!(t.max_tokens, 75);
        assert_eq!(t.tokens_per_fill, Some(4_500));
        assert_eq!(t.fill_interval.unwrap().seconds, 60);
    }
}
