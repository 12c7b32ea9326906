//! What sluicegate-load can call, behind one `call`: ShouldAllow (and Settle), Envoy's
//! ShouldRateLimit, an HTTP GET, or Acquire/Release. Each answer says allowed or denied per
//! bucket it touched.

use std::time::Duration;

use anyhow::Context as _;
use sluicegate_client::proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor::Entry,
};
use sluicegate_client::proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, rate_limit_response::Code,
    rate_limit_service_client::RateLimitServiceClient as EnvoyClient,
};
use sluicegate_client::proto::sluicegate::v1::{
    SettleRequest, ShouldAllowRequest, rate_limit_service_client::RateLimitServiceClient,
};
use sluicegate_core::rules::{Limit, RuleSet, load_path};
use tonic::transport::{Channel, Endpoint};

use crate::cli::{Api, Cli};

/// How long `--api settle`'s reservations wait for their Settle (which follows at once).
const RESERVE_TTL_MS: u32 = 60_000;

/// The outcome of one descriptor (or the single bucket of should-allow and http).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Allowed,
    Denied,
    /// Envoy: OK with no current limit (no rule, or unlimited).
    Unlimited,
}

/// One bucket's answer, with the shape it was decided under when the answer tells it.
#[derive(Clone, Copy, Debug)]
pub struct BucketAnswer {
    pub slot: u16,
    pub verdict: Verdict,
    /// (capacity, rate)
    pub shape: Option<(f64, f64)>,
    /// The tokens the call charged to this bucket when allowed (what was settled, for settle).
    pub tokens: u32,
    /// Concurrency: when the slot was surely held (µs since the start): from the granted answer's
    /// arrival to the release's sending, inside the server's own hold.
    pub held_us: Option<(u64, u64)>,
    /// Leased: when the tokens were taken from the bucket (µs since the start: the lease call's
    /// sending and answer), before this call.
    pub taken_us: Option<(u64, u64)>,
}

/// Why a call got no answer, as the overload benchmark tells them apart: a deadline that passed
/// (the client's own timeout or the server's DEADLINE_EXCEEDED), a call the server shed
/// (RESOURCE_EXHAUSTED), a connection that failed or was torn down (UNAVAILABLE, a GOAWAY, a
/// reset), or anything else (an unexpected status or HTTP code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    Deadline,
    Shed,
    Unavailable,
    Other,
}

impl Failure {
    pub const ALL: [Failure; 4] = [
        Failure::Deadline,
        Failure::Shed,
        Failure::Unavailable,
        Failure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Deadline => "deadline",
            Failure::Shed => "shed",
            Failure::Unavailable => "unavailable",
            Failure::Other => "other",
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        match s.code() {
            // tonic's client reports its own timeout as Cancelled ("Timeout expired").
            Code::DeadlineExceeded | Code::Cancelled => Failure::Deadline,
            Code::ResourceExhausted => Failure::Shed,
            Code::Unavailable => Failure::Unavailable,
            // A connection torn down under a call in flight (a GOAWAY, a reset stream): tonic
            // makes it Unknown or Internal with the transport error as its source.
            Code::Unknown | Code::Internal if std::error::Error::source(&s).is_some() => {
                Failure::Unavailable
            }
            _ => Failure::Other,
        }
    }
}

/// The client library's errors: it folds deadlines, sheds and transport failures into
/// `Unavailable` (its failure mode's trigger), so only what sluicegate refused is told apart.
impl From<sluicegate_client::Error> for Failure {
    fn from(e: sluicegate_client::Error) -> Self {
        match e {
            sluicegate_client::Error::Unavailable(_) => Failure::Unavailable,
            _ => Failure::Other,
        }
    }
}

impl From<reqwest::Error> for Failure {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            Failure::Deadline
        } else if e.is_connect() || e.is_request() {
            Failure::Unavailable
        } else {
            Failure::Other
        }
    }
}

/// A call's result: an answer, or why there was none.
pub type Reply = Result<(bool, Vec<BucketAnswer>), Failure>;

pub enum Target {
    ShouldAllow {
        clients: Vec<RateLimitServiceClient<Channel>>,
        cost: u32,
        capacity: f64,
        rate: f64,
        timeout: Duration,
        /// Reserve `cost`, then settle a random real cost up to twice it.
        settle: bool,
    },
    Envoy {
        clients: Vec<EnvoyClient<Channel>>,
        domain: String,
        /// Each descriptor as (key, value template) entries.
        descriptors: Vec<Vec<(String, String)>>,
        hits: u32,
        shape: Option<(f64, f64)>,
        /// The rules sluicegate serves, for each bucket's real shape.
        rules: Option<RuleSet>,
        timeout: Duration,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: Vec<(String, String)>,
        shape: (Option<f64>, f64),
    },
    Leased {
        /// One per --target (replica), each with its own leases.
        leased: Vec<sluicegate_client::LeasedClient>,
        cost: u32,
        capacity: f64,
        rate: f64,
    },
    InFlight {
        clients: Vec<RateLimitServiceClient<Channel>>,
        max: u32,
        ttl_ms: u32,
        hold: Duration,
        timeout: Duration,
    },
}

