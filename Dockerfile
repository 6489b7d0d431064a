# TollGuard service image.
#
#   docker build --build-arg BIN=tollguard-ingester   -t tollguard-ingester:0.1.0 .
#   docker build --build-arg BIN=tollguard-correlator -t tollguard-correlator:0.1.0 .
#   docker build --build-arg BIN=tollguard-notifier   -t tollguard-notifier:0.1.0 .
#   docker build --build-arg BIN=tollguard            -t tollguard-cli:0.1.0 .
#
# Every image holds all four binaries in /usr/local/bin (the layers are
# shared, so the three service images cost one image's space); BIN only picks
# the ENTRYPOINT. The Helm chart sets `command` explicitly, so one image built
# with any BIN serves every component there.
#
# The runtime image runs as the numeric non-root user 10001, writes nothing
# outside /tmp (mount an emptyDir there with a read-only root filesystem) and
# exposes the default ports of the services:
#   50051 ingester gRPC, 9101 ingester HTTP, 9102 correlator HTTP, 9103 notifier HTTP
# (HTTP = /livez, /readyz, /metrics). The example configs listen on 127.0.0.1;
# in a container set e.g. TOLLGUARD__LISTEN__HTTP=0.0.0.0:9101.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder

# librdkafka (rdkafka-sys, with its configure script) and mimalloc (the
# services' allocator) are compiled from source
# (make, a C compiler, OpenSSL headers, zlib); protoc comes from
# protoc-bin-vendored, so no system protoc is needed.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      pkg-config libssl-dev zlib1g-dev make gcc g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CARGO_NET_RETRY=5

# 1. Dependencies only: the manifests and the lock file with stub targets.
#    This layer (and the slow librdkafka build in it) is reused until a
#    manifest or Cargo.lock changes. Every workspace member's Cargo.toml must
#    be listed here (deploy/k8s/validate.sh checks it).
#    rust-toolchain.toml is left out on purpose (.dockerignore): the toolchain
#    is the one of RUST_IMAGE, so the build needs no rustup download.
#    A crate with build-dependencies gets a stub build script too, so that
#    those (tonic/prost codegen for proto/) are compiled here as well. The
#    stubs and their own artefacts are dropped at the end; the compiled
#    dependencies stay in the layer.
COPY Cargo.toml Cargo.lock ./
COPY proto/Cargo.toml proto/Cargo.toml
COPY services/core/Cargo.toml services/core/Cargo.toml
COPY services/runtime/Cargo.toml services/runtime/Cargo.toml
COPY services/ingester/Cargo.toml services/ingester/Cargo.toml
COPY services/correlator/Cargo.toml services/correlator/Cargo.toml
COPY services/notifier/Cargo.toml services/notifier/Cargo.toml
COPY services/cli/Cargo.toml services/cli/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
COPY benches/Cargo.toml benches/Cargo.toml
RUN set -eu; \
    echo '' > benches/lib.rs; \
    for d in proto tests services/*; do \
      mkdir -p "$d/src"; \
      echo '' > "$d/src/lib.rs"; \
      echo 'fn main() {}' > "$d/src/main.rs"; \
      if grep -q '^\[build-dependencies\]' "$d/Cargo.toml"; then echo 'fn main() {}' > "$d/build.rs"; fi; \
    done; \
    cargo fetch --locked; \
    cargo build --release --locked \
      -p tollguard-ingester -p tollguard-correlator -p tollguard-notifier -p tollguard-cli \
      --bins; \
    rm -rf proto/src tests/src services/*/src proto/build.rs tests/build.rs services/*/build.rs benches/lib.rs; \
    find target/release -maxdepth 1 -type f -name 'tollguard*' -delete

# 2. The sources. Files are touched so that cargo never takes a stub's
#    artefact for the real crate (COPY keeps the context's mtimes). The
#    release profile keeps line tables for backtraces; compressing the debug
#    sections halves the binaries (~50 -> ~25 MB each) without losing them.
COPY proto proto
COPY services services
COPY tests tests
RUN set -eu; \
    find proto services tests -type f -exec touch {} +; \
    cargo build --release --locked \
      -p tollguard-ingester -p tollguard-correlator -p tollguard-notifier -p tollguard-cli \
      --bins; \
    mkdir -p /out; \
    for b in tollguard-ingester tollguard-correlator tollguard-notifier tollguard; do \
      install -m 0755 "target/release/$b" "/out/$b"; \
      objcopy --compress-debug-sections=zlib "/out/$b"; \
    done; \
    /out/tollguard-ingester --version; /out/tollguard --version

# ---------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# Only what the binaries link against beyond libc: OpenSSL 3 (librdkafka TLS)
# and the CA bundle (zlib is part of the base image).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/* /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 10001 tollguard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin tollguard

COPY --from=builder /out/ /usr/local/bin/

# Which binary is the entrypoint: tollguard-ingester, tollguard-correlator,
# tollguard-notifier or tollguard (the CLI).
ARG BIN=tollguard-ingester
RUN set -eu; \
    case "${BIN}" in \
      tollguard-ingester|tollguard-correlator|tollguard-notifier|tollguard) ;; \
      *) echo "BIN must be tollguard-ingester, tollguard-correlator, tollguard-notifier or tollguard, not '${BIN}'" >&2; exit 1 ;; \
    esac; \
    ln -s "/usr/local/bin/${BIN}" /usr/local/bin/tollguard-entrypoint; \
    mkdir -p /etc/tollguard

LABEL org.opencontainers.image.title="tollguard" \
      org.opencontainers.image.description="TollGuard cross-carrier toll-fraud detection (${BIN})" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV TOLLGUARD_BIN=${BIN} \
    TMPDIR=/tmp
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9101 9102 9103
ENTRYPOINT ["/usr/local/bin/tollguard-entrypoint"]
