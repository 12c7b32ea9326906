//! Rules files: envoyproxy/ratelimit's format and matching, sluicegate's additions, strict errors.

use std::path::{Path, PathBuf};

use sluicegate_core::rules::{Limit, RuleSet, Unit, load_path};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(text: &str) -> RuleSet {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "rules.yaml", text);
    load_path(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn load_err(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "bad.yaml", text);
    load_path(&p).expect_err("must be refused").to_string()
}

/// The label of the rule matching `entries`, or None.
fn rule_for(set: &RuleSet, domain: &str, entries: &[(&str, &str)]) -> Option<String> {
    set.lookup("p:", domain, entries.iter().copied())
        .map(|m| m.rule.label.clone())
}

fn key_for(set: &RuleSet, domain: &str, entries: &[(&str, &str)]) -> String {
    set.lookup("p:", domain, entries.iter().copied())
        .expect("a match")
        .key
}

#[test]
fn readme_example_1_exact_values() {
    let set = load(
        "domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit: { unit: second, requests_per_unit: 500 }
  - key: database
    value: default
    rate_limit: { unit: second, requests_per_unit: 500 }
",
    );
    assert_eq!(
        rule_for(&set, "mongo_cps", &[("database", "users")]).as_deref(),
        Some("database=users")
    );
    assert_eq!(
        rule_for(&set, "mongo_cps", &[("database", "default")]).as_deref(),
        Some("database=default")
    );
    assert_eq!(rule_for(&set, "mongo_cps", &[("database", "other")]), None);
    assert_eq!(
        rule_for(&set, "other_domain", &[("database", "users")]),
        None
    );
}

#[test]
fn readme_example_2_nested_and_key_only() {
    let set = load(
        "domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: { unit: day, requests_per_unit: 5 }
  - key: to_number
    rate_limit: { unit: day, requests_per_unit: 100 }
",
    );
    let nested = &[("message_type", "marketing"), ("to_number", "2061111111")];
    assert_eq!(
        rule_for(&set, "messaging", nested).as_deref(),
        Some("message_type=marketing.to_number")
    );
    assert_eq!(
        rule_for(&set, "messaging", &[("to_number", "2061111111")]).as_deref(),
        Some("to_number")
    );
    // Each value of a key-only rule is its own bucket.
    assert_ne!(
        key_for(&set, "messaging", &[("to_number", "1")]),
        key_for(&set, "messaging", &[("to_number", "2")])
    );
}

#[test]
fn readme_example_3_limit_only_at_the_depth_of_the_last_entry() {
    let set = load(
        "domain: example
descriptors:
  - key: key1
    value: value1
    descriptors:
      - key: key2
        rate_limit: { unit: minute, requests_per_unit: 10 }
  - key: key1
    rate_limit: { unit: minute, requests_per_unit: 20 }
",
    );
    assert_eq!(
        rule_for(&set, "example", &[("key1", "value1")]),
        None,
        "no fallback to key-only: exact wins and has no limit"
    );
    assert_eq!(
        rule_for(&set, "example", &[("key1", "other")]).as_deref(),
        Some("key1")
    );
    assert!(rule_for(&set, "example", &[("key1", "value1"), ("key2", "x")]).is_some());
    assert_eq!(
        rule_for(
            &set,
            "example",
            &[("key1", "value1"), ("key2", "x"), ("key3", "y")]
        ),
        None,
        "no prefix match"
    );
    assert_eq!(rule_for(&set, "example", &[("key2", "x")]), None);
}

