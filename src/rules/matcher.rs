//! Finding the rule for a descriptor, as envoyproxy/ratelimit does: level by level, the exact
//! `key=value` entry first, then wildcard values (first in load order), then the key alone; a rule
//! applies only at the depth of the descriptor's last entry.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

use super::{Rule, RuleSet};

/// One level of the descriptor tree.
#[derive(Default)]
pub(super) struct Level {
    /// key -> value -> node (two maps, so a lookup needs no `key_value` string).
    pub exact: HashMap<String, HashMap<String, Node>>,
    /// (key, pattern, share_threshold, node), in load order.
    pub wildcards: Vec<(String, Wildcard, bool, Node)>,
    pub key_only: HashMap<String, Node>,
}

pub(super) struct Node {
    pub rule: Option<Arc<Rule>>,
    pub children: Level,
}

/// A value pattern where each `*` matches any run of characters, possibly empty.
pub(super) struct Wildcard {
    text: String,
    parts: Vec<String>,
}

impl Wildcard {
    pub fn new(pattern: &str) -> Self {
        Self {
            text: pattern.to_string(),
            parts: pattern.split('*').map(str::to_string).collect(),
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(p) => p,
            None => return value.is_empty(),
        };
        let Some(mut remaining) = value.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty();
        };
        for part in middle {
            match remaining.find(part.as_str()) {
                Some(i) => remaining = &remaining[i + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_str())
    }
}

/// The rule for a descriptor and the key of its bucket.
#[derive(Debug)]
pub struct Match {
    pub rule: Arc<Rule>,
    /// The backend key: the prefix, then the domain and every entry, length-prefixed so that no two
    /// different descriptors can share a key. With `share_threshold`, the wildcard pattern stands
    /// in for the value, so every matching value shares one bucket.
    pub key: String,
}

impl RuleSet {
    /// The rule applying to `entries` (key, value pairs) in `domain`, if any.
    pub fn lookup<'e, I>(&self, prefix: &str, domain: &str, entries: I) -> Option<Match>
    where
        I: ExactSizeIterator<Item = (&'e str, &'e str)> + Clone,
    {
        let mut level = self.domains.get(domain)?;
        let last = entries.len().checked_sub(1)?;
        // The pattern standing in for the value of each entry that matched a shared wildcard
        // (allocated only when one did).
        let mut shared: Option<Vec<(usize, &str)>> = None;
        let mut found = None;
        for (i, (key, value)) in entries.clone().enumerate() {
            let node = level
                .exact
                .get(key)
                .and_then(|values| values.get(value))
                .or_else(|| {
                    let (_, pattern, share, node) = level
                        .wildcards
                        .iter()
                        .find(|(k, pattern, _, _)| k == key && pattern.matches(value))?;
                    if *share {
                        shared
                            .get_or_insert_with(Vec::new)
                            .push((i, pattern.text.as_str()));
                    }
                    Some(node)
                })
                .or_else(|| level.key_only.get(key));
            let Some(node) = node else { break };
            if i == last {
                found = node.rule.clone();
                break;
            }
            level = &node.children;
        }
        let rule = found?;
        let key = build_key(prefix, domain, entries, |i| {
            shared
                .as_ref()
                .and_then(|s| s.iter().find(|(at, _)| *at == i).map(|(_, p)| *p))
        });
        Some(Match { rule, key })
    }
}

/// The bucket key of a descriptor with no rule of its own (a `limit` override): the same encoding
/// as a matched rule's bucket.
pub fn descriptor_key<'e>(
    prefix: &str,
    domain: &str,
    entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
) -> String {
    build_key(prefix, domain, entries, |_| None)
}

/// `prefix`, then the domain and each entry as `len:text`, so that no two different descriptors can
/// share a key. `pattern(i)` gives the wildcard that stands in for entry `i`'s value in a shared
/// bucket; it is marked with `*` before its length, which no ordinary part has.
fn build_key<'e, 'p>(
    prefix: &str,
    domain: &str,
    entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
    pattern: impl Fn(usize) -> Option<&'p str>,
) -> String {
    let mut key = String::with_capacity(prefix.len() + domain.len() + 24 * entries.len() + 8);
    key.push_str(prefix);
    push_part(&mut key, domain);
    for (i, (k, v)) in entries.enumerate() {
        push_part(&mut key, k);
        match pattern(i) {
            Some(p) => {
                key.push('*');
                push_part(&mut key, p);
            }
            None => push_part(&mut key, v),
        }
    }
    key
}

fn push_part(key: &mut String, part: &str) {
    let _ = write!(key, "{}:", part.len());
    key.push_str(part);
}

#[cfg(test)]
mod tests {
    use super::Wildcard;

    #[test]
    fn wildcards_anywhere() {
        let cases = [
            ("premium-*", "premium-gold", true),
            ("premium-*", "premium-", true),
            ("premium-*", "basic-gold", false),
            ("*-premium", "gold-premium", true),
            ("*-premium", "gold-premium-x", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-c", true),
            ("a*b*c", "a-c-b", false),
            ("*", "", true),
            ("*", "anything", true),
            ("a**b", "ab", true),
            ("ab*ba", "aba", false),
            ("ab*ba", "abba", true),
        ];
        for (pattern, value, want) in cases {
            assert_eq!(
                Wildcard::new(pattern).matches(value),
                want,
                "{pattern} ~ {value}"
            );
        }
    }
}
