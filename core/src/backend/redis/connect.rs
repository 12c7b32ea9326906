//! How to reach Redis nodes: what every connection shares (scheme, credentials, database, TLS
//! certificates) in a [`Template`], with the address filled in per node, so that cluster nodes
//! and a sentinel-elected master are reached exactly like the node the URL named.

use std::{path::PathBuf, time::Duration};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates};

use crate::backend::{BackendError, ErrorKind};

/// How long one connection attempt may take. Longer than a call's deadline on purpose: attempts
/// run in the background while calls fail fast, so a slow network still connects.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection may stay silent before it is declared broken and replaced. Calls give up
/// much earlier (REDIS_TIMEOUT_MS); this catches a peer that vanished without closing TCP.
pub const DEAD_CONNECTION_AFTER: Duration = Duration::from_secs(2);

/// Private CA and client certificate for `rediss://` (REDIS_TLS_CACERT, REDIS_TLS_CLIENT_CERT,
/// REDIS_TLS_CLIENT_KEY). Without a CA the system's trust store verifies the server.
#[derive(Clone, Debug, Default)]
pub struct RedisTls {
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    fn is_set(&self) -> bool {
        self.ca_cert.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }

    /// The certificates, read now (an unreadable file stops the start).
    fn load(&self) -> Result<Option<TlsCertificates>, BackendError> {
        if !self.is_set() {
            return Ok(None);
        }
        let read = |name: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| invalid(format!("{name} {}: {e}", path.display())))
        };
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("REDIS_TLS_CLIENT_CERT", cert)?,
                client_key: read("REDIS_TLS_CLIENT_KEY", key)?,
            }),
            (None, None) => None,
            _ => {
                return Err(invalid(
                    "REDIS_TLS_CLIENT_CERT and REDIS_TLS_CLIENT_KEY go together".into(),
                ));
            }
        };
        let root_cert = match &self.ca_cert {
            Some(ca) => Some(read("REDIS_TLS_CACERT", ca)?),
            None => None,
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

pub fn invalid(message: String) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Other,
        message,
    }
}

/// The shared settings of a set of nodes, and the address one of them was given at.
#[derive(Clone)]
pub struct Template {
    info: ConnectionInfo,
    certs: Option<TlsCertificates>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info holds the password.
        f.debug_struct("Template")
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

/// `host:port` (envoyproxy/ratelimit's form) or a full URL.
fn with_scheme(entry: &str, scheme: &str) -> String {
    let entry = entry.trim();
    if entry.contains("://") {
        entry.to_string()
    } else {
        format!("{scheme}://{entry}")
    }
}

impl Template {
    /// From one entry of REDIS_URL (`host:port` takes `default_scheme`). Errors never repeat the
    /// entry: it may hold a password.
    pub fn parse(entry: &str, default_scheme: &str, tls: &RedisTls) -> Result<Self, BackendError> {
        let info = with_scheme(entry, default_scheme)
            .as_str()
            .into_connection_info()
            .map_err(|e| {
                invalid(format!(
                    "REDIS_URL: an entry does not parse ({:?})",
                    e.kind()
                ))
            })?;
        let certs = tls.load()?;
        if certs.is_some() && !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(invalid(
                "REDIS_TLS_* are set but REDIS_URL is not rediss://".into(),
            ));
        }
        Ok(Self { info, certs })
    }

    /// The same settings for another node.
    pub fn at(&self, host: &str, port: u16) -> Template {
        let addr = match self.info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_string(), port),
        };
        Template {
            info: self.info.clone().set_addr(addr),
            certs: self.certs.clone(),
        }
    }

    /// `host:port` (the node's label in metrics and logs), or the socket path.
    pub fn addr(&self) -> String {
        match self.info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            ConnectionAddr::Unix(path) => path.display().to_string(),
            _ => "unknown".to_string(),
        }
    }

    /// The `rediss` or `redis` scheme this template connects with.
    pub fn scheme(&self) -> &'static str {
        match self.info.addr() {
            ConnectionAddr::TcpTls { .. } => "rediss",
            _ => "redis",
        }
    }

    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.certs {
            Some(certs) => redis::Client::build_with_tls(self.info.clone(), certs.clone()),
            None => redis::Client::open(self.info.clone()),
        }
    }

    /// A one-off connection (topology queries), within [`CONNECT_TIMEOUT`].
    pub async fn connect_once(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = self.client()?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }
}
