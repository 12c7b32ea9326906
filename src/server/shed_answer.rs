//! What Envoy hears when its call is shed. Envoy lets a request through on any error from the
//! rate-limit service unless its own `failure_mode_deny` is set, so a shed answered as an error
//! (RESOURCE_EXHAUSTED) would turn `FAILURE_MODE=deny` into an allow exactly when an attacker
//! floods sluicegate. With `FAILURE_MODE` `allow` or `deny`, a shed Envoy call is answered as
//! that mode answers a backend failure: an overall OK or OVER_LIMIT (no descriptor was read: the
//! body is not decoded for a shed call; a call whose deadline passed is answered too, since Envoy
//! may still be listening for the last fraction of a millisecond), counted in `sluicegate_failure_mode_total{mode}` as well
//! as in `sluicegate_shed_total{reason}`. Under `error`, and for sluicegate's own API (whose
//! clients have their own failure mode), a shed stays RESOURCE_EXHAUSTED.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use prost::Message;
use sluicegate_proto::envoy::service::ratelimit::v3::{
    RateLimitResponse, rate_limit_response::Code,
};

/// The Envoy API's method path: the only calls answered this way.
pub const ENVOY_PATH: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// A whole gRPC response: OK status, one `RateLimitResponse` with `overall_code` OK (allowed) or
/// OVER_LIMIT.
pub fn envoy_answer(allowed: bool) -> http::Response<tonic::body::Body> {
    let code = if allowed { Code::Ok } else { Code::OverLimit };
    let message = RateLimitResponse {
        overall_code: code as i32,
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0); // not compressed
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = OneMessage {
        data: Some(Bytes::from(framed)),
        trailers: Some(trailers),
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A body of one data frame, then the trailers.
struct OneMessage {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
