//! `rediss://`: tollgate talks TLS to a real redis-server (its TLS port only), trusting the CA named
//! by SSL_CERT_FILE, and refuses a server its trust store does not vouch for.

mod common;

use std::{path::Path, process::Command, time::Duration};

use common::{Tollgate, ask, eventually, free_port, should_allow};
use tonic::Code;

const INSTALL_OPENSSL: &str =
    "openssl not found: install it with `apt-get install -y openssl` (scripts/test.sh does)";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{INSTALL_OPENSSL} ({e})"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for localhost signed by it.
fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=tollgate test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test]
async fn rediss_with_a_trusted_ca_and_refused_without() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let port = free_port();
    let d = |f: &str| dir.path().join(f).display().to_string();
    let mut redis = Command::new("redis-server")
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
            "no",
        ])
        .args(["--save", "", "--appendonly", "no", "--dir", &d("")])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{} ({e})", common::INSTALL_REDIS));
    let url = format!("rediss://localhost:{port}/0");

    let trusted = Tollgate::start(
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
    let untrusting = Tollgate::start(
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
    let _ = redis.kill();
    let _ = redis.wait();
}
