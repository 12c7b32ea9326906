//! Rules for the Envoy API: envoyproxy/ratelimit's YAML format (plus `burst` and
//! `unit_multiplier`), parsed strictly, matched as the reference service matches, and reloaded
//! when the file or directory changes.
//!
//! - `parse.rs`: YAML to a validated [`RuleSet`]; errors name the file and line.
//! - `matcher.rs`: descriptor entries (or an RLQS BucketId's pairs) to the rule that applies, and
//!   the bucket key.
//! - `watch.rs`: watches the path and swaps in a new set when a valid change lands.

mod matcher;
mod parse;
mod watch;

use std::{fmt, sync::Arc};

pub use matcher::{MAX_BUCKET_PAIRS, Match, descriptor_key};
pub use parse::{RulesError, load_path, parse_text};
pub use watch::{ReloadObserver, RulesHandle, spawn_watcher};

use crate::Shape;

/// The last entry of a descriptor that acquires a lease of a `concurrency` rule; its value is the
/// lease's id (Envoy's `x-request-id`).
pub const ACQUIRE_ENTRY: &str = "acquire";
/// The last entry of the stream-done descriptor that releases it (same id).
pub const RELEASE_ENTRY: &str = "release";

/// A time unit of envoyproxy/ratelimit's format (case-insensitive in YAML).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    /// Seconds in one unit, as envoyproxy/ratelimit counts them (a month is 30 days, a year 365).
    pub fn seconds(self) -> f64 {
        match self {
            Unit::Second => 1.0,
            Unit::Minute => 60.0,
            Unit::Hour => 3_600.0,
            Unit::Day => 86_400.0,
            Unit::Week => 604_800.0,
            Unit::Month => 2_592_000.0,
            Unit::Year => 31_536_000.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    pub fn parse(s: &str) -> Option<Unit> {
        Some(match s.to_ascii_lowercase().as_str() {
            "second" => Unit::Second,
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            "year" => Unit::Year,
            _ => return None,
        })
    }
}

/// What a rule does to a matching descriptor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Limit {
    /// Never limited, never counted in the backend.
    Unlimited,
    /// `requests_per_unit: 0`: every request is over the limit (as in envoyproxy/ratelimit).
    Blocked { unit: Unit },
    /// A token bucket.
    Bucket {
        shape: Shape,
        requests_per_unit: u32,
        unit: Unit,
        unit_multiplier: u32,
    },
    /// `concurrency: { max, lease }` (sluicegate's addition): at most `max` requests in flight,
    /// each lease freed by its release or after `lease_ms`.
    InFlight { max: u32, lease_ms: u32 },
}

impl Limit {
    /// The bucket of `requests_per_unit` per `unit_multiplier` units, `burst` tokens deep (default:
    /// `requests_per_unit`).
    pub fn bucket(
        requests_per_unit: u32,
        unit: Unit,
        unit_multiplier: u32,
        burst: Option<f64>,
    ) -> Result<Limit, String> {
        if requests_per_unit == 0 {
            return Ok(Limit::Blocked { unit });
        }
        let rate = f64::from(requests_per_unit) / (unit.seconds() * f64::from(unit_multiplier));
        let capacity = burst.unwrap_or(f64::from(requests_per_unit));
        // A bucket smaller than one token would deny every request silently.
        if capacity < 1.0 {
            return Err(format!("burst must be at least 1, got {capacity}"));
        }
        let shape = Shape::new(capacity, rate).map_err(|e| {
            if e.field == "capacity" {
                format!("burst {}", e.reason)
            } else {
                e.to_string()
            }
        })?;
        Ok(Limit::Bucket {
            shape,
            requests_per_unit,
            unit,
            unit_multiplier,
        })
    }
}

