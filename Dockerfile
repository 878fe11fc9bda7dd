# cometd-bridge: multi-stage build, rustls only (no OpenSSL), non-root runtime.
#
#   docker build -t cometd-bridge .
#   docker run -v $PWD/my-config.toml:/etc/cometd-bridge/config.toml:ro \
#              -v cometd-bridge-state:/var/lib/cometd-bridge -p 8080:8080 cometd-bridge
#
# Probes: GET /healthz (liveness) and GET /readyz (readiness) on port 8080. The image has
# no shell tools for a HEALTHCHECK; use your orchestrator's HTTP probes (see deploy/).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin cometd-bridge

FROM debian:bookworm-slim
# ca-certificates: the system roots the webhook client trusts.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin cometd-bridge \
 && mkdir -p /etc/cometd-bridge /var/lib/cometd-bridge \
 && chown cometd-bridge /var/lib/cometd-bridge
COPY --from=build /src/target/release/cometd-bridge /usr/local/bin/cometd-bridge
COPY config/default.toml /etc/cometd-bridge/config.toml
# The configuration file is read from COMETD_BRIDGE_CONFIG; state and the admin address
# are set for a container (any COMETD_BRIDGE__SECTION__KEY variable overrides the file).
ENV COMETD_BRIDGE_CONFIG=/etc/cometd-bridge/config.toml \
    COMETD_BRIDGE__STATE__PATH=/var/lib/cometd-bridge \
    COMETD_BRIDGE__ADMIN__LISTEN=0.0.0.0:8080
VOLUME /var/lib/cometd-bridge
EXPOSE 8080
USER cometd-bridge
ENTRYPOINT ["/usr/local/bin/cometd-bridge"]
CMD ["run"]
