//! `rediss://`: sluicegate talks TLS to a real redis-server (its TLS port only), trusting the CA named
//! by SSL_CERT_FILE, and refuses a server its trust store does not vouch for.

use std::{path::Path, process::Command, time::Duration};

use crate::support::{Sluicegate, ask, eventually, free_port, should_allow};
use tonic::Code;

/// A test CA and a server certificate for localhost signed by it: ca.pem, server.pem, server.key.
fn certificates(dir: &Path) -> crate::support::pki::Ca {
    let ca = crate::support::pki::Ca::new(dir, "ca");
    ca.issue("server", &["DNS:localhost", "IP:127.0.0.1"], "serverAuth");
    ca
}

/// A redis-server on its TLS port only (certificates from [`certificates`] in `dir`), asking for
/// client certificates when `auth_clients`; killed when dropped.
struct TlsRedis(std::process::Child);

impl TlsRedis {
    fn start(dir: &Path, port: u16, auth_clients: bool, extra: &[&str]) -> Self {
        let d = |f: &str| dir.join(f).display().to_string();
        let auth = if auth_clients { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args([
                "--tls-cert-file",
                &d("server.pem"),
                "--tls-key-file",
                &d("server.key"),
            ])
            .args([
                "--tls-ca-cert-file",
                &d("ca.pem"),
                "--tls-auth-clients",
                auth,
            ])
            .args(extra)
            .args(["--save", "", "--appendonly", "no", "--dir", &d("")])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} ({e})", crate::support::INSTALL_REDIS));
        Self(child)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn rediss_with_a_trusted_ca_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let port = free_port();
    let d = |f: &str| dir.path().join(f).display().to_string();
    let _redis = TlsRedis::start(dir.path(), port, false, &[]);
    let url = format!("rediss://localhost:{port}/0");

    let trusted = Sluicegate::start(
        &["--redis-timeout-ms", "1000"],
        &[("REDIS_URL", &url), ("SSL_CERT_FILE", &d("ca.pem"))],
    )
    .await;
    let mut c = trusted.client().await;
    eventually(Duration::from_secs(10), "a decision over TLS", async || {
        should_allow(&mut c, ask("tls", 2.0, 1e-6, 1)).await.is_ok()
    })
    .await;
    let r = should_allow(&mut c, ask("tls", 2.0, 1e-6, 1))
        .await
        .unwrap();
    assert!(
        r.allowed && r.tokens_remaining < 0.5 && !r.degraded,
        "{r:?}"
    );

    // The system's trust store does not know the test CA: the handshake must fail.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let untrusting = Sluicegate::start(
        &["--redis-timeout-ms", "300"],
        &[
            ("REDIS_URL", &url),
            ("SSL_CERT_FILE", empty.to_str().unwrap()),
        ],
    )
    .await;
    let mut c = untrusting.client().await;
    let err = should_allow(&mut c, ask("tls", 2.0, 1e-6, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// A TLS-only redis-server that requires client certificates (`--tls-auth-clients yes`), reached
/// with REDIS_TLS_CACERT and a client certificate, as a single server and as a cluster node's
/// template would be; without the client certificate it is refused.
#[tokio::test]
async fn rediss_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    let (client_cert, client_key) = ca.issue("sluicegate", &["DNS:sluicegate"], "clientAuth");
    let port = free_port();
    let d = |f: &str| dir.path().join(f).display().to_string();
    let _redis = TlsRedis::start(dir.path(), port, true, &["--requirepass", "s3cret"]);
    let url = format!("rediss://:s3cret@localhost:{port}/0");
    let with_cert = Sluicegate::start(
        &[
            "--redis-timeout-ms",
            "1000",
            "--redis-tls-cacert",
            &d("ca.pem"),
            "--redis-tls-client-cert",
            client_cert.to_str().unwrap(),
            "--redis-tls-client-key",
            client_key.to_str().unwrap(),
        ],
        &[("REDIS_URL", &url)],
    )
    .await;
    let mut c = with_cert.client().await;
    eventually(
        Duration::from_secs(10),
        "a decision over mTLS",
        async || {
            should_allow(&mut c, ask("mtls", 2.0, 1e-6, 1))
                .await
                .is_ok()
        },
    )
    .await;
    let r = should_allow(&mut c, ask("mtls", 2.0, 1e-6, 1))
        .await
        .unwrap();
    assert!(r.allowed && !r.degraded, "{r:?}");

    // The CA alone, no client certificate: Redis refuses the handshake.
    let without = Sluicegate::start(
        &[
            "--redis-timeout-ms",
            "300",
            "--redis-tls-cacert",
            &d("ca.pem"),
        ],
        &[("REDIS_URL", &url)],
    )
    .await;
    let mut c = without.client().await;
    let err = should_allow(&mut c, ask("mtls", 2.0, 1e-6, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}
