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

/// A value pattern where each `*` matches any run of bytes, possibly empty. Values are bytes: Envoy
/// relays header values without checking UTF-8, and a pattern's literal parts must still match.
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

    pub fn matches(&self, value: &[u8]) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(p) => p,
            None => return value.is_empty(),
        };
        let Some(mut remaining) = value.strip_prefix(first.as_bytes()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return remaining.is_empty();
        };
        for part in middle {
            let part = part.as_bytes();
            match find(remaining, part) {
                Some(i) => remaining = &remaining[i + part.len()..],
                None => return false,
            }
        }
        remaining.len() >= last.len() && remaining.ends_with(last.as_bytes())
    }
}

/// The first place `needle` occurs in `haystack` (patterns are short: a plain scan is enough).
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
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
    /// The rule applying to `entries` (key, value pairs, as text or raw bytes) in `domain`, if any.
    pub fn lookup<I, K, V>(&self, prefix: &str, domain: &str, entries: I) -> Option<Match>
    where
        I: ExactSizeIterator<Item = (K, V)> + Clone,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut level = self.domains.get(domain)?;
        let last = entries.len().checked_sub(1)?;
        // The pattern standing in for the value of each entry that matched a shared wildcard
        // (allocated only when one did).
        let mut shared: Option<Vec<(usize, &str)>> = None;
        let mut found = None;
        for (i, (key, value)) in entries.clone().enumerate() {
            let (key, value) = (key.as_ref(), value.as_ref());
            // Rule keys and values are text: bytes that are not UTF-8 can match only a wildcard.
            let key_text = std::str::from_utf8(key).ok();
            let node = key_text
                .zip(std::str::from_utf8(value).ok())
                .and_then(|(k, v)| level.exact.get(k)?.get(v))
                .or_else(|| {
                    let (_, pattern, share, node) = level
                        .wildcards
                        .iter()
                        .find(|(k, pattern, _, _)| k.as_bytes() == key && pattern.matches(value))?;
                    if *share {
                        shared
                            .get_or_insert_with(Vec::new)
                            .push((i, pattern.text.as_str()));
                    }
                    Some(node)
                })
                .or_else(|| level.key_only.get(key_text?));
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

/// The most pairs a BucketId may have to be matched: Envoy builds them from its configuration, a
/// handful each; the walk below is quadratic in them.
pub const MAX_BUCKET_PAIRS: usize = 32;

impl RuleSet {
    /// The rule applying to an RLQS BucketId in `domain`: its pairs have no order, so at each level
    /// of the rule tree the rule's key is looked up among the pairs not yet consumed (an exact
    /// `key=value` first, then a wildcard value in load order, then the key alone, as for
    /// descriptors; pairs in key order, so the walk never depends on the order Envoy sent them). The
    /// rule of the node reached when every pair is consumed applies; none otherwise. The bucket key
    /// lists the pairs in the order the walk consumed them.
    pub fn lookup_bucket<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &self,
        prefix: &str,
        domain: &str,
        pairs: &[(K, V)],
    ) -> Option<Match> {
        if pairs.is_empty() || pairs.len() > MAX_BUCKET_PAIRS {
            return None;
        }
        let mut level = self.domains.get(domain)?;
        let mut left: Vec<usize> = (0..pairs.len()).collect();
        left.sort_by(|&a, &b| {
            let (ka, va) = (pairs[a].0.as_ref(), pairs[a].1.as_ref());
            (ka, va).cmp(&(pairs[b].0.as_ref(), pairs[b].1.as_ref()))
        });
        // (pair index, the shared wildcard standing in for its value), in the order consumed.
        let mut path: Vec<(usize, Option<&str>)> = Vec::with_capacity(pairs.len());
        loop {
            let (at, node, shared) = step(level, pairs, &left)?;
            path.push((left.remove(at), shared));
            if left.is_empty() {
                let rule = node.rule.clone()?;
                let entries = path
                    .iter()
                    .map(|&(i, _)| (pairs[i].0.as_ref(), pairs[i].1.as_ref()));
                let key = build_key(prefix, domain, entries, |n| path[n].1);
                return Some(Match { rule, key });
            }
            level = &node.children;
        }
    }
}

