# Multi-stage build of tollgate, tollgate-demo and tollgate-load; the runtime image runs as a
# non-root user. Build from the repository root: docker build -t tollgate .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/tollgate target/release/tollgate-demo target/release/tollgate-load /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate
COPY --from=build /out/ /usr/local/bin/
COPY deploy/rules /etc/tollgate/rules
USER tollgate
# gRPC (ShouldAllow, Envoy RLS, health, reflection), HTTP (/metrics, probes), demo app
EXPOSE 8081 8080 8000
ENTRYPOINT ["tollgate"]
