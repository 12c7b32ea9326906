//! Descriptor-to-key encoding: two descriptors share a bucket key exactly when they are the same
//! descriptor, and a bucket shared by a wildcard (`share_threshold`) never has the key of any
//! single descriptor's own bucket.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sluicegate_core::rules::{RuleSet, descriptor_key, parse_text};

const PREFIX: &str = "envoy:";

#[derive(Arbitrary, Debug, PartialEq)]
struct Descriptor {
    /// None: the rules' domain, so that lookups find rules often.
    domain: Option<String>,
    entries: Vec<(String, String)>,
}

impl Descriptor {
    fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or("d")
    }

    fn entries(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + Clone {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    fn key(&self) -> String {
        descriptor_key(PREFIX, self.domain(), self.entries())
    }

    /// Whether `other` is the same descriptor (an absent domain is "d").
    fn same(&self, other: &Descriptor) -> bool {
        self.domain() == other.domain() && self.entries == other.entries
    }
}

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        parse_text(
            "fuzz.yaml",
            r#"
domain: d
descriptors:
  - key: k
    value: "v*"
    share_threshold: true
    rate_limit: { unit: second, requests_per_unit: 1, name: shared }
  - key: k
    rate_limit: { unit: second, requests_per_unit: 1, name: plain }
    descriptors:
      - key: k
        value: "*:*"
        share_threshold: true
        rate_limit: { unit: second, requests_per_unit: 1, name: shared_nested }
      - key: j
        value: "1*"
        rate_limit: { unit: second, requests_per_unit: 1, name: plain_wildcard }
"#,
        )
        .expect("the fuzz rules parse")
    })
}

fuzz_target!(|input: (Descriptor, Descriptor)| {
    let (a, b) = input;
    let (ka, kb) = (a.key(), b.key());
    assert_eq!(ka == kb, a.same(&b), "{a:?} {b:?}: {ka:?} {kb:?}");
    assert!(ka.starts_with(PREFIX));

    if let Some(m) = rules().lookup(PREFIX, a.domain(), a.entries()) {
        let shared = m
            .rule
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("shared"));
        if shared {
            assert_ne!(
                m.key, ka,
                "a shared bucket took a descriptor's own key: {a:?}"
            );
            assert_ne!(
                m.key, kb,
                "a shared bucket took a descriptor's own key: {b:?}"
            );
        } else {
            assert_eq!(m.key, ka, "a rule's bucket is the descriptor's own: {a:?}");
        }
    }
});