/// One level of a BucketId's walk: which of the pairs `left` (indices into `pairs`) a rule of
/// `level` takes, by the descriptors' precedence. Returns its place in `left`, the node, and the
/// pattern standing in for the value when the wildcard shares one bucket.
fn step<'l, K: AsRef<[u8]>, V: AsRef<[u8]>>(
    level: &'l Level,
    pairs: &[(K, V)],
    left: &[usize],
) -> Option<(usize, &'l Node, Option<&'l str>)> {
    let text = |at: usize| {
        let (k, v) = &pairs[left[at]];
        std::str::from_utf8(k.as_ref())
            .ok()
            .zip(std::str::from_utf8(v.as_ref()).ok())
    };
    let exact = (0..left.len()).find_map(|at| {
        let (k, v) = text(at)?;
        Some((at, level.exact.get(k)?.get(v)?, None))
    });
    exact
        .or_else(|| {
            level
                .wildcards
                .iter()
                .find_map(|(key, pattern, share, node)| {
                    let at = left.iter().position(|&i| {
                        pairs[i].0.as_ref() == key.as_bytes()
                            && pattern.matches(pairs[i].1.as_ref())
                    })?;
                    Some((at, node, share.then_some(pattern.text.as_str())))
                })
        })
        .or_else(|| {
            (0..left.len()).find_map(|at| {
                let k = std::str::from_utf8(pairs[left[at]].0.as_ref()).ok()?;
                Some((at, level.key_only.get(k)?, None))
            })
        })
}

/// The bucket key of a descriptor with no rule of its own (a `limit` override): the same encoding
/// as a matched rule's bucket.
pub fn descriptor_key<K: AsRef<[u8]>, V: AsRef<[u8]>>(
    prefix: &str,
    domain: &str,
    entries: impl ExactSizeIterator<Item = (K, V)>,
) -> String {
    build_key(prefix, domain, entries, |_| None)
}

/// `prefix`, then the domain and each entry as `len:text`, so that no two different descriptors can
/// share a key. `pattern(i)` gives the wildcard that stands in for entry `i`'s value in a shared
/// bucket; it is marked with `*` before its length, which no ordinary part has. A part that is not
/// UTF-8 is written `len~hex`: its own marker, so it can equal no text part.
fn build_key<'p, K: AsRef<[u8]>, V: AsRef<[u8]>>(
    prefix: &str,
    domain: &str,
    entries: impl ExactSizeIterator<Item = (K, V)>,
    pattern: impl Fn(usize) -> Option<&'p str>,
) -> String {
    let mut key = String::with_capacity(prefix.len() + domain.len() + 24 * entries.len() + 8);
    key.push_str(prefix);
    push_part(&mut key, domain.as_bytes());
    for (i, (k, v)) in entries.enumerate() {
        push_part(&mut key, k.as_ref());
        match pattern(i) {
            Some(p) => {
                key.push('*');
                push_part(&mut key, p.as_bytes());
            }
            None => push_part(&mut key, v.as_ref()),
        }
    }
    key
}

fn push_part(key: &mut String, part: &[u8]) {
    match std::str::from_utf8(part) {
        Ok(text) => {
            let _ = write!(key, "{}:", text.len());
            key.push_str(text);
        }
        Err(_) => {
            let _ = write!(key, "{}~", part.len());
            for b in part {
                let _ = write!(key, "{b:02x}");
            }
        }
    }
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
                Wildcard::new(pattern).matches(value.as_bytes()),
                want,
                "{pattern} ~ {value}"
            );
        }
        // Bytes that are not UTF-8 still meet the pattern's literal parts.
        assert!(Wildcard::new("premium-*").matches(b"premium-\xff"));
        assert!(!Wildcard::new("premium-*").matches(b"\xffpremium-"));
    }

    #[test]
    fn bytes_that_are_not_utf8_have_keys_of_their_own() {
        let text = super::descriptor_key("p:", "d", [("k", "ff")].into_iter());
        let bytes = super::descriptor_key("p:", "d", [(&b"k"[..], &b"\xff"[..])].into_iter());
        let other = super::descriptor_key("p:", "d", [(&b"k"[..], &b"\xfe"[..])].into_iter());
        assert_eq!(text, "p:1:d1:k2:ff");
        assert_eq!(bytes, "p:1:d1:k1~ff");
        assert_ne!(bytes, other);
    }

    const QUOTA_RULES: &str = r#"
