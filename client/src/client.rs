//! The typed client: one reused HTTP/2 channel, a deadline per call, the failure mode, TLS.

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::sluicegate::v1::{
    SettleRequest, ShouldAllowBatchRequest, ShouldAllowRequest, ShouldAllowResponse,
    rate_limit_service_client::RateLimitServiceClient,
};

/// What to answer when sluicegate cannot: it is unreachable, overloaded or slower than the
/// deadline. Never applied to a request sluicegate refused ([`Error::Rejected`]).
///
/// ```
/// use std::time::Duration;
/// use sluicegate_client::{Client, Error, FailureMode};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // Nothing listens on port 9 here: sluicegate is unreachable.
/// let open = Client::builder("http://127.0.0.1:9")
///     .timeout(Duration::from_millis(200))
///     .failure_mode(FailureMode::Allow)
///     .build()
///     .unwrap();
/// let d = open.should_allow("user:42", 1).await.unwrap();
/// assert!(d.allowed && d.degraded, "fail open, and say so");
///
/// let strict = Client::builder("http://127.0.0.1:9")
///     .timeout(Duration::from_millis(200))
///     .build()
///     .unwrap();
/// assert!(matches!(
///     strict.should_allow("user:42", 1).await,
///     Err(Error::Unavailable(_))
/// ));
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    /// Return [`Error::Unavailable`]: the caller decides.
    #[default]
    Error,
    /// Answer allowed, flagged [`Decision::degraded`] (fail open).
    Allow,
    /// Answer denied, flagged [`Decision::degraded`] (fail closed).
    Deny,
}

/// Why a call gave no decision.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sluicegate could not be reached or did not answer in time, and the failure mode is
    /// [`FailureMode::Error`].
    #[error("sluicegate unavailable: {0}")]
    Unavailable(String),
    /// sluicegate refused the request: it is wrong (a key too long: `InvalidArgument`, naming the
    /// field) or forbidden by the server's settings (`PermissionDenied`). Never a reason to allow.
    #[error("sluicegate refused the request ({code:?}): {message}")]
    Rejected {
        /// The gRPC status code.
        code: tonic::Code,
        /// sluicegate's message; it starts with the field at fault.
        message: String,
    },
    /// The client was built with settings that cannot work (a bad URL, https without a CA).
    #[error("invalid sluicegate client settings: {0}")]
    Config(String),
}

impl Error {
    /// Whether sluicegate was unreachable or too slow (as opposed to refusing the request).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }

    /// Sorts a gRPC status: only transport trouble, overload and deadlines mean "unavailable".
    fn from_status(status: tonic::Status) -> Self {
        use tonic::Code;
        match status.code() {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown => Error::Unavailable(match root_cause(&status) {
                // "transport error" alone says nothing: the cause says what to fix (connection
                // refused, a name that does not resolve, a certificate not trusted).
                Some(cause) => format!("{:?}: {} ({cause})", status.code(), status.message()),
                None => format!("{:?}: {}", status.code(), status.message()),
            }),
            code => Error::Rejected {
                code,
                message: status.message().to_string(),
            },
        }
    }
}

/// The innermost error under a status (a transport failure's io or TLS error), when there is one.
fn root_cause(status: &tonic::Status) -> Option<String> {
    let mut cause = std::error::Error::source(status)?;
    while let Some(next) = cause.source() {
        cause = next;
    }
    Some(cause.to_string())
}

/// One ShouldAllow request with every field; [`Client::should_allow`] covers the usual case.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Request<'a> {
    /// The bucket's identity, 1 to 512 bytes.
    pub key: &'a str,
    /// Tokens to take; 0 means 1.
    pub cost: u32,
    /// Bucket size; 0 means the server's default.
    pub capacity: f64,
    /// Refill in tokens per second; 0 means the server's default.
    pub rate: f64,
    /// Answer without taking anything.
    pub dry_run: bool,
    /// Take up to `cost`: as many whole tokens as the bucket holds, at least one (denied only
    /// when not even one is there). [`Decision::granted`] says how many; with
    /// [`Client::reserve`], settle what was used and the rest goes back.
    pub up_to: bool,
}

/// A Settle without a reservation id, for [`Client::settle`]: the bucket, what was taken up front
/// (on this caller's word) and what the work really cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Settle<'a> {
    /// The bucket's key, as reserved.
    pub key: &'a str,
    /// The bucket's size, as reserved (0: the server's default).
    pub capacity: f64,
    /// The bucket's refill, as reserved (0: the server's default).
    pub rate: f64,
    /// What was taken up front: the reserving request's `cost`.
    pub reserved: u32,
    /// What the work really cost (may exceed `reserved`: the rest is charged, into debt).
    pub actual: u64,
}

