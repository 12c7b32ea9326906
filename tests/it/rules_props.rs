//! Properties of the rules parser: whatever the text, it answers (a rule set or an error naming the
//! file) and never panics; and a random valid rules file comes back out of what `check-rules`
//! prints, rule for rule: where it is, its descriptor path, its name, limit, bucket and flags.

use proptest::prelude::*;
use sluicegate_core::rules::{Unit, parse_text};

const FILE: &str = "rules.yaml";

#[derive(Clone, Debug)]
struct GenDesc {
    key: String,
    value: Option<String>,
    share_threshold: bool,
    limit: Option<GenLimit>,
    shadow: bool,
    debt: bool,
    children: Vec<GenDesc>,
}

#[derive(Clone, Debug)]
enum GenKind {
    Unlimited,
    PerUnit {
        rpu: u32,
        unit: Unit,
        multiplier: Option<u32>,
        burst: Option<f64>,
    },
}

#[derive(Clone, Debug)]
struct GenLimit {
    kind: GenKind,
    unit_spelling: u8,
    name: Option<String>,
    replaces: Vec<String>,
}

/// Text a user might put in a key, value or name: letters, digits, YAML's special characters,
/// non-ASCII, single inner spaces. Not `.`, `=` or `,`, which the printed line uses as separators.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_:#/ é日\"'\\\\!&%@{}\\[\\]|>?~-]{1,10}".prop_filter("separators", |s| {
        !s.starts_with(' ') && !s.ends_with(' ') && !s.contains("  ")
    })
}

fn unit() -> impl Strategy<Value = Unit> {
    prop_oneof![
        Just(Unit::Second),
        Just(Unit::Minute),
        Just(Unit::Hour),
        Just(Unit::Day),
        Just(Unit::Week),
        Just(Unit::Month),
        Just(Unit::Year),
    ]
}

