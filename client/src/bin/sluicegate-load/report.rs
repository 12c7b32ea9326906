//! The summary printed after a run, and the JSON file of the README's "Load testing".

use std::time::SystemTime;

use serde::Serialize;

use crate::{
    cli::Cli,
    driver::Run,
    record::{Bound, SlotCounts},
};

#[derive(Serialize)]
pub struct Summary {
    pub api: String,
    /// When the run started (the timeline's second 0), in seconds since the Unix epoch.
    pub started_unix_s: f64,
    pub duration_s: f64,
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    /// `errors` by kind: deadline, shed, unavailable, other (`target::Failure`).
    pub errors_by_kind: std::collections::BTreeMap<&'static str, u64>,
    pub rate: f64,
    /// Leased: calls made to sluicegate (leases and their settles) per decision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calls_per_decision: Option<f64>,
    pub latency_ms: Latency,
    pub bound: BoundJson,
    /// Envoy: outcomes per descriptor, in the order of the --descriptor flags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub descriptors: Option<Vec<DescriptorJson>>,
    pub timeline: Vec<SecondJson>,
}

#[derive(Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Serialize)]
pub struct BoundJson {
    pub checked: bool,
    pub violations: usize,
    pub buckets: usize,
}

#[derive(Serialize)]
pub struct DescriptorJson {
    pub descriptor: String,
    #[serde(flatten)]
    pub counts: SlotCounts,
}

#[derive(Serialize)]
pub struct SecondJson {
    pub second: usize,
    pub allowed: u64,
    pub denied: u64,
    pub errors: u64,
    pub p99_ms: f64,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

impl Summary {
    pub fn new(cli: &Cli, run: &Run, bound: &Bound) -> Self {
        let (rec, elapsed) = (&run.recorded, run.elapsed);
        let h = &rec.latency;
        let q = |p: f64| {
            if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(p))
            }
        };
        Summary {
            api: cli.api.as_str().to_string(),
            started_unix_s: run
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0),
            duration_s: (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            requests: rec.requests,
            allowed: rec.allowed,
            denied: rec.denied,
            errors: rec.errors,
            errors_by_kind: crate::target::Failure::ALL
                .iter()
                .zip(rec.failures)
                .map(|(kind, n)| (kind.as_str(), n))
                .collect(),
            calls_per_decision: run
                .calls
                .map(|(calls, decisions)| calls as f64 / decisions.max(1) as f64),
            rate: (rec.requests as f64 / elapsed.as_secs_f64().max(1e-9) * 10.0).round() / 10.0,
            latency_ms: Latency {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: if h.is_empty() { 0.0 } else { ms(h.max()) },
            },
            bound: BoundJson {
                checked: bound.checked,
                violations: bound.violations,
                buckets: bound.buckets,
            },
            descriptors: (cli.api == crate::cli::Api::Envoy).then(|| {
                cli.descriptors
                    .iter()
                    .zip(&rec.slots)
                    .map(|(d, c)| DescriptorJson {
                        descriptor: d.clone(),
                        counts: *c,
                    })
                    .collect()
            }),
            timeline: rec
                .timeline
                .iter()
                .enumerate()
                .map(|(i, s)| SecondJson {
                    second: i,
                    allowed: s.allowed,
                    denied: s.denied,
                    errors: s.errors,
                    p99_ms: if s.latency.is_empty() {
                        0.0
                    } else {
                        ms(s.latency.value_at_quantile(0.99))
                    },
                })
                .collect(),
        }
    }

    /// The table printed at the end of a run.
    pub fn text(&self, cli: &Cli, bound: &Bound) -> String {
        let mode = match cli.rps {
            Some(rps) => format!("open loop at {rps} req/s"),
            None => format!("closed loop, concurrency {}", cli.concurrency),
        };
        let keys = match cli.zipf {
            Some(s) => format!("{} keys (zipf {s})", cli.keys),
            None => format!("{} keys (uniform)", cli.keys),
        };
        let pct = |n: u64| {
            if self.requests == 0 {
                0.0
            } else {
                n as f64 * 100.0 / self.requests as f64
            }
        };
        let l = &self.latency_ms;
        let kinds: Vec<String> = self
            .errors_by_kind
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let kinds = if kinds.is_empty() {
            String::new()
        } else {
            format!("  ({})", kinds.join(", "))
        };
        let mut out = format!(
            "sluicegate-load: {} against {}, {mode}, {} connections, {keys}\n\
             duration   {:.2} s\n\
             requests   {}\n\
             allowed    {} ({:.1}%)\n\
             denied     {} ({:.1}%)\n\
             errors     {} ({:.2}%){kinds}\n\
             rate       {:.1} req/s\n\
             latency    p50 {:.3} ms   p90 {:.3} ms   p99 {:.3} ms   p99.9 {:.3} ms   max {:.3} ms\n",
            self.api,
            match cli.api {
                crate::cli::Api::Http => cli.url.clone().unwrap_or_default(),
                _ => cli.target.clone(),
            },
            cli.connections,
            self.duration_s,
            self.requests,
            self.allowed,
            pct(self.allowed),
            self.denied,
            pct(self.denied),
            self.errors,
            pct(self.errors),
            self.rate,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        );
        if let Some(ds) = &self.descriptors {
            for (i, d) in ds.iter().enumerate() {
                out.push_str(&format!(
                    "descriptor {i} [{}]: allowed {}  over limit {}  unlimited/unmatched {}\n",
                    d.descriptor, d.counts.allowed, d.counts.denied, d.counts.unlimited
                ));
            }
        }
        if let Some(c) = self.calls_per_decision {
            out.push_str(&format!(
                "calls      {c:.4} per decision (leases and settles)\n"
            ));
        }
        if bound.checked {
            out.push_str(&format!(
                "bound      {} buckets checked, {} violations{}\n",
                bound.buckets,
                bound.violations,
                bound
                    .first
                    .as_deref()
                    .map(|f| format!(" (first: {f})"))
                    .unwrap_or_default()
            ));
        } else {
            out.push_str("bound      not checked (--check-bound)\n");
        }
        out
    }
}