/// What a [`FailureMode::Deny`] answer says to wait before retrying.
pub const FALLBACK_RETRY_AFTER: Duration = Duration::from_secs(1);

/// sluicegate's answer to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Whether the request may go ahead.
    pub allowed: bool,
    /// Tokens left after the decision (negative when the bucket is in debt).
    pub tokens_remaining: f64,
    /// When denied, how long until the cost is there.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset_after: Duration,
    /// The bucket's size, as applied.
    pub capacity: f64,
    /// The bucket's refill in tokens per second, as applied.
    pub rate: f64,
    /// The answer comes from a failure mode (sluicegate's or this client's), not from a bucket.
    pub degraded: bool,
    /// Tokens taken from the bucket: the cost, or with [`Request::up_to`] what the bucket could
    /// give; 0 when none were (a denial, a dry run, a failure mode's answer).
    pub granted: u32,
}

impl Decision {
    fn from_proto(r: &ShouldAllowResponse) -> Self {
        Self {
            allowed: r.allowed,
            tokens_remaining: r.tokens_remaining,
            retry_after: Duration::from_millis(r.retry_after_ms),
            reset_after: Duration::from_millis(r.reset_after_ms),
            capacity: r.capacity,
            rate: r.rate,
            degraded: r.degraded,
            granted: r.granted,
        }
    }

    fn fallback(allowed: bool) -> Self {
        Self {
            allowed,
            tokens_remaining: 0.0,
            // A denial with no figure to go by: not "retry at once", which invites a tight loop.
            retry_after: if allowed {
                Duration::ZERO
            } else {
                FALLBACK_RETRY_AFTER
            },
            reset_after: Duration::ZERO,
            capacity: 0.0,
            rate: 0.0,
            degraded: true,
            granted: 0,
        }
    }
}

/// The answers to a batch, in request order.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchDecision {
    /// Every request was allowed.
    pub allowed: bool,
    /// One per request, in order.
    pub decisions: Vec<Decision>,
}

/// A ShouldAllow that reserved its tokens: the decision, and what [`Client::settle_reservation`]
/// needs to give back what the work did not use (once, at most what was taken).
#[derive(Clone, Debug, PartialEq)]
pub struct Reservation {
    /// sluicegate's answer to the reserving request.
    pub decision: Decision,
    /// The reservation's id; None when nothing was taken (denied, or a failure mode's answer).
    pub id: Option<String>,
    /// The bucket it was taken from, as asked: its key,
    pub key: String,
    /// its capacity (0: the server's default)
    pub capacity: f64,
    /// and its rate (0: the server's default).
    pub rate: f64,
}

/// The bucket after a Settle.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settlement {
    /// Tokens left; negative when the work cost more than was left (debt).
    pub tokens_remaining: f64,
    /// How long until the bucket is full again.
    pub reset_after: Duration,
    /// The bucket is in debt: later requests wait for the refill to pay it back.
    pub in_debt: bool,
    /// The answer comes from a failure mode: the settlement may not have landed.
    pub degraded: bool,
}

/// Builds a [`Client`]; see [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    url: String,
    timeout: Duration,
    connect_timeout: Duration,
    failure_mode: FailureMode,
    ca_pem: Option<Vec<u8>>,
    domain: Option<String>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientBuilder {
    /// The deadline of one call, sent to sluicegate too (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 250 ms or the call deadline, the longer).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// What to answer when sluicegate is unreachable or slow (default [`FailureMode::Error`]).
    pub fn failure_mode(mut self, mode: FailureMode) -> Self {
        self.failure_mode = mode;
        self
    }

    /// TLS: verify sluicegate's certificate against this CA (PEM), for the name `domain` it
    /// carries. The URL must be `https://`. There are no system roots: name the CA.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use sluicegate_client::Client;
    ///
    /// let client = Client::builder("https://sluicegate.internal:8081")
    ///     .tls(std::fs::read("ca.pem")?, "sluicegate.internal")
    ///     // mTLS, when sluicegate asks for a client certificate (GRPC_CLIENT_TLS_CACERT):
    ///     .client_certificate(std::fs::read("client.pem")?, std::fs::read("client-key.pem")?)
    ///     .build()?;
    /// # let _ = client;
    /// # Ok(())
    /// # }
    /// ```
    pub fn tls(mut self, ca_pem: impl Into<Vec<u8>>, domain: impl Into<String>) -> Self {
        self.ca_pem = Some(ca_pem.into());
        self.domain = Some(domain.into());
        self
    }

    /// mTLS: present this certificate chain and private key (PEM) to sluicegate.
    pub fn client_certificate(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// A client that connects on first use (and reconnects by itself): building never waits,
    /// and a sluicegate that is down yet is a [`FailureMode`] matter, not a startup error. It
    /// needs a Tokio runtime (its connection runs as a task there): built outside one, it is an
    /// [`Error::Config`] saying so.
    pub fn build(self) -> Result<Client, Error> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "build the client inside a Tokio runtime (its connection is a task there): from \
                 async code, or after Runtime::enter()"
                    .into(),
            ));
        }
        // Without a scheme the endpoint builds and every call fails later ("transport error"):
        // under FailureMode::Allow, a limiter switched off by a typo. Refused here instead.
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(Error::Config(format!(
                "url '{}' has no scheme: write http://{} (or https:// with ClientBuilder::tls)",
                self.url, self.url
            )));
        }
        let mut endpoint = Endpoint::from_shared(self.url.clone())
            .map_err(|e| Error::Config(format!("url '{}': {e}", self.url)))?
            .connect_timeout(self.connect_timeout.max(self.timeout))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if self.url.starts_with("https://") || self.ca_pem.is_some() || self.identity.is_some() {
            let Some(ca) = &self.ca_pem else {
                return Err(Error::Config(
                    "https:// needs the CA that signed sluicegate's certificate: ClientBuilder::tls"
                        .into(),
                ));
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some(domain) = &self.domain {
                tls = tls.domain_name(domain.clone());
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        }
        Ok(Client {
            inner: RateLimitServiceClient::new(endpoint.connect_lazy()),
            timeout: self.timeout,
            failure_mode: self.failure_mode,
        })
    }
}