fn limit() -> impl Strategy<Value = GenLimit> {
    let per_unit = (
        prop_oneof![1 => Just(0u32), 8 => 1u32..=100_000, 1 => Just(u32::MAX)],
        unit(),
        prop::option::of(1u32..=60),
        prop::option::of(prop_oneof![
            (1u32..=1_000_000).prop_map(f64::from),
            Just(2.5)
        ]),
    )
        .prop_map(|(rpu, unit, multiplier, burst)| GenKind::PerUnit {
            rpu,
            unit,
            multiplier,
            burst,
        });
    let kind = prop_oneof![1 => Just(GenKind::Unlimited), 6 => per_unit];
    (
        kind,
        0u8..3,
        prop::option::of(text()),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(|(kind, unit_spelling, name, replaces)| {
            // A rule cannot replace itself.
            let replaces = replaces
                .into_iter()
                .filter(|r| Some(r) != name.as_ref())
                .collect();
            GenLimit {
                kind,
                unit_spelling,
                name,
                replaces,
            }
        })
}

fn desc(children: impl Strategy<Value = Vec<GenDesc>>) -> impl Strategy<Value = GenDesc> {
    (
        text(),
        prop::option::of((text(), any::<bool>(), any::<bool>())),
        prop::option::of(limit()),
        any::<bool>(),
        any::<bool>(),
        children,
    )
        .prop_map(|(key, value, limit, shadow, debt, children)| {
            // share_threshold only on a wildcard; debt only on a real bucket.
            let (value, share_threshold) = match value {
                Some((v, wildcard, share)) if wildcard => (Some(format!("{v}*")), share),
                Some((v, _, _)) => (Some(v), false),
                None => (None, false),
            };
            let bucket = matches!(
                &limit,
                Some(GenLimit { kind: GenKind::PerUnit { rpu, .. }, .. }) if *rpu > 0
            );
            GenDesc {
                key,
                value,
                share_threshold,
                limit,
                shadow,
                debt: debt && bucket,
                children: unique(children),
            }
        })
}

/// Siblings with the same key and value are an error; keep the first of each.
fn unique(mut descs: Vec<GenDesc>) -> Vec<GenDesc> {
    let mut seen = std::collections::HashSet::new();
    descs.retain(|d| seen.insert((d.key.clone(), d.value.clone())));
    descs
}

fn tree() -> impl Strategy<Value = Vec<GenDesc>> {
    let leaf = desc(Just(Vec::new()));
    let nested = leaf.prop_recursive(3, 24, 4, |inner| {
        desc(prop::collection::vec(inner, 0..4)).boxed()
    });
    prop::collection::vec(nested, 0..5).prop_map(unique)
}

/// A YAML scalar, quoted one way or the other (both must read back the same text).
fn quoted(s: &str, single: bool) -> String {
    if single {
        format!("'{}'", s.replace('\'', "''"))
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// What a rule should look like in `check-rules`: every field it prints.
#[derive(Debug, PartialEq)]
struct Printed {
    line: u64,
    domain: String,
    path: Vec<(String, Option<String>)>,
    name: Option<String>,
    limit: String,
    capacity: Option<f64>,
    rate: Option<f64>,
    shadow: bool,
    debt: bool,
    replaces: Vec<String>,
}

/// Writes the YAML of `descs` and collects the rules it holds, in the parser's order (a rule
/// before the rules nested under it).
struct Writer {
    yaml: Vec<String>,
    expected: Vec<Printed>,
    domain: String,
    single_quotes: bool,
}

impl Writer {
    fn push(&mut self, indent: usize, text: String) {
        self.yaml.push(format!("{}{text}", " ".repeat(indent)));
    }

    fn q(&self, s: &str) -> String {
        quoted(s, self.single_quotes)
    }

    fn descriptors(&mut self, descs: &[GenDesc], indent: usize, path: &[(String, Option<String>)]) {
        if descs.is_empty() {
            return;
        }
        self.push(indent, "descriptors:".into());
        for d in descs {
            let line = self.yaml.len() as u64 + 1;
            self.push(indent + 2, format!("- key: {}", self.q(&d.key)));
            let at = indent + 4;
            if let Some(v) = &d.value {
                self.push(at, format!("value: {}", self.q(v)));
            }
            if d.share_threshold {
                self.push(at, "share_threshold: true".into());
            }
            if d.shadow {
                self.push(at, "shadow_mode: true".into());
            }
            if d.debt {
                self.push(at, "debt: true".into());
            }
            let mut path = path.to_vec();
            path.push((d.key.clone(), d.value.clone()));
            if let Some(l) = &d.limit {
                self.rate_limit(l, at, line, &path, d);
            }
            self.descriptors(&d.children, at, &path);
        }
    }

    fn rate_limit(
        &mut self,
        l: &GenLimit,
        at: usize,
        line: u64,
        path: &[(String, Option<String>)],
        d: &GenDesc,
    ) {
        self.push(at, "rate_limit:".into());
        let (limit, capacity, rate) = match l.kind {
            GenKind::Unlimited => {
                self.push(at + 2, "unlimited: true".into());
                ("unlimited".to_string(), None, None)
            }
            GenKind::PerUnit {
                rpu,
                unit,
                multiplier,
                burst,
            } => {
                let spelled = match l.unit_spelling {
                    0 => unit.as_str().to_string(),
                    1 => unit.as_str().to_uppercase(),
                    _ => {
                        let s = unit.as_str();
                        s[..1].to_uppercase() + &s[1..]
                    }
                };
                self.push(at + 2, format!("unit: {spelled}"));
                self.push(at + 2, format!("requests_per_unit: {rpu}"));
                if let Some(m) = multiplier {
                    self.push(at + 2, format!("unit_multiplier: {m}"));
                }
                if let Some(b) = burst {
                    self.push(at + 2, format!("burst: {b}"));
                }
                let m = multiplier.unwrap_or(1);
                if rpu == 0 {
                    (
                        format!("0/{} (always over limit)", unit.as_str()),
                        None,
                        None,
                    )
                } else {
                    let per = if m == 1 {
                        unit.as_str().to_string()
                    } else {
                        format!("{m} {}s", unit.as_str())
                    };
                    let rate = f64::from(rpu) / (unit.seconds() * f64::from(m));
                    (
                        format!("{rpu}/{per}"),
                        Some(burst.unwrap_or(f64::from(rpu))),
                        Some(rate),
                    )
                }
            }
        };
        if let Some(n) = &l.name {
            self.push(at + 2, format!("name: {}", self.q(n)));
        }
        if !l.replaces.is_empty() {
            self.push(at + 2, "replaces:".into());
            for r in &l.replaces {
                self.push(at + 4, format!("- name: {}", self.q(r)));
            }
        }
        self.expected.push(Printed {
            line,
            domain: self.domain.clone(),
            path: path.to_vec(),
            name: l.name.clone(),
            limit,
            capacity,
            rate,
            shadow: d.shadow,
            debt: d.debt,
            replaces: l.replaces.clone(),
        });
    }
}

fn write(domain: &str, descs: &[GenDesc], single_quotes: bool) -> (String, Vec<Printed>) {
    let mut w = Writer {
        yaml: Vec::new(),
        expected: Vec::new(),
        domain: domain.to_string(),
        single_quotes,
    };
    w.push(0, format!("domain: {}", w.q(domain)));
    w.descriptors(descs, 0, &[]);
    (w.yaml.join("\n") + "\n", w.expected)
}

/// Reads one line of `check-rules` back into its fields.
fn read_line(line: &str) -> Result<Printed, String> {
    let mut parts = line.split("  ");
    let mut next = |what: &str| parts.next().ok_or(format!("no {what} in {line:?}"));
    let source = next("source")?;
    let at = source
        .strip_prefix(&format!("{FILE}:"))
        .and_then(|n| n.parse().ok())
        .ok_or(format!("source {source:?}"))?;
    let domain = next("domain")?
        .strip_prefix("domain=")
        .ok_or("domain=")?
        .to_string();
    let path = next("descriptor")?
        .strip_prefix("descriptor=")
        .ok_or("descriptor=")?
        .split('.')
        .map(|step| match step.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (step.to_string(), None),
        })
        .collect();
    let rest: Vec<&str> = parts.collect();
    let mut printed = Printed {
        line: at,
        domain,
        path,
        name: None,
        limit: String::new(),
        capacity: None,
        rate: None,
        shadow: false,
        debt: false,
        replaces: Vec::new(),
    };
    for part in rest {
        if let Some(n) = part.strip_prefix("name=") {
            printed.name = Some(n.to_string());
        } else if let Some(b) = part.strip_prefix("bucket: capacity=") {
            let (c, r) = b.split_once(" rate=").ok_or("rate=")?;
            printed.capacity = Some(c.parse().map_err(|_| format!("capacity {c:?}"))?);
            let r = r.strip_suffix("/s").ok_or("/s")?;
            printed.rate = Some(r.parse().map_err(|_| format!("rate {r:?}"))?);
        } else if part == "shadow_mode" {
            printed.shadow = true;
        } else if part == "debt" {
            printed.debt = true;
        } else if let Some(r) = part.strip_prefix("replaces=") {
            printed.replaces = r.split(',').map(str::to_string).collect();
        } else if printed.limit.is_empty() {
            printed.limit = part.to_string();
        } else {
            return Err(format!("unexpected {part:?} in {line:?}"));
        }
    }
    Ok(printed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_valid_file_comes_back_out_of_check_rules(
        domain in text(),
        descs in tree(),
        single_quotes in any::<bool>(),
    ) {
        let (yaml, expected) = write(&domain, &descs, single_quotes);
        let set = parse_text(FILE, &yaml).map_err(|e| TestCaseError::fail(format!("{e}\n{yaml}")))?;
        prop_assert_eq!(set.rules().len(), expected.len(), "{}", yaml);
        for (rule, want) in set.rules().iter().zip(&expected) {
            let line = rule.to_string();
            let got = read_line(&line).map_err(TestCaseError::fail)?;
            // Rates are printed to six significant digits.
            let close = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => ((a - b) / b).abs() < 1e-5,
                (a, b) => a == b,
            };
            prop_assert!(close(got.rate, want.rate), "rate {:?} vs {:?} in {}", got.rate, want.rate, line);
            prop_assert_eq!(&Printed { rate: want.rate, ..got }, want, "{}\n{}", line, yaml);
        }
    }

    #[test]
    fn any_text_is_answered_without_a_panic(text in "\\PC{0,400}") {
        check_answered(&text)?;
    }

    #[test]
    fn a_damaged_file_is_answered_without_a_panic(
        domain in text(),
        descs in tree(),
        cuts in prop::collection::vec((any::<prop::sample::Index>(), 0usize..12, "[ \\-:\\n\"'*&!{}\\[\\]0-9a-z]{0,6}"), 1..5),
    ) {
        let (yaml, _) = write(&domain, &descs, false);
        let mut chars: Vec<char> = yaml.chars().collect();
        for (at, len, insert) in cuts {
            let start = at.index(chars.len() + 1);
            let end = (start + len).min(chars.len());
            chars.splice(start..end, insert.chars());
        }
        check_answered(&chars.into_iter().collect::<String>())?;
    }
}

/// A rule set, or an error that names the file.
fn check_answered(text: &str) -> Result<(), TestCaseError> {
    match parse_text(FILE, text) {
        Ok(set) => {
            for rule in set.rules() {
                let _ = rule.to_string();
            }
        }
        Err(e) => prop_assert!(e.to_string().starts_with(FILE), "{e}"),
    }
    Ok(())
}

#[test]
fn the_round_trip_sees_a_changed_field() {
    // The comparison is not vacuous: a rule printed with another limit or line does not pass.
    let yaml = "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: minute\n      requests_per_unit: 6\n";
    let set = parse_text(FILE, yaml).unwrap();
    let printed = read_line(&set.rules()[0].to_string()).unwrap();
    assert_eq!(printed.line, 3);
    assert_eq!(printed.limit, "6/minute");
    assert_eq!(printed.capacity, Some(6.0));
    assert_eq!(printed.rate, Some(0.1));
    assert_eq!(printed.path, [("k".to_string(), None)]);
}
