//! Who a request counts against, i.e. its ShouldAllow key.

use std::{fmt, net::SocketAddr, str::FromStr};

use axum::{extract::ConnectInfo, http::HeaderMap};
use http::request::Parts;
use sluicegate_client::KeyError;

/// The identity policy (IDENTITY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The client address: `ip:<addr>`.
    Ip,
    /// The `X-API-Key` header: `key:<value>`.
    ApiKey,
    /// The `X-User` header: `user:<value>`.
    User,
}

impl FromStr for Identity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ip" => Ok(Identity::Ip),
            "api-key" | "api_key" | "apikey" => Ok(Identity::ApiKey),
            "user" => Ok(Identity::User),
            other => Err(format!("expected ip, api-key or user, got '{other}'")),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Identity::Ip => "ip",
            Identity::ApiKey => "api-key",
            Identity::User => "user",
        })
    }
}

/// A request without the header its identity needs.
#[derive(Debug, PartialEq, Eq)]
pub struct MissingIdentity(pub &'static str);

impl Identity {
    /// The bucket key of a request head: for the rate-limit layer and the generate route. A
    /// missing header is a 401, never a shared bucket.
    pub fn key(self, parts: &Parts, trust_forwarded: bool) -> Result<String, KeyError> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.key_of(&parts.headers, peer, trust_forwarded)
            .map_err(|missing| {
                KeyError::unauthorized(format!("missing {} header (IDENTITY={self})", missing.0))
            })
    }

    fn key_of(
        self,
        headers: &HeaderMap,
        peer: SocketAddr,
        trust_forwarded: bool,
    ) -> Result<String, MissingIdentity> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .ok_or(MissingIdentity(name))
        };
        Ok(match self {
            Identity::Ip => format!("ip:{}", client_ip(headers, peer, trust_forwarded)),
            Identity::ApiKey => format!("key:{}", header("x-api-key")?),
            Identity::User => format!("user:{}", header("x-user")?),
        })
    }
}

/// The client address: the peer, or behind a trusted proxy the last `X-Forwarded-For` entry (the
/// one the proxy appended; earlier entries are whatever the client sent).
fn client_ip(headers: &HeaderMap, peer: SocketAddr, trust_forwarded: bool) -> String {
    if trust_forwarded {
        let last = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|v| !v.is_empty());
        if let Some(ip) = last.and_then(|v| v.parse::<std::net::IpAddr>().ok()) {
            return ip.to_string();
        }
    }
    peer.ip().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn keys_per_policy() {
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let h = headers(&[("x-api-key", "abc"), ("x-user", "ann")]);
        assert_eq!(Identity::Ip.key_of(&h, peer, false).unwrap(), "ip:10.1.2.3");
        assert_eq!(Identity::ApiKey.key_of(&h, peer, false).unwrap(), "key:abc");
        assert_eq!(Identity::User.key_of(&h, peer, false).unwrap(), "user:ann");
        let none = HeaderMap::new();
        assert_eq!(
            Identity::ApiKey.key_of(&none, peer, false),
            Err(MissingIdentity("x-api-key"))
        );
        let blank = headers(&[("x-user", "  ")]);
        assert_eq!(
            Identity::User.key_of(&blank, peer, false),
            Err(MissingIdentity("x-user"))
        );
    }

    #[test]
    fn forwarded_only_when_trusted_and_last_entry_wins() {
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 9.9.9.9")]);
        assert_eq!(
            Identity::Ip.key_of(&h, peer, false).unwrap(),
            "ip:127.0.0.1"
        );
        assert_eq!(Identity::Ip.key_of(&h, peer, true).unwrap(), "ip:9.9.9.9");
        let bad = headers(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(
            Identity::Ip.key_of(&bad, peer, true).unwrap(),
            "ip:127.0.0.1"
        );
    }
}