/// A client of `sluicegate.v1.RateLimitService`. Cheap to clone: clones share one connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: RateLimitServiceClient<Channel>,
    timeout: Duration,
    failure_mode: FailureMode,
}

impl Client {
    /// Starts building a client of sluicegate at `url` (`http://host:8081`, or `https://` with
    /// [`ClientBuilder::tls`]).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_millis(250),
            failure_mode: FailureMode::Error,
            ca_pem: None,
            domain: None,
            identity: None,
        }
    }

    /// The failure mode this client answers with.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure_mode
    }

    /// Runs one call within the deadline (sent to sluicegate, and enforced here too, connecting
    /// included).
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(RateLimitServiceClient<Channel>, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, f(self.inner.clone(), self.timeout)).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(Error::from_status(status)),
            Err(_) => Err(Error::Unavailable(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Applies the failure mode to an error: an answer for an unavailable sluicegate, else the error.
    fn or_fallback<T>(&self, e: Error, answer: impl FnOnce(bool) -> T) -> Result<T, Error> {
        match (&e, self.failure_mode) {
            (Error::Unavailable(_), FailureMode::Allow) => Ok(answer(true)),
            (Error::Unavailable(_), FailureMode::Deny) => Ok(answer(false)),
            _ => Err(e),
        }
    }

    /// May `key` spend `cost` tokens now (the server's default bucket shape)?
    pub async fn should_allow(&self, key: &str, cost: u32) -> Result<Decision, Error> {
        self.check(Request {
            key,
            cost,
            ..Default::default()
        })
        .await
    }

    /// ShouldAllow with every field.
    pub async fn check(&self, req: Request<'_>) -> Result<Decision, Error> {
        let proto = to_proto(&req);
        match self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.should_allow(r).await
            })
            .await
        {
            Ok(r) => Ok(Decision::from_proto(&r)),
            Err(e) => self.or_fallback(e, Decision::fallback),
        }
    }

    /// Several decisions in one call, in order. With `all_or_nothing`, if any is denied none is
    /// charged (each answer still says its own verdict).
    pub async fn check_batch(
        &self,
        reqs: &[Request<'_>],
        all_or_nothing: bool,
    ) -> Result<BatchDecision, Error> {
        let proto = ShouldAllowBatchRequest {
            requests: reqs.iter().map(to_proto).collect(),
            all_or_nothing,
        };
        match self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.should_allow_batch(r).await
            })
            .await
        {
            Ok(r) => Ok(BatchDecision {
                allowed: r.allowed,
                decisions: r.responses.iter().map(Decision::from_proto).collect(),
            }),
            Err(e) => self.or_fallback(e, |allowed| BatchDecision {
                allowed,
                decisions: vec![Decision::fallback(allowed); reqs.len()],
            }),
        }
    }

    /// Takes `req.cost` tokens up front (an estimate of the work's cost) and keeps the right, for
    /// `ttl` (at most a day), to settle the real cost with [`Client::settle_reservation`].
    pub async fn reserve(&self, req: Request<'_>, ttl: Duration) -> Result<Reservation, Error> {
        let mut proto = to_proto(&req);
        proto.reserve_ttl_ms = u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX).max(1);
        let answer = self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.should_allow(r).await
            })
            .await;
        let (decision, id) = match answer {
            Ok(r) => (
                Decision::from_proto(&r),
                Some(r.reservation_id).filter(|id| !id.is_empty()),
            ),
            Err(e) => (self.or_fallback(e, Decision::fallback)?, None),
        };
        Ok(Reservation {
            decision,
            id,
            key: req.key.to_string(),
            capacity: req.capacity,
            rate: req.rate,
        })
    }

    /// After the work: settles a reservation with what the work really cost. Less than reserved
    /// gives the difference back; more charges it even past what is left, into debt. Once: a
    /// retry answers the same and changes nothing. A reservation without an id (nothing taken)
    /// has nothing to settle and is an [`Error::Config`].
    pub async fn settle_reservation(
        &self,
        reservation: &Reservation,
        actual: u64,
    ) -> Result<Settlement, Error> {
        let Some(id) = &reservation.id else {
            return Err(Error::Config(
                "settle_reservation: this reservation took nothing (no id)".into(),
            ));
        };
        self.settle_proto(SettleRequest {
            key: reservation.key.clone(),
            capacity: reservation.capacity,
            rate: reservation.rate,
            actual,
            reservation_id: id.clone(),
            ..Default::default()
        })
        .await
    }

    /// After the work, without a reservation id: `reserved` is taken on this caller's word, so
    /// sluicegate refunds only where ALLOW_REFUNDS=true; prefer [`Client::reserve`] and
    /// [`Client::settle_reservation`]. Less gives the difference back; more charges it even
    /// past what is left, into debt.
    pub async fn settle(&self, req: Settle<'_>) -> Result<Settlement, Error> {
        self.settle_proto(SettleRequest {
            key: req.key.to_string(),
            capacity: req.capacity,
            rate: req.rate,
            reserved: u64::from(req.reserved),
            actual: req.actual,
            ..Default::default()
        })
        .await
    }

    async fn settle_proto(&self, proto: SettleRequest) -> Result<Settlement, Error> {
        match self
            .call(|mut c, timeout| async move {
                let mut r = tonic::Request::new(proto);
                r.set_timeout(timeout);
                c.settle(r).await
            })
            .await
        {
            Ok(r) => Ok(Settlement {
                tokens_remaining: r.tokens_remaining,
                reset_after: Duration::from_millis(r.reset_after_ms),
                in_debt: r.in_debt,
                degraded: r.degraded,
            }),
            Err(e) => self.or_fallback(e, |_| Settlement {
                tokens_remaining: 0.0,
                reset_after: Duration::ZERO,
                in_debt: false,
                degraded: true,
            }),
        }
    }
}

