# Multi-stage build of sluicegate, sluicegate-demo and sluicegate-load; the runtime image runs as a
# non-root user. Build from the repository root: docker build -t sluicegate .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/sluicegate target/release/sluicegate-demo target/release/sluicegate-load /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluicegate
COPY --from=build /out/ /usr/local/bin/
COPY deploy/rules /etc/sluicegate/rules
USER sluicegate
# gRPC (ShouldAllow, Envoy RLS, health, reflection), HTTP (/metrics, probes), demo app
EXPOSE 8081 8080 8000
ENTRYPOINT ["sluicegate"]
