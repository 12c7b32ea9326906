//! Reading rules files: strict YAML (unknown fields, duplicates and bad values are errors that
//! name the file and line), then the checks envoyproxy/ratelimit makes.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::matcher::{Level, Node, Wildcard};
use super::{Limit, Rule, RuleSet, Unit};

/// A rules file or directory that cannot be loaded; the message names the file and line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RulesError(pub String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileYaml {
    domain: Spanned<String>,
    /// None when the file has no `descriptors` at all (perhaps a file caught half-written):
    /// only an explicit `descriptors: []` may take every rule of a domain away on a reload.
    #[serde(default)]
    descriptors: Option<Vec<DescriptorYaml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorYaml {
    key: Spanned<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitYaml>,
    #[serde(default)]
    concurrency: Option<ConcurrencyYaml>,
    #[serde(default)]
    descriptors: Vec<DescriptorYaml>,
    #[serde(default)]
    shadow_mode: bool,
    /// sluicegate: charges always land, the bucket going into debt down to -capacity.
    #[serde(default)]
    debt: bool,
    /// Metric naming in envoyproxy/ratelimit; sluicegate's labels never carry values, so these are
    /// accepted and have no effect.
    #[serde(default, rename = "detailed_metric")]
    _detailed_metric: bool,
    #[serde(default, rename = "value_to_metric")]
    _value_to_metric: bool,
    #[serde(default)]
    share_threshold: bool,
    /// Not supported: refused by name rather than misread.
    #[serde(default)]
    quota_mode: Option<bool>,
    #[serde(default)]
    metadata: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitYaml {
    #[serde(default)]
    unit: Option<String>,
    /// Read as a number and checked by hand, so that `-5` or `1.5` get a message saying what is
    /// expected rather than the parser's "invalid u32".
    #[serde(default)]
    requests_per_unit: Option<Spanned<f64>>,
    #[serde(default)]
    unlimited: bool,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    replaces: Vec<ReplacesYaml>,
    /// sluicegate: the bucket's capacity, if not `requests_per_unit`.
    #[serde(default)]
    burst: Option<f64>,
    /// sluicegate: the window is this many units (`unit: minute, unit_multiplier: 5`).
    #[serde(default)]
    unit_multiplier: Option<Spanned<f64>>,
}

/// `concurrency: { max: N, lease: 60s }`: an in-flight limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrencyYaml {
    max: Spanned<f64>,
    #[serde(default)]
    lease: Option<Spanned<String>>,
    #[serde(default)]
    name: Option<String>,
}

/// A lease lasts this long when the rule does not say.
const DEFAULT_LEASE_MS: u32 = 60_000;

/// `250ms`, `60s`, `5m`, `1h` as milliseconds: from 1 ms to a day ([`crate::MAX_LEASE_MS`]).
fn lease_ms(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let per = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => 0,
    };
    let ms = digits.parse::<u64>().ok().map(|n| n.saturating_mul(per));
    match ms {
        Some(ms) if per > 0 && (1..=u64::from(crate::MAX_LEASE_MS)).contains(&ms) => Ok(ms as u32),
        _ => Err(format!(
            "lease must be a whole number of ms, s, m or h (250ms, 60s, 5m) from 1ms to 24h, got '{text}'"
        )),
    }
}

/// A lease as the rules write it.
pub(super) fn show_ms(ms: u32) -> String {
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacesYaml {
    name: String,
}

/// Loads a rules file, or every `*.yaml`/`*.yml` file of a directory (dot-files skipped, so a
/// Kubernetes ConfigMap mount reads through its `..data` symlink exactly once).
pub fn load_path(path: &Path) -> Result<RuleSet, RulesError> {
    let files = rule_files(path)?;
    let mut set = RuleSet::default();
    let mut domain_files: HashMap<String, PathBuf> = HashMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| RulesError(format!("{}: cannot read: {e}", file.display())))?;
        let File {
            domain,
            level,
            rules,
            emptied,
        } = parse_file(file, &text, set.rules.len())?;
        if let Some(first) = domain_files.get(&domain) {
            return Err(RulesError(format!(
                "{}: domain '{domain}' is already defined in {}",
                file.display(),
                first.display()
            )));
        }
        domain_files.insert(domain.clone(), file.clone());
        if emptied {
            set.emptied.insert(domain.clone());
        }
        set.domains.insert(domain, level);
        set.rules.extend(rules);
    }
    Ok(set)
}

