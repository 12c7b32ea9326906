//! What an answer carries beside its statuses, when asked for (the README's "Request semantics"): the `RateLimit-*` headers
//! of the most restrictive descriptor (LIMIT_RESPONSE_HEADERS_ENABLED), and, for the descriptors
//! over their limit, their domain, rule and entries in `dynamic_metadata`
//! (RESPONSE_DYNAMIC_METADATA), which Envoy's access log can print.

use std::collections::BTreeMap;

use prost_types::{ListValue, Struct, Value, value::Kind};

use super::plan::Plan;
use sluicegate_proto::envoy::config::core::v3::HeaderValue;
use sluicegate_proto::envoy::service::ratelimit::v3::RateLimitRequest;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit, rate_limit,
};

/// The names of the three headers (LIMIT_LIMIT_HEADER, LIMIT_REMAINING_HEADER, LIMIT_RESET_HEADER).
#[derive(Clone, Debug)]
pub struct HeaderNames {
    pub limit: String,
    pub remaining: String,
    pub reset: String,
}

impl Default for HeaderNames {
    fn default() -> Self {
        Self {
            limit: "RateLimit-Limit".into(),
            remaining: "RateLimit-Remaining".into(),
            reset: "RateLimit-Reset".into(),
        }
    }
}

/// The headers of the most restrictive descriptor: the first one over its limit, else the one
/// with the fewest tokens left; none when no descriptor has a limit (envoyproxy/ratelimit's
/// choice). The reset is in whole seconds, rounded up.
pub(super) fn headers(statuses: &[DescriptorStatus], names: &HeaderNames) -> Vec<HeaderValue> {
    // Descriptors a bucket decided (not unlimited ones, not FAILURE_MODE's answers, which carry
    // no figures).
    let limited = statuses.iter().filter(|s| {
        s.current_limit.is_some()
            && s.limit_remaining != u32::MAX
            && s.duration_until_reset.is_some()
    });
    let chosen = limited
        .clone()
        .find(|s| s.code == Code::OverLimit as i32)
        .or_else(|| limited.min_by_key(|s| s.limit_remaining));
    let Some(status) = chosen else {
        return Vec::new();
    };
    let limit = status
        .current_limit
        .as_ref()
        .map_or(0, |l| l.requests_per_unit);
    let reset = status
        .duration_until_reset
        .as_ref()
        .map_or(0, |d| d.seconds.max(0) as u64 + u64::from(d.nanos > 0));
    let header = |key: &str, value: String| HeaderValue {
        key: key.to_string(),
        value,
        raw_value: Vec::new(),
    };
    vec![
        header(&names.limit, limit.to_string()),
        header(&names.remaining, status.limit_remaining.to_string()),
        header(&names.reset, reset.to_string()),
    ]
}

/// For the descriptors over their limit (shadow ones too, marked): `domain`, `rule` (the first
/// enforced rule that fired, the one to name in an access log), `rules` (all of them,
/// comma-separated), and `descriptors`, each with its `entries` (`k=v`), `rule`, `limit` and
/// `shadow`. None when no descriptor is over.
pub(super) fn metadata(
    req: &RateLimitRequest,
    plan: &Plan,
    statuses: &[DescriptorStatus],
    over: &[bool],
) -> Option<Struct> {
    let mut fired = Vec::new();
    let mut enforced = Vec::new();
    let descriptors = statuses.iter().zip(&plan.entries).zip(&req.descriptors);
    for (((status, entry), descriptor), &over) in descriptors.zip(over) {
        if !over {
            continue;
        }
        let shadow = entry.shadow();
        let rule = entry
            .rule()
            .map_or_else(|| "override".to_string(), |r| r.label.clone());
        if !shadow {
            enforced.push(rule.clone());
        }
        // Read by Envoy's access log, not ours: the values as text (bytes that are not UTF-8
        // replaced), each entry `k=v`.
        let pairs: Vec<String> = descriptor
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(&e.key),
                    String::from_utf8_lossy(&e.value)
                )
            })
            .collect();
        let mut d = BTreeMap::new();
        d.insert("descriptor".to_string(), string(pairs.join(", ")));
        d.insert(
            "entries".to_string(),
            list(pairs.into_iter().map(string).collect()),
        );
        d.insert("rule".to_string(), string(rule));
        d.insert("shadow".to_string(), boolean(shadow));
        if let Some(limit) = &status.current_limit {
            d.insert("limit".to_string(), string(describe(limit)));
        }
        fired.push(Value {
            kind: Some(Kind::StructValue(Struct { fields: d })),
        });
    }
    if fired.is_empty() {
        return None;
    }
    let mut fields = BTreeMap::new();
    fields.insert("domain".to_string(), string(req.domain.clone()));
    if let Some(first) = enforced.first() {
        fields.insert("rule".to_string(), string(first.clone()));
        fields.insert("rules".to_string(), string(enforced.join(",")));
    }
    fields.insert("descriptors".to_string(), list(fired));
    Some(Struct { fields })
}

/// `10/minute`, as a person would write the limit.
fn describe(limit: &RateLimit) -> String {
    let unit = match rate_limit::Unit::try_from(limit.unit) {
        Ok(rate_limit::Unit::Second) => "second",
        Ok(rate_limit::Unit::Minute) => "minute",
        Ok(rate_limit::Unit::Hour) => "hour",
        Ok(rate_limit::Unit::Day) => "day",
        Ok(rate_limit::Unit::Week) => "week",
        Ok(rate_limit::Unit::Month) => "month",
        Ok(rate_limit::Unit::Year) => "year",
        _ => "unknown",
    };
    format!("{}/{unit}", limit.requests_per_unit)
}

fn string(s: String) -> Value {
    Value {
        kind: Some(Kind::StringValue(s)),
    }
}

fn boolean(b: bool) -> Value {
    Value {
        kind: Some(Kind::BoolValue(b)),
    }
}

fn list(values: Vec<Value>) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue { values })),
    }
}
