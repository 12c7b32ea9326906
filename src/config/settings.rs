//! What the server runs with: the flags, checked together once, as plain settings. Nothing here
//! is clap's: an embedding program or a test may build [`Settings`] from flags
//! ([`Settings::from_flags`]) and change what it needs.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use sluicegate_core::backend::redis::{LeaseSettings, RedisTls, Topology};

use super::ServeArgs;
use super::values::{RedisType, RedisUrl};
use crate::api::{EnvoySettings, HeaderNames, ShouldAllowSettings};
use crate::telemetry::LogFormat;

/// Everything `server::run` needs, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub storage: Storage,
    pub grpc: GrpcSettings,
    pub http: HttpSettings,
    /// Rules for the Envoy API (RULES): a file or a directory, hot-reloaded; None: no limits.
    pub rules: Option<PathBuf>,
    pub should_allow: ShouldAllowSettings,
    pub envoy: EnvoySettings,
    /// TOP_KEYS: the size of the denied-keys sketch (0: off).
    pub top_keys: usize,
    /// NEAR_LIMIT_RATIO.
    pub near_limit_ratio: f64,
    /// SHUTDOWN_DELAY_SECS: not ready but still serving, before the drain.
    pub shutdown_delay: Duration,
    /// SHUTDOWN_GRACE_SECS: how long calls in flight may take to finish.
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// The effective configuration by environment variable, REDIS_URL's password redacted: what
    /// the start log and /debug/config show.
    pub effective: serde_json::Map<String, serde_json::Value>,
}

/// Where buckets live.
#[derive(Clone, Debug)]
pub enum Storage {
    /// This process's memory, holding at most `max_buckets` (MEMORY_MAX_BUCKETS).
    Memory {
        max_buckets: usize,
    },
    Redis(RedisSettings),
}

/// Redis, as REDIS_* say.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    pub url: RedisUrl,
    pub topology: Topology,
    pub timeout: Duration,
    pub connections: usize,
    pub deny_cache: bool,
    /// QUOTA_LEASES with LEASE_MS and LEASE_MAX_FRACTION; None: off.
    pub leases: Option<LeaseSettings>,
    pub tls: RedisTls,
}

/// The gRPC port.
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    pub addr: SocketAddr,
    /// GRPC_SERVER_USE_TLS with its files; None: plaintext.
    pub tls: Option<TlsSettings>,
    pub max_message_bytes: usize,
    pub max_concurrent_requests: usize,
    /// MAX_QUEUE_MS: the longest a call waits before its decision, and the adaptive limit's target.
    pub max_queue: Duration,
    /// GRPC_MAX_CONNECTION_AGE_SECS; None: connections live as long as their clients like.
    pub max_connection_age: Option<Duration>,
}

/// TLS on the gRPC port, and mTLS when `client_ca` is set.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// Accepted client certificate SANs; empty: any certificate the CA signed.
    pub client_sans: Vec<String>,
}

/// The HTTP port.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub addr: SocketAddr,
    /// DEBUG_ENDPOINTS: the status page and /debug/*.
    pub debug_endpoints: bool,
    /// DEBUG_SHOW_KEYS: raw keys on the status page and /debug/top.
    pub show_keys: bool,
    /// The Host names the status page and /debug/* answer, lower-cased, without ports.
    pub allowed_hosts: Vec<String>,
}

impl Settings {
    /// Settings from command-line style flags (without the program name); the environment fills
    /// in what they leave out, as for the binary. For tests and embedding programs.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once("sluicegate".into()).chain(flags.into_iter().map(Into::into));
        super::Cli::parse_args(argv)
            .map_err(|e| super::one_line(&e.render().to_string()))?
            .into_serve()
            .ok_or_else(|| "a subcommand other than serve".to_string())?
            .settings()
    }
}

impl ServeArgs {
    /// Checks the values that only make sense together, then makes the settings. Every message
    /// names the variables.
    pub fn settings(self) -> Result<Settings, String> {
        let effective = self.effective();
        let d = &self.decisions;
        let limits = sluicegate_core::Limits {
            max_capacity: d.max_capacity,
            max_rate: d.max_rate,
        };
        let sa = &self.should_allow;
        let shape = sluicegate_core::Shape::new(sa.capacity, sa.rate).map_err(|e| e.to_string())?;
        if sa.capacity > d.max_capacity || sa.rate > d.max_rate {
            return Err(format!(
                "TB_CAPACITY/TB_RATE ({}, {}) exceed MAX_CAPACITY/MAX_RATE ({}, {})",
                sa.capacity, sa.rate, d.max_capacity, d.max_rate
            ));
        }
        check_prefixes(&sa.bucket_prefix, &self.envoy.rls_key_prefix)?;
        Ok(Settings {
            storage: self.storage()?,
            grpc: self.grpc()?,
            http: self.http(),
            rules: self.envoy.rules.clone(),
            should_allow: ShouldAllowSettings {
                shape,
                limits,
                bucket_prefix: sa.bucket_prefix.clone(),
                failure_mode: d.failure_mode,
                shadow_mode: d.shadow_mode,
                allow_client_shapes: d.allow_client_shapes,
                allow_refunds: d.allow_refunds,
                max_batch: sa.max_batch as usize,
            },
            envoy: self.envoy_settings(),
            top_keys: self.http.top_keys as usize,
            near_limit_ratio: d.near_limit_ratio,
            shutdown_delay: Duration::from_secs(self.shutdown.shutdown_delay_secs),
            shutdown_grace: Duration::from_secs(self.shutdown.shutdown_grace_secs),
            log_format: self.log.log_format,
            effective,
        })
    }

