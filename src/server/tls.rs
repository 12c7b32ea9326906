//! TLS on the gRPC port (GRPC_SERVER_USE_TLS): the server certificate, and with
//! GRPC_CLIENT_TLS_CACERT mutual TLS (client certificates must chain to that CA, and with
//! GRPC_CLIENT_TLS_SAN carry one of the listed SANs). The files are read again when they change,
//! so a rotation needs no restart: cert-manager's swap of a Kubernetes secret by symlink
//! included. New connections get the new certificates; open ones keep theirs.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;

use crate::config::TlsSettings;
use rustls::{
    DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_util::sync::CancellationToken;

/// How often the certificate files are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);
use super::handshakes::{HANDSHAKE_TIMEOUT, Handshakes};

/// The server configuration in force, swapped when the files change.
pub struct Tls {
    settings: TlsSettings,
    current: ArcSwap<ServerConfig>,
}

impl Tls {
    /// Reads the files; an error (missing file, bad PEM, key not matching) stops the start.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, String> {
        let config = build(&settings)?;
        Ok(Arc::new(Self {
            settings,
            current: ArcSwap::from_pointee(config),
        }))
    }

    /// What the files hold now, to notice a change (None: unreadable right now).
    fn fingerprint(&self) -> Option<u64> {
        let s = &self.settings;
        let mut h = DefaultHasher::new();
        for path in [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
            .into_iter()
            .flatten()
        {
            std::fs::read(path).ok()?.hash(&mut h);
        }
        Some(h.finish())
    }

    /// Looks at the files every second until `stop`, and swaps in a valid change. A change that
    /// does not load (a half-written file) is logged and retried; the old certificates stay.
    pub fn spawn_watcher(self: &Arc<Self>, stop: CancellationToken) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut last = {
                let tls = tls.clone();
                tokio::task::spawn_blocking(move || tls.fingerprint())
                    .await
                    .ok()
                    .flatten()
            };
            let mut tick = tokio::time::interval(WATCH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let reloaded = {
                    let tls = tls.clone();
                    let last = last;
                    tokio::task::spawn_blocking(move || {
                        let now = tls.fingerprint()?;
                        if Some(now) == last {
                            return None;
                        }
                        Some((now, build(&tls.settings)))
                    })
                    .await
                    .ok()
                    .flatten()
                };
                match reloaded {
                    Some((now, Ok(config))) => {
                        tls.current.store(Arc::new(config));
                        last = Some(now);
                        tracing::info!(cert = %tls.settings.cert.display(), "TLS certificates reloaded");
                    }
                    Some((_, Err(e))) => {
                        tracing::warn!(error = %e, "TLS files changed but do not load; keeping the current ones");
                    }
                    None => {}
                }
            }
        });
    }

    /// The TLS connections accepted on `listener`: each handshake runs on its own task, within
    /// the bounds of `handshakes.rs` (a timeout, a cap per peer, the oldest cut when full), so the
    /// accept loop never waits for one and a slow or hostile client never holds up the others.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        gate: Arc<Handshakes>,
        stop: CancellationToken,
    ) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Closed at once: this peer already has its share of handshakes in progress.
                let Some(ticket) = gate.admit(peer.ip()) else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
                    let done = tokio::select! {
                        _ = ticket.cancelled.cancelled() => {
                            tracing::debug!(%peer, "TLS handshake cut: newer ones needed the place");
                            return;
                        }
                        done = handshake => done,
                    };
                    drop(ticket);
                    match done {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        // A refused client (no certificate, an unknown CA or SAN, plaintext):
                        // its own failure, not the server's; debug only, a scan would flood.
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) })
    }
}

fn build(s: &TlsSettings) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&s.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("GRPC_SERVER_TLS_CERT {}: {e}", s.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "GRPC_SERVER_TLS_CERT {}: no certificate in the file",
            s.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&s.key)
        .map_err(|e| format!("GRPC_SERVER_TLS_KEY {}: {e}", s.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &s.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("GRPC_CLIENT_TLS_CACERT {}: {e}", ca.display()))?
            {
                let cert =
                    cert.map_err(|e| format!("GRPC_CLIENT_TLS_CACERT {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("GRPC_CLIENT_TLS_CACERT {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("GRPC_CLIENT_TLS_CACERT {}: {e}", ca.display()))?;
            if s.client_sans.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(SanVerifier {
                    inner: verifier,
                    allowed: s.client_sans.clone(),
                }))
            }
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("GRPC_SERVER_TLS_CERT/KEY: {e}"))?;
    // gRPC is HTTP/2: say so in ALPN (grpcio and Envoy expect it).
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client verifier that also requires one of the allowed SANs in the client's certificate.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

/// Every subject alternative name of a certificate, as text (DNS, URI, IP, e-mail).
pub fn sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, parsed)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(ext)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    ext.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                Some(s.to_string())
            }
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

impl ClientCertVerifier for SanVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if sans(end_entity).iter().any(|s| self.allowed.contains(s)) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