impl Target {
    /// Connects (and fails fast when the target is unreachable).
    pub async fn connect(cli: &Cli) -> anyhow::Result<Self> {
        Ok(match cli.api {
            Api::ShouldAllow | Api::Settle => Target::ShouldAllow {
                clients: channels(cli)
                    .await?
                    .into_iter()
                    .map(RateLimitServiceClient::new)
                    .collect(),
                cost: cli.cost,
                capacity: cli.capacity.unwrap_or(0.0),
                rate: cli.rate.unwrap_or(0.0),
                timeout: cli.timeout,
                settle: cli.api == Api::Settle,
            },
            Api::Leased => Target::Leased {
                leased: leased_clients(cli)?,
                cost: cli.cost,
                capacity: cli.capacity.unwrap_or(0.0),
                rate: cli.rate.unwrap_or(0.0),
            },
            Api::Concurrency => Target::InFlight {
                clients: channels(cli)
                    .await?
                    .into_iter()
                    .map(RateLimitServiceClient::new)
                    .collect(),
                max: cli.max_in_flight,
                ttl_ms: u32::try_from(cli.lease_ttl.as_millis())
                    .unwrap_or(u32::MAX)
                    .max(1),
                hold: cli.hold,
                timeout: cli.timeout,
            },
            Api::Envoy => Target::Envoy {
                clients: channels(cli)
                    .await?
                    .into_iter()
                    .map(EnvoyClient::new)
                    .collect(),
                domain: cli.domain.clone(),
                descriptors: cli
                    .descriptors
                    .iter()
                    .map(|d| parse_descriptor(d))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?,
                hits: cli.cost,
                shape: cli.capacity.zip(cli.rate),
                rules: cli
                    .rules
                    .as_deref()
                    .map(load_path)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--rules: {e}"))?,
                timeout: cli.timeout,
            },
            Api::Http => {
                let url = cli.url.clone().context("--url")?;
                let headers = cli
                    .headers
                    .iter()
                    .map(|h| {
                        h.split_once(':')
                            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                            .ok_or_else(|| {
                                anyhow::anyhow!("--header '{h}': expected 'Name: value'")
                            })
                    })
                    .collect::<anyhow::Result<_>>()?;
                let client = reqwest::Client::builder()
                    .timeout(cli.timeout)
                    .pool_max_idle_per_host(cli.concurrency.max(cli.connections))
                    .tcp_nodelay(true)
                    .build()?;
                // Reachability without spending a token: connect to the host's port.
                let parsed =
                    reqwest::Url::parse(&url.replace("{key}", "probe")).context("--url")?;
                let host = parsed.host_str().context("--url has no host")?.to_string();
                let port = parsed.port_or_known_default().unwrap_or(80);
                tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                .map_err(|_| anyhow::anyhow!("{url}: no connection within 3 s"))?
                .with_context(|| format!("{url}: unreachable"))?;
                Target::Http {
                    client,
                    url,
                    headers,
                    shape: (cli.capacity, cli.rate.unwrap_or(0.0)),
                }
            }
        })
    }

    /// How many buckets (descriptors) each call touches.
    pub fn slots(&self) -> usize {
        match self {
            Target::Envoy { descriptors, .. } => descriptors.len(),
            _ => 1,
        }
    }

    /// Leased: calls made to sluicegate and decisions answered, over the whole run; the leases'
    /// unspent tokens are given back first.
    pub async fn finish(&self) -> Option<(u64, u64)> {
        let Target::Leased { leased, .. } = self else {
            return None;
        };
        let (mut calls, mut decisions) = (0, 0);
        for l in leased {
            l.close().await;
            let s = l.stats();
            calls += s.calls;
            decisions += s.decisions;
        }
        Some((calls, decisions))
    }