/// One rule of a rules file, as loaded.
pub struct Rule {
    /// Its place in [`RuleSet::rules`] (callers keep per-rule state in a vector by this index).
    pub id: usize,
    pub domain: String,
    /// The `rule` label of the per-rule metrics: the rule's `name`, else its descriptor path
    /// (`key` or `key=value`, nested ones joined by `.`). Bounded by the rules file, never by traffic.
    pub label: String,
    pub name: Option<String>,
    pub replaces: Vec<String>,
    pub limit: Limit,
    pub shadow_mode: bool,
    /// Charges always land, down to -capacity (sluicegate's `debt: true`).
    pub debt: bool,
    /// The descriptor's key path (`key` or `key=value`, nested ones joined by `.`).
    pub path: String,
    /// `file:line`, for `check-rules` and logs.
    pub source: String,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("domain", &self.domain)
            .field("label", &self.label)
            .field("limit", &self.limit)
            .field("shadow_mode", &self.shadow_mode)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Rule {
    /// One line for `check-rules`: where, what, and the bucket it makes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  domain={}  descriptor={}  ",
            self.source, self.domain, self.path
        )?;
        if let Some(name) = &self.name {
            write!(f, "name={name}  ")?;
        }
        match self.limit {
            Limit::Unlimited => write!(f, "unlimited")?,
            Limit::InFlight { max, lease_ms } => write!(
                f,
                "at most {max} in flight  lease: {}",
                crate::rules::parse::show_ms(lease_ms)
            )?,
            Limit::Blocked { unit } => write!(f, "0/{} (always over limit)", unit.as_str())?,
            Limit::Bucket {
                shape,
                requests_per_unit,
                unit,
                unit_multiplier,
            } => {
                let per = if unit_multiplier == 1 {
                    unit.as_str().to_string()
                } else {
                    format!("{unit_multiplier} {}s", unit.as_str())
                };
                write!(
                    f,
                    "{requests_per_unit}/{per}  bucket: capacity={} rate={}/s",
                    shape.capacity(),
                    significant(shape.rate())
                )?;
            }
        }
        if self.shadow_mode {
            write!(f, "  shadow_mode")?;
        }
        if self.debt {
            write!(f, "  debt")?;
        }
        if !self.replaces.is_empty() {
            write!(f, "  replaces={}", self.replaces.join(","))?;
        }
        Ok(())
    }
}

/// `v` with six significant digits, trailing zeros dropped: a rate of 1 per year is
/// 0.0000000317098/s, not 0.
fn significant(v: f64) -> String {
    let magnitude = v.abs().log10().floor();
    let decimals = if magnitude.is_finite() {
        (5.0 - magnitude).clamp(0.0, 20.0) as usize
    } else {
        0
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Every loaded rule, by domain.
#[derive(Default)]
pub struct RuleSet {
    domains: std::collections::HashMap<String, matcher::Level>,
    rules: Vec<Arc<Rule>>,
    /// Domains whose file says `descriptors: []`: emptied on purpose.
    emptied: std::collections::HashSet<String>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl RuleSet {
    /// Every rule, in load order (files sorted by name).
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.rules
    }

    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    /// The domains that have rules in `self` and none in `next`, where `next` does not say so
    /// on purpose (`descriptors: []`): a reload to `next` would silently lift all their limits.
    pub fn domains_emptied_by(&self, next: &RuleSet) -> Vec<String> {
        let mut lost: Vec<String> = self
            .rules
            .iter()
            .map(|r| r.domain.as_str())
            .filter(|d| !next.rules.iter().any(|r| r.domain == *d) && !next.emptied.contains(*d))
            .map(str::to_string)
            .collect();
        lost.sort();
        lost.dedup();
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::significant;

    #[test]
    fn rates_keep_six_significant_digits() {
        assert_eq!(significant(20.0), "20");
        assert_eq!(significant(1.0 / 3.0), "0.333333");
        assert_eq!(significant(1.0 / 31_536_000.0), "0.0000000317098");
        assert_eq!(significant(1234567.0), "1234567");
        assert_eq!(significant(0.5), "0.5");
    }
}