/// Parses the text of one rules file; `name` stands for the file in error messages. The same
/// checks as [`load_path`], without the file system (for tests and fuzzing).
pub fn parse_text(name: &str, text: &str) -> Result<RuleSet, RulesError> {
    let File {
        domain,
        level,
        rules,
        emptied,
    } = parse_file(Path::new(name), text, 0)?;
    let mut set = RuleSet::default();
    if emptied {
        set.emptied.insert(domain.clone());
    }
    set.domains.insert(domain, level);
    set.rules = rules;
    Ok(set)
}

/// The files a path stands for, sorted, each resolved through symlinks.
pub(super) fn rule_files(path: &Path) -> Result<Vec<PathBuf>, RulesError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| RulesError(format!("{}: cannot read: {e}", path.display())))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| RulesError(format!("{}: cannot list: {e}", path.display())))?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let p = entry.path();
        if std::fs::metadata(&p).is_ok_and(|m| m.is_file()) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(RulesError(format!("{}: no *.yaml files", path.display())));
    }
    Ok(files)
}

/// A whole number from `min` to 2^32 - 1, as the format's u32 fields take.
fn whole(field: &str, v: f64, min: u32) -> Result<u32, String> {
    if v.fract() == 0.0 && v >= f64::from(min) && v <= f64::from(u32::MAX) {
        Ok(v as u32)
    } else {
        Err(format!(
            "{field} must be a whole number from {min} to {}, got {v}",
            u32::MAX
        ))
    }
}

/// Parses one file's text (`file` only names it in errors).
/// One file, parsed.
pub(super) struct File {
    pub domain: String,
    pub level: Level,
    pub rules: Vec<Arc<Rule>>,
    /// The file says `descriptors: []`: no rules on purpose.
    pub emptied: bool,
}

pub(super) fn parse_file(file: &Path, text: &str, first_id: usize) -> Result<File, RulesError> {
    let name = file.display().to_string();
    // Comments alone are no rules file (the parser would only say "unexpected end of input").
    if text
        .lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---")
    {
        return Err(RulesError(format!(
            "{name}: the file is empty: a rules file needs at least `domain: NAME`"
        )));
    }
    let parsed: FileYaml = serde_saphyr::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("{name}:{}:{}", l.line(), l.column()))
            .unwrap_or_else(|| name.clone());
        RulesError(format!("{at}: {}", parser_message(&e.to_string())))
    })?;
    let domain = parsed.domain.value.trim().to_string();
    if domain.is_empty() {
        return Err(RulesError(format!(
            "{name}:{}: domain must not be empty",
            parsed.domain.referenced.line()
        )));
    }
    let mut builder = Builder {
        file: &name,
        domain: &domain,
        first_id,
        rules: Vec::new(),
    };
    let descriptors = parsed.descriptors.as_deref().unwrap_or_default();
    let level = builder.level(descriptors, "")?;
    let rules = builder.rules;
    warn_unknown_replaces(&name, &rules);
    Ok(File {
        emptied: parsed.descriptors.as_ref().is_some_and(Vec::is_empty),
        domain,
        level,
        rules,
    })
}

/// The parser's message alone: its first line, without the location it repeats or its advice
/// about parser options.
fn parser_message(rendered: &str) -> String {
    let mut m = rendered.lines().next().unwrap_or("invalid YAML").trim();
    m = m.strip_prefix("error: ").unwrap_or(m);
    if let Some((_, rest)) = m.split_once(": ").filter(|_| m.starts_with("line ")) {
        m = rest;
    }
    m.split(", set DuplicateKeyPolicy")
        .next()
        .unwrap_or(m)
        .to_string()
}

