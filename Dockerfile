# cometd-bridge: multi-stage build, rustls only (no OpenSSL), non-root runtime.
#
#   docker build -t cometd-bridge .
#   docker run -v $PWD/my-config.toml:/etc/cometd-bridge/config.toml:ro \
#              -v cometd-bridge-state:/var/lib/cometd-bridge -p 8080:8080 cometd-bridge
#
# Probes: GET /healthz (liveness) and GET /readyz (readiness) on port 8080. The image has
# no shell nor curl: its HEALTHCHECK runs `cometd-bridge health`, which asks /readyz on the
# configured admin.listen and exits 0 when ready (orchestrators' HTTP probes: see deploy/).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the sources alone rebuilds
# only the workspace's two crates. The manifests of both (the daemon at the root, the
# client in crates/bayeux-client) with empty sources in their place.
COPY Cargo.toml Cargo.lock ./
COPY crates/bayeux-client/Cargo.toml crates/bayeux-client/Cargo.toml
RUN mkdir -p src crates/bayeux-client/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs crates/bayeux-client/src/lib.rs \
 && cargo build --release --locked --bin cometd-bridge \
 && rm -rf src crates/bayeux-client/src
COPY crates/bayeux-client/src ./crates/bayeux-client/src
COPY src ./src
# Newer than the placeholders' build, whatever times the build context kept.
RUN touch src/main.rs src/lib.rs crates/bayeux-client/src/lib.rs \
 && CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked --bin cometd-bridge

FROM debian:bookworm-slim
# Only the CA bundle from the build stage (the roots the webhook client trusts), not the
# ca-certificates package and what it pulls in. The user cometd-bridge is uid and gid
# 10001, named numerically below so that Kubernetes' runAsNonRoot can check it, and the
# group is the one the manifests' fsGroup names.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN groupadd --system --gid 10001 cometd-bridge \
 && useradd --system --no-log-init --uid 10001 --gid 10001 --no-create-home \
      --shell /usr/sbin/nologin cometd-bridge \
 && mkdir -p /etc/cometd-bridge /var/lib/cometd-bridge \
 && chown 10001:10001 /var/lib/cometd-bridge
COPY --from=build /src/target/release/cometd-bridge /usr/local/bin/cometd-bridge
COPY config/default.toml /etc/cometd-bridge/config.toml
# The configuration file is read from COMETD_BRIDGE_CONFIG; state and the admin address
# are set for a container (any COMETD_BRIDGE__SECTION__KEY variable overrides the file).
# A state directory on a bind mount must be writable by uid 10001 (chown 10001 it).
ENV COMETD_BRIDGE_CONFIG=/etc/cometd-bridge/config.toml \
    COMETD_BRIDGE__STATE__PATH=/var/lib/cometd-bridge \
    COMETD_BRIDGE__ADMIN__LISTEN=0.0.0.0:8080
VOLUME /var/lib/cometd-bridge
EXPOSE 8080
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/cometd-bridge", "health"]
ENTRYPOINT ["/usr/local/bin/cometd-bridge"]
CMD ["run"]
