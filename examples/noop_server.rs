//! The transport ceiling for `scripts/bench.sh`: a gRPC server with sluicegate's services and
//! sluicegate's server settings that decides nothing (every request allowed, every descriptor OK).
//! sluicegate's rows are reported as a ratio to this one.
//!
//!   cargo run --release --example noop_server -- 127.0.0.1:18081

use sluicegate_proto::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::DescriptorStatus,
    rate_limit_service_server::{RateLimitService as Envoy, RateLimitServiceServer as EnvoyServer},
};
use sluicegate_proto::sluicegate::v1::{
    AcquireRequest, AcquireResponse, ReleaseRequest, ReleaseResponse, RenewRequest, SettleRequest,
    SettleResponse, ShouldAllowBatchRequest, ShouldAllowBatchResponse, ShouldAllowRequest,
    ShouldAllowResponse,
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

struct Noop;

#[tonic::async_trait]
impl RateLimitService for Noop {
    async fn should_allow(
        &self,
        r: Request<ShouldAllowRequest>,
    ) -> Result<Response<ShouldAllowResponse>, Status> {
        let r = r.into_inner();
        Ok(Response::new(ShouldAllowResponse {
            allowed: true,
            capacity: r.capacity,
            rate: r.rate,
            ..Default::default()
        }))
    }

    async fn should_allow_batch(
        &self,
        r: Request<ShouldAllowBatchRequest>,
    ) -> Result<Response<ShouldAllowBatchResponse>, Status> {
        let n = r.into_inner().requests.len();
        Ok(Response::new(ShouldAllowBatchResponse {
            responses: vec![
                ShouldAllowResponse {
                    allowed: true,
                    ..Default::default()
                };
                n
            ],
            allowed: true,
        }))
    }

    async fn settle(&self, _: Request<SettleRequest>) -> Result<Response<SettleResponse>, Status> {
        Ok(Response::new(SettleResponse::default()))
    }

    async fn acquire(
        &self,
        _: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        Ok(Response::new(AcquireResponse {
            granted: true,
            lease_id: "noop".into(),
            ..Default::default()
        }))
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Ok(Response::new(ReleaseResponse {
            released: true,
            in_flight: 0,
        }))
    }

    async fn renew(&self, _: Request<RenewRequest>) -> Result<Response<AcquireResponse>, Status> {
        Ok(Response::new(AcquireResponse {
            granted: true,
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl Envoy for Noop {
    async fn should_rate_limit(
        &self,
        r: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let statuses = r
            .get_ref()
            .descriptors
            .iter()
            .map(|_| DescriptorStatus {
                code: 1,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: 1,
            statuses,
            ..Default::default()
        }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("noop server on {addr}");
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(RateLimitServiceServer::new(Noop))
        .add_service(EnvoyServer::new(Noop))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
