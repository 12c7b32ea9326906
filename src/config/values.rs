//! The values flags take: Redis URLs (never shown with their password), listen addresses, header
//! names, numbers in range, and the one way every bool flag is read.

use std::{fmt, net::SocketAddr, str::FromStr};

use clap::{Arg, ArgAction, ValueEnum};

/// How REDIS_URL is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisType {
    #[default]
    Single,
    Cluster,
    Sentinel,
}

/// A Redis URL (or comma-separated list). Never printed with its password, not even when it does
/// not parse.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

const URL_SCHEMES: &[&str] = &["redis", "rediss", "unix", "redis+unix"];

impl RedisUrl {
    /// The URL itself, to hand to the Redis client. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, fit for logs.
    pub fn redacted(&self) -> String {
        self.entries()
            .map(|part| {
                if !part.contains("://") {
                    return part.to_string();
                }
                match url::Url::parse(part) {
                    Ok(mut u) => {
                        if u.password().is_some() {
                            let _ = u.set_password(Some("***"));
                        }
                        u.to_string()
                    }
                    // Whatever does not parse may still hold a password: never shown.
                    Err(_) => "<unparsable URL>".to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn entries(&self) -> impl Iterator<Item = &str> {
        self.0.split(',').map(str::trim).filter(|s| !s.is_empty())
    }

    /// Checks the URL against the topology: one URL for single; `host:port` or URLs for cluster;
    /// `master_name,host:port,...` for sentinel. Messages never repeat the value.
    pub fn check(&self, kind: RedisType) -> Result<(), String> {
        let entries: Vec<&str> = self.entries().collect();
        let url = |e: &str, i: usize| -> Result<(), String> {
            let u = url::Url::parse(e).map_err(|err| {
                format!("entry {} is not a valid URL ({err}; the value is not shown, it may hold a password)", i + 1)
            })?;
            if !URL_SCHEMES.contains(&u.scheme()) {
                return Err(format!(
                    "entry {}: scheme '{}' is not redis://, rediss:// or unix://",
                    i + 1,
                    u.scheme()
                ));
            }
            if u.scheme().starts_with("redis") && u.host_str().is_none_or(str::is_empty) {
                return Err(format!("entry {} has no host", i + 1));
            }
            let db = u.path().trim_start_matches('/');
            if u.scheme().starts_with("redis") && !db.is_empty() && db.parse::<u16>().is_err() {
                return Err(format!("entry {}: the database must be a number", i + 1));
            }
            Ok(())
        };
        let node = |e: &str, i: usize| -> Result<(), String> {
            if e.contains("://") {
                return url(e, i);
            }
            match e.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
                _ => Err(format!(
                    "entry {} must be host:port or a redis:// URL, e.g. 10.0.0.1:6379",
                    i + 1
                )),
            }
        };
        match kind {
            RedisType::Single => {
                if entries.len() != 1 {
                    return Err("with REDIS_TYPE=single, expected one redis:// or rediss:// URL (a list is for cluster or sentinel)".into());
                }
                if !entries[0].contains("://") {
                    return Err(
                        "expected a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0"
                            .into(),
                    );
                }
                url(entries[0], 0)
            }
            RedisType::Cluster => {
                if entries.is_empty() {
                    return Err("with REDIS_TYPE=cluster, expected host:port[,host:port...]".into());
                }
                entries.iter().enumerate().try_for_each(|(i, e)| node(e, i))
            }
            RedisType::Sentinel => {
                let Some((master, sentinels)) = entries.split_first() else {
                    return Err("expected master_name,host:port[,host:port...]".into());
                };
                // The master entry is a name, or `redis[s]://[:password@]name` to give the
                // master's credentials and TLS.
                let bad_master = if master.contains("://") {
                    url(master, 0).is_err()
                } else {
                    master.contains(':')
                };
                if bad_master || sentinels.is_empty() {
                    return Err("with REDIS_TYPE=sentinel, expected master_name,host:port[,host:port...] (the master may be redis://:password@master_name)".into());
                }
                sentinels
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, e)| node(e, i + 1))
            }
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected a redis:// or rediss:// URL, got an empty value".into());
        }
        // The form depends on REDIS_TYPE: checked when the settings are made.
        Ok(Self(s.to_string()))
    }
}

pub(super) fn display<T: fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub(super) fn redacted<S: serde::Serializer>(
    v: &Option<RedisUrl>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&url.redacted()),
        None => s.serialize_none(),
    }
}

/// A listen address: `IP:PORT`; also `:PORT` (every interface, as Go programs take it) and
/// `localhost:PORT` (loopback).
pub(super) fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let port = |p: &str| p.parse::<u16>().ok();
    let addr = match s.rsplit_once(':') {
        Some(("", p)) => port(p).map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        Some(("localhost", p)) => port(p).map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        _ => None,
    };
    addr.ok_or_else(|| {
        format!(
            "expected IP:PORT, e.g. 0.0.0.0:8081 (every interface) or 127.0.0.1:8081, got '{s}'"
        )
    })
}

/// An HTTP header name (LIMIT_*_HEADER).
pub(super) fn header_name(s: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(s.as_bytes())
        .map(|_| s.to_string())
        .map_err(|_| format!("expected an HTTP header name such as RateLimit-Limit, got '{s}'"))
}

/// NEAR_LIMIT_RATIO: a fraction of the capacity.
pub(super) fn ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected a number between 0 and 1, such as 0.8, got '{s}'"
        )),
    }
}

/// MAX_CAPACITY, MAX_RATE: positive, and at most 1e15 (the README's "The token bucket").
pub(super) fn shape_bound(s: &str) -> Result<f64, String> {
    let v = positive_f64(s)?;
    if v > sluicegate_core::MAX_SHAPE {
        return Err(format!(
            "expected at most 1e15 (larger shapes lose token precision), got '{s}'"
        ));
    }
    Ok(v)
}

pub(super) fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a finite number greater than 0, got '{s}'"
        )),
    }
}

pub(super) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("expected true or false, got '{s}'")),
    }
}

/// Every bool flag reads the same way: `--flag` alone or `--flag=true|false|1|0|yes|no|on|off`,
/// and its variable the same words. Applied to the whole command line, so a bool field needs no
/// attribute for it.
pub(super) fn switch(arg: Arg) -> Arg {
    if !matches!(arg.get_action(), ArgAction::SetTrue) {
        return arg;
    }
    let arg = if arg.get_default_values().is_empty() {
        arg.default_value("false")
    } else {
        arg
    };
    arg.action(ArgAction::Set)
        .num_args(0..=1)
        .default_missing_value("true")
        .value_parser(parse_bool)
}
