# syntax=docker/dockerfile:1
#
# idemproxy as a container: a static-config sidecar that runs as a non-root user with no shell.
#
#   docker build -t idemproxy:local .
#   # the app publishes the proxy's ports; idemproxy joins its network namespace (upstream 127.0.0.1:3000)
#   docker run -d --name app -p 8080:8080 -p 127.0.0.1:9090:9090 traefik/whoami:v1.10.1 --port 3000
#   docker run -d --name idemproxy --network container:app -v idemproxy-data:/data --stop-timeout 40 idemproxy:local
#
# Ports: 8080 the proxy, 9090 the admin listener (/healthz, /readyz, /metrics; /admin/* needs
# IDEMPROXY_ADMIN_TOKEN). Config: /etc/idemproxy/idemproxy.toml (config/docker.toml; mount your own over it).
# Data: the sled store in the /data volume. docker/compose.yaml and docker/kubernetes.yaml show the sidecar
# setups. tests/docker.rs checks that this file, the configs and those manifests agree.

# The base images are build arguments: the defaults are the official Rust image and distroless. Where no
# registry can be reached, scripts/container.sh builds local stand-ins from Debian packages and passes
#   --build-arg BUILD_IMAGE=... --build-arg RUNTIME_IMAGE=...
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---- build: the official Rust image, same Debian release (bookworm) as the runtime's glibc ----
FROM ${BUILD_IMAGE} AS build
WORKDIR /build
# The whole crate (.dockerignore keeps target/, .git/ and local data out): Cargo.toml declares every target.
COPY . .
# Cache mounts keep the registry and incremental build between builds; the binary is copied out of them.
# The image's binary keeps its symbols (for profiles) but not the debug info the release profile adds.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo build --release --locked --bin idemproxy \
    && install -D -m 0755 target/release/idemproxy /out/idemproxy \
    && mkdir -p /out/data

# ---- runtime: distroless glibc + libgcc, no shell, no package manager ----
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="idemproxy" \
      org.opencontainers.image.description="An idempotency reverse proxy: retried POSTs never run twice" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /out/idemproxy /usr/local/bin/idemproxy
COPY config/docker.toml /etc/idemproxy/idemproxy.toml
# An empty /data owned by the runtime user, so a fresh named volume mounted there is writable too.
COPY --from=build --chown=65532:65532 /out/data /data

# `idemproxy check` and `idemproxy health` (the HEALTHCHECK) read the same config as `run` without flags.
ENV IDEMPROXY_CONFIG=/etc/idemproxy/idemproxy.toml

# distroless "nonroot", by number so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
VOLUME ["/data"]
EXPOSE 8080 9090

# SIGTERM: /readyz turns 503, requests in flight finish (server.shutdown_grace, 30s), the store is flushed,
# exit 0. Give the runtime longer than the drain before SIGKILL (docker's default is only 10s).
STOPSIGNAL SIGTERM
# GET /healthz on the admin listener of the config above; exit 0 healthy, 1 unhealthy. No shell needed.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/idemproxy", "health"]

ENTRYPOINT ["/usr/local/bin/idemproxy"]
CMD ["run", "--config", "/etc/idemproxy/idemproxy.toml"]