fn to_proto(req: &Request<'_>) -> ShouldAllowRequest {
    ShouldAllowRequest {
        key: req.key.to_string(),
        cost: req.cost,
        capacity: req.capacity,
        rate: req.rate,
        dry_run: req.dry_run,
        up_to: req.up_to,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transport_trouble_is_unavailable() {
        use tonic::{Code, Status};
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
        ] {
            assert!(
                Error::from_status(Status::new(code, "x")).is_unavailable(),
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Internal,
        ] {
            assert!(
                !Error::from_status(Status::new(code, "x")).is_unavailable(),
                "{code:?}"
            );
        }
    }

    #[tokio::test]
    async fn https_needs_a_ca() {
        let err = Client::builder("https://sluicegate:8081")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("tls"), "{err}");
        assert!(Client::builder("not a url").build().is_err());
    }

    #[tokio::test]
    async fn a_url_without_a_scheme_is_refused_with_the_fix() {
        for url in ["127.0.0.1:8081", "localhost:8081", "sluicegate:8081"] {
            let err = Client::builder(url).build().unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
            assert!(err.to_string().contains(&format!("http://{url}")), "{err}");
        }
    }

    #[test]
    fn building_outside_a_runtime_says_so() {
        let err = Client::builder("http://127.0.0.1:8081")
            .build()
            .unwrap_err();
        assert!(
            matches!(&err, Error::Config(m) if m.contains("Tokio runtime")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_sluicegate_says_why() {
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::builder(format!("http://127.0.0.1:{port}"))
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let err = client.should_allow("k", 1).await.unwrap_err();
        let text = err.to_string().to_lowercase();
        assert!(err.is_unavailable() && text.contains("refused"), "{err}");
    }

    #[test]
    fn a_failure_mode_denial_says_when_to_retry() {
        assert_eq!(Decision::fallback(false).retry_after, FALLBACK_RETRY_AFTER);
        assert_eq!(Decision::fallback(true).retry_after, Duration::ZERO);
    }
}