    /// One call for `key`, over connection `conn`; `start` is the run's (for hold times).
    pub async fn call(&self, conn: usize, key: &str, start: std::time::Instant) -> Reply {
        match self {
            Target::Leased {
                leased,
                cost,
                capacity,
                rate,
            } => {
                let req = sluicegate_client::Request {
                    key,
                    cost: *cost,
                    capacity: *capacity,
                    rate: *rate,
                    ..Default::default()
                };
                let d = leased[conn % leased.len()]
                    .decide(req)
                    .await
                    .map_err(Failure::from)?;
                let since =
                    |t: std::time::Instant| t.saturating_duration_since(start).as_micros() as u64;
                let allowed = d.decision.allowed;
                Ok((
                    allowed,
                    vec![BucketAnswer {
                        slot: 0,
                        verdict: if allowed {
                            Verdict::Allowed
                        } else {
                            Verdict::Denied
                        },
                        shape: Some((d.decision.capacity, d.decision.rate)),
                        tokens: (*cost).max(1),
                        held_us: None,
                        taken_us: d.taken.map(|(a, b)| (since(a), since(b))),
                    }],
                ))
            }
            Target::InFlight {
                clients,
                max,
                ttl_ms,
                hold,
                timeout,
            } => {
                let client = clients[conn % clients.len()].clone();
                hold_a_slot(client, key, (*max, *ttl_ms), *hold, *timeout, start).await
            }
            Target::ShouldAllow {
                clients,
                cost,
                capacity,
                rate,
                timeout,
                settle,
            } => {
                let mut client = clients[conn % clients.len()].clone();
                let mut req = tonic::Request::new(ShouldAllowRequest {
                    key: key.to_string(),
                    cost: *cost,
                    capacity: *capacity,
                    rate: *rate,
                    dry_run: false,
                    // Settled by its reservation id: the refund is at most what was taken, once.
                    reserve_ttl_ms: if *settle { RESERVE_TTL_MS } else { 0 },
                    up_to: false,
                });
                req.set_timeout(*timeout);
                let r = client
                    .should_allow(req)
                    .await
                    .map_err(Failure::from)?
                    .into_inner();
                let verdict = if r.allowed {
                    Verdict::Allowed
                } else {
                    Verdict::Denied
                };
                let mut charged = (*cost).max(1);
                if *settle && r.allowed {
                    // The work cost between nothing and twice the estimate: refunds and debts.
                    charged = rand::random_range(0..=2 * charged);
                    let mut req = tonic::Request::new(SettleRequest {
                        key: key.to_string(),
                        capacity: *capacity,
                        rate: *rate,
                        reserved: u64::from((*cost).max(1)),
                        actual: u64::from(charged),
                        reservation_id: r.reservation_id.clone(),
                    });
                    req.set_timeout(*timeout);
                    client.settle(req).await.map_err(Failure::from)?;
                }
                Ok((
                    r.allowed,
                    vec![BucketAnswer {
                        slot: 0,
                        verdict,
                        shape: Some((r.capacity, r.rate)),
                        tokens: charged,
                        held_us: None,
                        taken_us: None,
                    }],
                ))
            }
            Target::Envoy {
                clients,
                domain,
                descriptors,
                hits,
                shape,
                rules,
                timeout,
            } => {
                let mut client = clients[conn % clients.len()].clone();
                let descriptors: Vec<RateLimitDescriptor> = descriptors
                    .iter()
                    .map(|entries| RateLimitDescriptor {
                        entries: entries
                            .iter()
                            .map(|(k, v)| Entry {
                                key: k.clone().into_bytes(),
                                value: v.replace("{key}", key).into_bytes(),
                            })
                            .collect(),
                        ..Default::default()
                    })
                    .collect();
                // The rule each descriptor matches, when the rules are known: its true shape.
                let rule_shapes: Vec<Option<(f64, f64)>> = descriptors
                    .iter()
                    .map(|d| {
                        let set = rules.as_ref()?;
                        let entries = d.entries.iter().map(|e| (&e.key, &e.value));
                        match set.lookup("", domain, entries)?.rule.limit {
                            Limit::Bucket { shape, .. } => Some((shape.capacity(), shape.rate())),
                            _ => None,
                        }
                    })
                    .collect();
                let mut req = tonic::Request::new(RateLimitRequest {
                    domain: domain.clone(),
                    descriptors,
                    hits_addend: *hits,
                });
                req.set_timeout(*timeout);
                let r = client
                    .should_rate_limit(req)
                    .await
                    .map_err(Failure::from)?
                    .into_inner();
                let answers = r
                    .statuses
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        let limit_shape = s.current_limit.as_ref().and_then(|l| {
                            let secs = unit_seconds(l.unit)?;
                            let rpu = f64::from(l.requests_per_unit);
                            Some((rpu, rpu / secs))
                        });
                        let verdict = match (s.code == Code::OverLimit as i32, &s.current_limit) {
                            (true, _) => Verdict::Denied,
                            (false, Some(_)) => Verdict::Allowed,
                            (false, None) => Verdict::Unlimited,
                        };
                        BucketAnswer {
                            slot: i as u16,
                            verdict,
                            shape: shape.or(rule_shapes[i]).or(limit_shape),
                            tokens: (*hits).max(1),
                            held_us: None,
                            taken_us: None,
                        }
                    })
                    .collect();
                Ok((r.overall_code == Code::Ok as i32, answers))
            }
            Target::Http {
                client,
                url,
                headers,
                shape,
            } => {
                let mut req = client.get(url.replace("{key}", key));
                for (k, v) in headers {
                    req = req.header(k, v.replace("{key}", key));
                }
                let r = req.send().await.map_err(Failure::from)?;
                let status = r.status().as_u16();
                let header_capacity = r
                    .headers()
                    .get("x-ratelimit-limit")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.split([',', ';']).next()?.trim().parse::<f64>().ok());
                let _ = r.bytes().await; // read the body so the connection is reused
                let allowed = match status {
                    200..=299 => true,
                    429 => false,
                    // A shedding server in front of the app (the demo's own 503s included).
                    503 => return Err(Failure::Shed),
                    _ => return Err(Failure::Other),
                };
                let capacity = shape.0.or(header_capacity);
                let verdict = if allowed {
                    Verdict::Allowed
                } else {
                    Verdict::Denied
                };
                Ok((
                    allowed,
                    vec![BucketAnswer {
                        slot: 0,
                        verdict,
                        shape: capacity.map(|c| (c, shape.1)),
                        tokens: 1,
                        held_us: None,
                        taken_us: None,
                    }],
                ))
            }
        }
    }
}