#[test]
fn exact_beats_wildcard_beats_key_only() {
    let set = load(
        "domain: edge
descriptors:
  - key: api_key
    rate_limit: { unit: second, requests_per_unit: 1, name: any }
  - key: api_key
    value: premium-*
    rate_limit: { unit: second, requests_per_unit: 2, name: premium }
  - key: api_key
    value: premium-gold
    rate_limit: { unit: second, requests_per_unit: 3, name: gold }
  - key: api_key
    value: '*-internal'
    rate_limit: { unit: second, requests_per_unit: 4, name: internal }
  - key: api_key
    value: 'x*y*z'
    rate_limit: { unit: second, requests_per_unit: 5, name: middle }
",
    );
    let r = |v| rule_for(&set, "edge", &[("api_key", v)]);
    assert_eq!(r("premium-gold").as_deref(), Some("gold"));
    assert_eq!(r("premium-silver").as_deref(), Some("premium"));
    assert_eq!(r("ops-internal").as_deref(), Some("internal"));
    assert_eq!(r("x-1-y-2-z").as_deref(), Some("middle"));
    assert_eq!(r("x-1-z-2-y").as_deref(), Some("any"));
    assert_eq!(r("basic").as_deref(), Some("any"));
    // Without share_threshold each value of a wildcard has its own bucket; with it, one.
    assert_ne!(
        key_for(&set, "edge", &[("api_key", "premium-a")]),
        key_for(&set, "edge", &[("api_key", "premium-b")])
    );
}