struct Builder<'a> {
    file: &'a str,
    domain: &'a str,
    /// The id of this file's first rule (ids run on across the files of a set).
    first_id: usize,
    rules: Vec<Arc<Rule>>,
}

impl Builder<'_> {
    fn level(&mut self, descriptors: &[DescriptorYaml], path: &str) -> Result<Level, RulesError> {
        let mut level = Level::default();
        let mut seen: HashMap<(String, Option<String>), u64> = HashMap::new();
        for d in descriptors {
            let line = d.key.referenced.line();
            let at = |msg: String| RulesError(format!("{}:{line}: {msg}", self.file));
            let key = d.key.value.as_str();
            if key.is_empty() {
                return Err(at("descriptor key must not be empty".into()));
            }
            if d.quota_mode.is_some() {
                return Err(at("quota_mode is not supported by sluicegate".into()));
            }
            if d.metadata.is_some() {
                return Err(at("metadata is not supported by sluicegate".into()));
            }
            let value = d.value.clone().filter(|v| !v.is_empty());
            if let Some(first) = seen.insert((key.to_string(), value.clone()), line) {
                let what = match &value {
                    Some(v) => format!("{key}={v}"),
                    None => key.to_string(),
                };
                return Err(at(format!(
                    "duplicate descriptor {what} (first defined at line {first})"
                )));
            }
            let wildcard = value.as_deref().is_some_and(|v| v.contains('*'));
            if d.share_threshold && !wildcard {
                return Err(at(
                    "share_threshold needs a value with a '*' wildcard".into()
                ));
            }

            let step = match &value {
                Some(v) => format!("{key}={v}"),
                None => key.to_string(),
            };
            let path = if path.is_empty() {
                step
            } else {
                format!("{path}.{step}")
            };
            let rule = match (&d.rate_limit, &d.concurrency) {
                (Some(_), Some(_)) => {
                    return Err(at(
                        "a descriptor has rate_limit or concurrency, not both (sibling descriptors may mix them)".into(),
                    ));
                }
                (Some(rl), None) => Some(self.rule(rl, d, &path, line)?),
                (None, Some(c)) => Some(self.in_flight(c, d, &path, line)?),
                (None, None) => None,
            };
            let node = Node {
                rule,
                children: self.level(&d.descriptors, &path)?,
            };
            match value {
                None => {
                    level.key_only.insert(key.to_string(), node);
                }
                Some(v) if wildcard => level.wildcards.push((
                    key.to_string(),
                    Wildcard::new(&v),
                    d.share_threshold,
                    node,
                )),
                Some(v) => {
                    level
                        .exact
                        .entry(key.to_string())
                        .or_default()
                        .insert(v, node);
                }
            }
        }
        Ok(level)
    }

    /// A `concurrency` rule: an in-flight limit.
    fn in_flight(
        &mut self,
        c: &ConcurrencyYaml,
        d: &DescriptorYaml,
        path: &str,
        line: u64,
    ) -> Result<Arc<Rule>, RulesError> {
        let at_line = |l: u64, msg: String| RulesError(format!("{}:{l}: {msg}", self.file));
        let max = whole("concurrency max", c.max.value, 1)
            .map_err(|m| at_line(c.max.referenced.line(), m))?;
        let lease_ms = match &c.lease {
            Some(l) => lease_ms(&l.value).map_err(|m| at_line(l.referenced.line(), m))?,
            None => DEFAULT_LEASE_MS,
        };
        if d.debt {
            return Err(at_line(
                line,
                "debt needs a rate_limit bucket, not concurrency".into(),
            ));
        }
        let name = c.name.clone().filter(|n| !n.is_empty());
        let label = name.clone().unwrap_or_else(|| path.to_string());
        let rule = Arc::new(Rule {
            id: self.first_id + self.rules.len(),
            domain: self.domain.to_string(),
            label,
            name,
            replaces: Vec::new(),
            limit: Limit::InFlight { max, lease_ms },
            shadow_mode: d.shadow_mode,
            debt: false,
            path: path.to_string(),
            source: format!("{}:{line}", self.file),
        });
        self.rules.push(rule.clone());
        Ok(rule)
    }

    fn rule(
        &mut self,
        rl: &RateLimitYaml,
        d: &DescriptorYaml,
        path: &str,
        line: u64,
    ) -> Result<Arc<Rule>, RulesError> {
        let at = |msg: String| RulesError(format!("{}:{line}: {msg}", self.file));
        let limit = if rl.unlimited {
            if rl.unit.is_some() || rl.requests_per_unit.is_some() {
                return Err(at(
                    "unlimited cannot be combined with unit or requests_per_unit".into(),
                ));
            }
            if rl.burst.is_some() || rl.unit_multiplier.is_some() {
                return Err(at(
                    "unlimited cannot be combined with burst or unit_multiplier".into(),
                ));
            }
            Limit::Unlimited
        } else {
            let unit_text = rl.unit.as_deref().ok_or_else(|| {
                at("rate_limit needs a unit (second to year) or unlimited: true".into())
            })?;
            let unit = Unit::parse(unit_text).ok_or_else(|| {
                at(format!(
                    "invalid unit '{unit_text}': expected second, minute, hour, day, week, month or year"
                ))
            })?;
            let rpu = rl
                .requests_per_unit
                .as_ref()
                .ok_or_else(|| at("rate_limit needs requests_per_unit".into()))?;
            // Errors point at the value's own line.
            let at_value = |v: &Spanned<f64>, msg: String| {
                RulesError(format!("{}:{}: {msg}", self.file, v.referenced.line()))
            };
            let rpu = whole("requests_per_unit", rpu.value, 0).map_err(|m| at_value(rpu, m))?;
            let multiplier = match &rl.unit_multiplier {
                Some(m) => whole("unit_multiplier", m.value, 1).map_err(|e| at_value(m, e))?,
                None => 1,
            };
            Limit::bucket(rpu, unit, multiplier, rl.burst).map_err(at)?
        };
        let name = rl.name.clone().filter(|n| !n.is_empty());
        let mut replaces = Vec::new();
        for r in &rl.replaces {
            if r.name.is_empty() {
                return Err(at("replaces needs a name".into()));
            }
            if name.as_deref() == Some(r.name.as_str()) {
                return Err(at(format!("rule '{}' cannot replace itself", r.name)));
            }
            replaces.push(r.name.clone());
        }
        if d.debt && !matches!(limit, Limit::Bucket { .. }) {
            return Err(at(
                "debt needs a bucket (requests_per_unit above 0, not unlimited)".into(),
            ));
        }
        let label = name.clone().unwrap_or_else(|| path.to_string());
        let rule = Arc::new(Rule {
            id: self.first_id + self.rules.len(),
            domain: self.domain.to_string(),
            label,
            name,
            replaces,
            limit,
            shadow_mode: d.shadow_mode,
            debt: d.debt,
            path: path.to_string(),
            source: format!("{}:{line}", self.file),
        });
        self.rules.push(rule.clone());
        Ok(rule)
    }
}

/// A `replaces` naming no rule of the domain does nothing (as in envoyproxy/ratelimit); say so.
fn warn_unknown_replaces(file: &str, rules: &[Arc<Rule>]) {
    for rule in rules {
        for target in &rule.replaces {
            if !rules
                .iter()
                .any(|r| r.name.as_deref() == Some(target.as_str()))
            {
                tracing::warn!(
                    rule = %rule.source,
                    file,
                    "replaces '{target}', but no rule of domain '{}' has that name",
                    rule.domain
                );
            }
        }
    }
}