domain: quota
descriptors:
  - key: name
    value: edge
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: name
    value: per_user
    descriptors:
      - key: user
        rate_limit: { unit: second, requests_per_unit: 10 }
      - key: user
        value: vip-*
        share_threshold: true
        rate_limit: { unit: second, requests_per_unit: 50 }
      - key: user
        value: blocked
        rate_limit: { unit: second, requests_per_unit: 0 }
  - key: tenant
    descriptors:
      - key: user
        descriptors:
          - key: plan
            rate_limit: { unit: minute, requests_per_unit: 600 }
"#;

    fn bucket(pairs: &[(&str, &str)]) -> Option<(String, String)> {
        let set = crate::rules::parse_text("quota.yaml", QUOTA_RULES).unwrap();
        set.lookup_bucket("p:", "quota", pairs)
            .map(|m| (m.rule.path.clone(), m.key))
    }

    #[test]
    fn a_bucket_id_walks_the_tree_whatever_the_order_of_its_pairs() {
        let (path, key) = bucket(&[("user", "bob"), ("name", "per_user")]).unwrap();
        assert_eq!(path, "name=per_user.user");
        let (_, same) = bucket(&[("name", "per_user"), ("user", "bob")]).unwrap();
        assert_eq!(key, same, "pair order must not change the bucket");
        // A value of its own: another bucket of the same rule.
        let (_, other) = bucket(&[("name", "per_user"), ("user", "carol")]).unwrap();
        assert_ne!(key, other);
        // Exact values win over the key alone; three levels, any order.
        assert_eq!(
            bucket(&[("name", "per_user"), ("user", "blocked")])
                .unwrap()
                .0,
            "name=per_user.user=blocked"
        );
        assert_eq!(
            bucket(&[("plan", "gold"), ("user", "u"), ("tenant", "t")])
                .unwrap()
                .0,
            "tenant.user.plan"
        );
    }

    #[test]
    fn a_bucket_id_applies_only_when_every_pair_is_consumed() {
        // A pair no rule takes: no rule (ALLOW_ALL, counted), never the shallower rule.
        assert!(bucket(&[("name", "edge"), ("user", "bob")]).is_none());
        // Pairs that stop above a rule: none either.
        assert!(bucket(&[("name", "per_user")]).is_none());
        assert!(bucket(&[("tenant", "t"), ("user", "u")]).is_none());
        assert_eq!(bucket(&[("name", "edge")]).unwrap().0, "name=edge");
        assert!(bucket(&[]).is_none());
    }

    #[test]
    fn a_shared_wildcard_makes_one_bucket_and_bytes_stay_bytes() {
        let (path, a) = bucket(&[("name", "per_user"), ("user", "vip-1")]).unwrap();
        let (_, b) = bucket(&[("name", "per_user"), ("user", "vip-2")]).unwrap();
        assert_eq!(path, "name=per_user.user=vip-*");
        assert_eq!(a, b, "share_threshold: one bucket for every matching value");
        let set = crate::rules::parse_text("quota.yaml", QUOTA_RULES).unwrap();
        let raw: [(&[u8], &[u8]); 2] = [(b"name", b"per_user"), (b"user", b"\xff\xfe")];
        let m = set.lookup_bucket("p:", "quota", &raw).unwrap();
        assert_eq!(m.rule.path, "name=per_user.user");
        assert!(m.key.ends_with("2~fffe"), "{}", m.key);
    }
}