#[test]
fn share_threshold_shares_one_bucket() {
    let set = load(
        "domain: edge
descriptors:
  - key: path
    value: /api/*
    share_threshold: true
    rate_limit: { unit: second, requests_per_unit: 5 }
",
    );
    let a = key_for(&set, "edge", &[("path", "/api/a")]);
    let b = key_for(&set, "edge", &[("path", "/api/b")]);
    assert_eq!(a, b);
    assert_ne!(
        a,
        key_for(
            &load(
                "domain: edge\ndescriptors:\n  - key: path\n    rate_limit: { unit: second, requests_per_unit: 5 }\n"
            ),
            "edge",
            &[("path", "/api/*")]
        )
    );
}

#[test]
fn bucket_keys_never_collide() {
    let set = load(
        "domain: d
descriptors:
  - key: a
    rate_limit: { unit: second, requests_per_unit: 5 }
    descriptors:
      - key: b
        rate_limit: { unit: second, requests_per_unit: 5 }
  - key: 'a:b'
    rate_limit: { unit: second, requests_per_unit: 5 }
",
    );
    let keys = [
        key_for(&set, "d", &[("a", "x:1:b")]),
        key_for(&set, "d", &[("a", "x"), ("b", "")]),
        key_for(&set, "d", &[("a", "x"), ("b", "1")]),
        key_for(&set, "d", &[("a:b", "x")]),
    ];
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            assert_ne!(keys[i], keys[j]);
        }
    }
    assert!(keys.iter().all(|k| k.starts_with("p:")));
}

#[test]
fn bucket_shapes_units_burst_and_multiplier() {
    let set = load(
        "domain: d
descriptors:
  - key: s
    rate_limit: { unit: SECOND, requests_per_unit: 10 }
  - key: m
    rate_limit: { unit: minute, requests_per_unit: 600, burst: 50 }
  - key: h2
    rate_limit: { unit: hour, requests_per_unit: 7200, unit_multiplier: 2 }
  - key: w
    rate_limit: { unit: week, requests_per_unit: 604800 }
  - key: y
    rate_limit: { unit: year, requests_per_unit: 31536000 }
  - key: mo
    rate_limit: { unit: month, requests_per_unit: 2592000 }
  - key: d
    rate_limit: { unit: day, requests_per_unit: 86400 }
  - key: u
    rate_limit: { unlimited: true }
  - key: zero
    rate_limit: { unit: second, requests_per_unit: 0 }
",
    );
    let shape = |key: &str| match set
        .lookup("", "d", [(key, "v")].into_iter())
        .unwrap()
        .rule
        .limit
    {
        Limit::Bucket { shape, .. } => Some((shape.capacity(), shape.rate())),
        _ => None,
    };
    assert_eq!(shape("s"), Some((10.0, 10.0)));
    assert_eq!(shape("m"), Some((50.0, 10.0)));
    assert_eq!(shape("h2"), Some((7200.0, 1.0)));
    for k in ["w", "y", "mo", "d"] {
        assert_eq!(shape(k).map(|s| s.1), Some(1.0), "{k}");
    }
    assert_eq!(
        set.lookup("", "d", [("u", "v")].into_iter())
            .unwrap()
            .rule
            .limit,
        Limit::Unlimited
    );
    assert_eq!(
        set.lookup("", "d", [("zero", "v")].into_iter())
            .unwrap()
            .rule
            .limit,
        Limit::Blocked { unit: Unit::Second }
    );
}

#[test]
fn errors_name_the_file_and_line() {
    let cases = [
        (
            "domain: d\ndescriptors:\n  - key: a\n    ratelimit: { unit: second, requests_per_unit: 1 }\n",
            ":4",
            "ratelimit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, colour: red }\n",
            ":4",
            "colour",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    value: v\n    rate_limit: { unit: second, requests_per_unit: 1 }\n  - key: a\n    value: v\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n",
            ":6",
            "duplicate",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1 }\n  - key: a\n    rate_limit: { unit: minute, requests_per_unit: 1 }\n",
            ":5",
            "duplicate",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    key: b\n",
            ":4",
            "duplicate",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n",
            ":3",
            "fortnight",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unlimited: true, unit: second }\n",
            ":3",
            "unlimited",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second }\n",
            ":3",
            "requests_per_unit",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: -1 }\n",
            ":4",
            "whole number from 0 to 4294967295, got -1",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, burst: 0.5 }\n",
            ":3",
            "burst must be at least 1",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, burst: 1e16 }\n",
            ":3",
            "burst",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    debt: true\n    rate_limit: { unlimited: true }\n",
            ":3",
            "debt",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, burst: 0 }\n",
            ":3",
            "burst",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, unit_multiplier: 0 }\n",
            ":4",
            "unit_multiplier",
        ),
        (
            "domain: d\ndescriptors:\n  - key: ''\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
            ":3",
            "key",
        ),
        ("domain: ''\n", ":1", "domain"),
        (
            "domain: d\ndescriptors:\n  - key: a\n    value: v\n    share_threshold: true\n",
            ":3",
            "share_threshold",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    rate_limit: { unit: second, requests_per_unit: 1, name: x, replaces: [{ name: x }] }\n",
            ":3",
            "replace itself",
        ),
        (
            "domain: d\ndescriptors:\n  - key: a\n    quota_mode: true\n",
            ":3",
            "quota_mode",
        ),
    ];
    for (text, line, word) in cases {
        let err = load_err(text);
        assert!(
            err.contains(&format!("bad.yaml{line}")),
            "want line {line} in: {err}\n--- {text}"
        );
        assert!(err.contains(word), "want '{word}' in: {err}");
    }
}

#[test]
fn a_directory_of_files_and_domains() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.yaml",
        "domain: one\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
    );
    write(
        dir.path(),
        "b.yml",
        "domain: two\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 2 }\n",
    );
    write(dir.path(), ".hidden.yaml", "not: [valid");
    write(dir.path(), "notes.txt", "ignored");
    let set = load_path(dir.path()).unwrap();
    let mut domains: Vec<_> = set.domains().collect();
    domains.sort();
    assert_eq!(domains, ["one", "two"]);
    assert_eq!(set.rules().len(), 2);

    write(dir.path(), "c.yaml", "domain: one\n");
    let err = load_path(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("c.yaml") && err.contains("a.yaml") && err.contains("'one'"),
        "{err}"
    );
}

#[test]
fn check_rules_command() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "r.yaml",
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 600, burst: 100, name: premium }\n",
    );
    let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
        .args(["check-rules"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("r.yaml:3")
            && stdout.contains("descriptor=api_key")
            && stdout.contains("name=premium"),
        "{stdout}"
    );
    assert!(stdout.contains("capacity=100 rate=10/s"), "{stdout}");
    assert!(stdout.contains("OK: 1 rule in 1 domain (edge)"), "{stdout}");

    write(
        dir.path(),
        "r.yaml",
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute }\n",
    );
    let out = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
        .args(["check-rules"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("r.yaml:3"));
}

#[test]
fn the_shipped_rules_load() {
    let set = load_path(Path::new("deploy/rules")).unwrap();
    assert!(set.rules().len() >= 5);
}

#[test]
fn newcomer_mistakes_get_messages_that_say_what_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: -5 }\n",
            "requests_per_unit must be a whole number from 0 to 4294967295, got -5",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: { unit: second, requests_per_unit: 2, unit_multiplier: 0 }\n",
            "unit_multiplier must be a whole number from 1",
        ),
        ("", "the file is empty"),
        ("# nothing yet\n\n", "the file is empty"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let name = format!("case{i}.yaml");
        write(dir.path(), &name, text);
        let err = load_path(&dir.path().join(&name)).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(&name), "{text:?}: {err}");
    }
}

/// `concurrency: { max, lease }` rules: parsed, shown by check-rules, refused with a message
/// naming the line when combined with a rate limit or written wrong; siblings may mix.
#[test]
fn concurrency_rules() {
    let set = load(
        "domain: d\ndescriptors:\n  - key: user\n    concurrency: { max: 5, lease: 90s, name: per_user }\n  - key: org\n    concurrency: { max: 50 }\n  - key: ip\n    rate_limit: { unit: second, requests_per_unit: 10 }\n",
    );
    let limits: Vec<(String, Limit)> = set
        .rules()
        .iter()
        .map(|r| (r.label.clone(), r.limit))
        .collect();
    assert_eq!(
        limits[..2],
        [
            (
                "per_user".to_string(),
                Limit::InFlight {
                    max: 5,
                    lease_ms: 90_000
                }
            ),
            (
                "org".to_string(),
                Limit::InFlight {
                    max: 50,
                    lease_ms: 60_000
                }
            ),
        ]
    );
    assert_eq!(
        set.rules()[0].to_string().split("  ").nth(3),
        Some("name=per_user")
    );
    assert!(
        set.rules()[0]
            .to_string()
            .contains("at most 5 in flight  lease: 90s")
    );
    for (ms, text) in [
        (250, "250ms"),
        (1_000, "1s"),
        (300_000, "5m"),
        (7_200_000, "2h"),
    ] {
        let set = load(&format!(
            "domain: d\ndescriptors:\n  - key: k\n    concurrency: {{ max: 1, lease: {text} }}\n"
        ));
        assert_eq!(
            set.rules()[0].limit,
            Limit::InFlight {
                max: 1,
                lease_ms: ms
            }
        );
    }
    for (text, line, says) in [
        (
            "domain: d\ndescriptors:\n  - key: k\n    concurrency: { max: 1 }\n    rate_limit: { unit: second, requests_per_unit: 1 }\n",
            ":3",
            "rate_limit or concurrency, not both",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    concurrency: { max: 0 }\n",
            ":4",
            "concurrency max must be a whole number from 1",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    concurrency:\n      max: 2\n      lease: 10 minutes\n",
            ":6",
            "lease must be a whole number of ms, s, m or h",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    concurrency: { max: 2, lease: 25h }\n",
            ":4",
            "from 1ms to 24h",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    concurrency: { lease: 5s }\n",
            ":4",
            "max",
        ),
        (
            "domain: d\ndescriptors:\n  - key: k\n    debt: true\n    concurrency: { max: 2 }\n",
            ":3",
            "debt needs a rate_limit bucket",
        ),
    ] {
        let err = load_err(text);
        assert!(err.contains(line) && err.contains(says), "{text}\n=> {err}");
    }
}