    fn storage(&self) -> Result<Storage, String> {
        let s = &self.storage;
        let Some(url) = &s.redis_url else {
            return Ok(Storage::Memory {
                max_buckets: usize::try_from(s.memory_max_buckets).unwrap_or(usize::MAX),
            });
        };
        url.check(s.redis_type)
            .map_err(|e| format!("REDIS_URL: {e}"))?;
        Ok(Storage::Redis(RedisSettings {
            url: url.clone(),
            topology: match s.redis_type {
                RedisType::Single => Topology::Single,
                RedisType::Cluster => Topology::Cluster,
                RedisType::Sentinel => Topology::Sentinel,
            },
            timeout: Duration::from_millis(s.redis_timeout_ms),
            connections: s.redis_connections as usize,
            deny_cache: s.local_deny_cache,
            leases: s.quota_leases.then_some(LeaseSettings {
                lease_ms: s.lease_ms,
                max_fraction: s.lease_max_fraction,
            }),
            tls: RedisTls {
                ca_cert: s.redis_tls_cacert.clone(),
                client_cert: s.redis_tls_client_cert.clone(),
                client_key: s.redis_tls_client_key.clone(),
            },
        }))
    }

    fn grpc(&self) -> Result<GrpcSettings, String> {
        let g = &self.grpc;
        let tls = match (g.grpc_tls, &g.grpc_tls_cert, &g.grpc_tls_key) {
            (true, Some(cert), Some(key)) => Some(TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: g.grpc_client_ca.clone(),
                client_sans: g.grpc_client_san.clone(),
            }),
            (false, None, None) => None,
            (true, _, _) => {
                return Err(
                    "GRPC_SERVER_USE_TLS needs GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY".into(),
                );
            }
            (false, _, _) => {
                return Err(
                    "GRPC_SERVER_TLS_CERT/KEY are set but GRPC_SERVER_USE_TLS is not true".into(),
                );
            }
        };
        if g.grpc_client_ca.is_some() && tls.is_none() {
            return Err("GRPC_CLIENT_TLS_CACERT (mTLS) needs GRPC_SERVER_USE_TLS=true".into());
        }
        if !g.grpc_client_san.is_empty() && g.grpc_client_ca.is_none() {
            return Err("GRPC_CLIENT_TLS_SAN needs GRPC_CLIENT_TLS_CACERT (mTLS)".into());
        }
        Ok(GrpcSettings {
            addr: g.grpc_addr,
            tls,
            max_message_bytes: g.grpc_max_message_bytes as usize,
            max_concurrent_requests: g.max_concurrent_requests as usize,
            max_queue: Duration::from_millis(g.max_queue_ms),
            max_connection_age: (g.grpc_max_connection_age_secs > 0)
                .then(|| Duration::from_secs(g.grpc_max_connection_age_secs)),
        })
    }

    fn http(&self) -> HttpSettings {
        let h = &self.http;
        HttpSettings {
            addr: h.http_addr,
            debug_endpoints: h.debug_endpoints,
            show_keys: h.debug_show_keys,
            allowed_hosts: allowed_hosts(&h.http_allowed_hosts, h.http_addr),
        }
    }

    fn envoy_settings(&self) -> EnvoySettings {
        let (e, d) = (&self.envoy, &self.decisions);
        EnvoySettings {
            key_prefix: e.rls_key_prefix.clone(),
            charge_on_deny: e.charge_on_deny,
            max_descriptors: e.max_descriptors as usize,
            max_key_bytes: e.max_key_bytes as usize,
            response_headers: e.limit_response_headers_enabled.then(|| HeaderNames {
                limit: e.limit_limit_header.clone(),
                remaining: e.limit_remaining_header.clone(),
                reset: e.limit_reset_header.clone(),
            }),
            dynamic_metadata: e.response_dynamic_metadata,
            failure_mode: d.failure_mode,
            shadow_mode: d.shadow_mode,
            allow_client_shapes: d.allow_client_shapes,
            allow_refunds: d.allow_refunds,
        }
    }
}

/// BUCKET_PREFIX and RLS_KEY_PREFIX: set, and neither starting with the other, so that no
/// ShouldAllow key can name an Envoy bucket.
fn check_prefixes(a: &str, b: &str) -> Result<(), String> {
    for (name, prefix) in [("BUCKET_PREFIX", a), ("RLS_KEY_PREFIX", b)] {
        if prefix.is_empty() {
            return Err(format!(
                "{name} must not be empty: it keeps ShouldAllow and Envoy buckets apart"
            ));
        }
    }
    if a.starts_with(b) || b.starts_with(a) {
        return Err(format!(
            "BUCKET_PREFIX ('{a}') and RLS_KEY_PREFIX ('{b}') overlap: one starts with the \
             other, so a ShouldAllow key could name an Envoy bucket"
        ));
    }
    Ok(())
}

/// HTTP_ALLOWED_HOSTS, or its default: localhost, 127.0.0.1, ::1 and HTTP_ADDR's IP.
fn allowed_hosts(given: &[String], http_addr: SocketAddr) -> Vec<String> {
    if !given.is_empty() {
        return given
            .iter()
            .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
    }
    let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    let ip = http_addr.ip();
    if !ip.is_unspecified() && !hosts.contains(&ip.to_string()) {
        hosts.push(ip.to_string());
    }
    hosts
}