/// Acquire a slot of `key`; when granted, hold it a random time up to `hold` (the work), then
/// Release it. A release that fails is an error (the slot stays held until its TTL).
async fn hold_a_slot(
    mut client: RateLimitServiceClient<Channel>,
    key: &str,
    (max, ttl_ms): (u32, u32),
    hold: Duration,
    timeout: Duration,
    start: std::time::Instant,
) -> Reply {
    use sluicegate_client::proto::sluicegate::v1::{AcquireRequest, ReleaseRequest};
    let mut req = tonic::Request::new(AcquireRequest {
        key: key.to_string(),
        max_in_flight: max,
        lease_ttl_ms: ttl_ms,
    });
    req.set_timeout(timeout);
    let lease = client
        .acquire(req)
        .await
        .map_err(Failure::from)?
        .into_inner();
    let since = |t: std::time::Instant| t.saturating_duration_since(start).as_micros() as u64;
    let mut answer = BucketAnswer {
        slot: 0,
        verdict: Verdict::Denied,
        shape: None,
        tokens: 1,
        held_us: None,
        taken_us: None,
    };
    if !lease.granted {
        return Ok((false, vec![answer]));
    }
    let from = since(std::time::Instant::now());
    tokio::time::sleep(hold.mul_f64(rand::random::<f64>())).await;
    let to = since(std::time::Instant::now());
    let mut req = tonic::Request::new(ReleaseRequest {
        key: key.to_string(),
        lease_id: lease.lease_id,
    });
    req.set_timeout(timeout);
    client.release(req).await.map_err(Failure::from)?;
    answer.verdict = Verdict::Allowed;
    answer.held_us = Some((from, to));
    Ok((true, vec![answer]))
}

/// One leased client per `--target` (each replica's own leases, as separate processes would
/// hold), over a `sluicegate-client` Client with `--timeout`.
fn leased_clients(cli: &Cli) -> anyhow::Result<Vec<sluicegate_client::LeasedClient>> {
    cli.target
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            let client = sluicegate_client::Client::builder(t)
                .timeout(cli.timeout)
                .build()
                .with_context(|| format!("--target {t}"))?;
            Ok(sluicegate_client::LeasedClient::new(
                client,
                sluicegate_client::LeasePolicy::default(),
            ))
        })
        .collect()
}

/// `--connections` HTTP/2 connections, spread over the comma-separated `--target`s (several
/// replicas of sluicegate sharing one Redis), each checked before the run.
async fn channels(cli: &Cli) -> anyhow::Result<Vec<Channel>> {
    let targets: Vec<&str> = cli
        .target
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let endpoints = targets
        .iter()
        .map(|t| {
            Ok(Endpoint::from_shared(t.to_string())
                .with_context(|| format!("--target {t}"))?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(cli.connections.max(targets.len()));
    for i in 0..cli.connections.max(targets.len()) {
        let (endpoint, target) = (&endpoints[i % endpoints.len()], targets[i % targets.len()]);
        out.push(
            endpoint
                .connect()
                .await
                .with_context(|| format!("{target}: unreachable"))?,
        );
    }
    Ok(out)
}

/// 'k=v,k2=v2' into entries.
fn parse_descriptor(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("--descriptor '{text}': expected 'key=value[,key=value]'"))
        })
        .collect()
}

/// Seconds in an Envoy `RateLimit.Unit`.
fn unit_seconds(unit: i32) -> Option<f64> {
    Some(match unit {
        1 => 1.0,
        2 => 60.0,
        3 => 3_600.0,
        4 => 86_400.0,
        5 => 2_592_000.0,
        6 => 31_536_000.0,
        7 => 604_800.0,
        _ => return None,
    })
}
