#!/usr/bin/env bash
# TollGuard's test command: installs and starts what the tests need (Kafka,
# Redis, an SMTP sink — all on 127.0.0.1), then runs formatting, lints and
# every test against them. The README's second command; .ci/run calls it.
#
#   bash deploy/local/test.sh            # everything
#   TOLLGUARD_KEEP_SERVICES=1 bash deploy/local/test.sh   # leave services up
#
# Builds go to $CARGO_TARGET_DIR (default ~/.cache/tollguard-target), outside
# the clone, so repeated runs (and CI on the same machine) reuse them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollguard-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say() { printf '[test] %s\n' "$*" >&2; }
started=$(date +%s)
step() { say "$(( $(date +%s) - started ))s: $*"; }

# Build prerequisites from Debian packages (librdkafka is compiled from
# source by rdkafka-sys; it needs a C toolchain, make, pkg-config and
# OpenSSL headers).
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v make >/dev/null || need+=(make)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq "${need[@]}" >/dev/null
fi

step "starting Kafka, Redis and the SMTP sink"
bash deploy/local/services.sh start >/dev/null
eval "$(bash deploy/local/services.sh env)"
if [ "${TOLLGUARD_KEEP_SERVICES:-0}" != 1 ]; then
  trap 'bash deploy/local/services.sh stop >/dev/null 2>&1 || true' EXIT
fi
say "kafka=$TOLLGUARD_KAFKA_BOOTSTRAP redis=$TOLLGUARD_REDIS_URL smtp=$TOLLGUARD_SMTP_ADDR"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo build (binaries used by the end-to-end tests)"
cargo build --workspace --bins --quiet

step "Helm chart, compose and dashboard validation (helm lint/template, kube-score)"
bash deploy/k8s/validate.sh
export TOLLGUARD_HELM="${TOLLGUARD_HELM:-${TOLLGUARD_CACHE:-$HOME/.cache/tollguard}/gobin/helm}"

step "cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee "${TMPDIR:-/tmp}/tollguard-test.log"
status=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed; [0-9]+ failed' "${TMPDIR:-/tmp}/tollguard-test.log" | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
step "done: $(echo "$passed" | awk '{print $1" passed, "$2" failed"}')"
exit "$status"
