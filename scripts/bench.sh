#!/usr/bin/env bash
# Benchmarks: decisions per second and latency of tollgate on this machine, measured with
# tollgate-load (release builds), for each backend and API. Prints a Markdown table; the figures in
# BENCHMARKS.md come from this script.
#
#   scripts/bench.sh                 # 15 s per scenario
#   DURATION=30s scripts/bench.sh    # longer runs
#   OUT=docs scripts/bench.sh        # also keep each run's JSON and PNG plot in docs/
#
# Client and server share the machine's cores, so the figures are a floor for the server alone.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-15s}
CONCURRENCY=${CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
OUT=${OUT:-}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }

cargo build --release --quiet --workspace --bins
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server" >&2; exit 1; }

cat > "$work/rules.yaml" <<'YAML'
domain: bench
descriptors:
  - key: k1
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: k2
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: k3
    rate_limit: { unit: second, requests_per_unit: 100 }
  - key: k4
    rate_limit: { unit: second, requests_per_unit: 100 }
YAML

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)

start_tollgate() { # name, extra env...
  local grpc http
  grpc=$(free_port); http=$(free_port)
  env -u REDIS_URL "${@:2}" RUST_LOG=warn ./target/release/tollgate --grpc-addr "127.0.0.1:$grpc" \
    --http-addr "127.0.0.1:$http" --rules "$work/rules.yaml" >/dev/null 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$http/readyz"
  eval "$1=http://127.0.0.1:$grpc"
}
start_tollgate MEMORY
start_tollgate REDIS REDIS_URL="redis://127.0.0.1:$redis_port/0" REDIS_TIMEOUT_MS=1000

echo "| scenario | decisions/s | p50 ms | p99 ms | p99.9 ms | errors |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
run() { # label, name, target, extra args...
  local label=$1 name=$2 target=$3; shift 3
  ./target/release/tollgate-load --target "$target" --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" --keys 1000 --check-bound \
    --json "$work/$name.json" "$@" > "$work/$name.txt"
  python3 - "$label" "$work/$name.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[2]))
l = j["latency_ms"]
print(f"| {sys.argv[1]} | {j['rate']:.0f} | {l['p50']:.3f} | {l['p99']:.3f} | {l['p999']:.3f} | {j['errors']} |")
PY
  if [ -n "$OUT" ]; then
    mkdir -p "$OUT"; cp "$work/$name.json" "$work/$name.txt" "$OUT/"
  fi
}
sa=(--capacity 100 --rate 50)
run "ShouldAllow, memory" should-allow-memory "$MEMORY" "${sa[@]}"
run "ShouldAllow, Redis" should-allow-redis "$REDIS" "${sa[@]}"
one=(--api envoy --domain bench --descriptor 'k1={key}')
four=(--api envoy --domain bench --descriptor 'k1={key}' --descriptor 'k2={key}' --descriptor 'k3={key}' --descriptor 'k4={key}')
run "ShouldRateLimit 1 descriptor, memory" envoy1-memory "$MEMORY" "${one[@]}"
run "ShouldRateLimit 4 descriptors, memory" envoy4-memory "$MEMORY" "${four[@]}"
run "ShouldRateLimit 1 descriptor, Redis" envoy1-redis "$REDIS" "${one[@]}"
run "ShouldRateLimit 4 descriptors, Redis" envoy4-redis "$REDIS" "${four[@]}"
# Latency without queueing: a fixed rate well under capacity (open loop, from intended start).
run "ShouldAllow, memory, open loop ${RPS:-5000}/s" open-memory "$MEMORY" "${sa[@]}" --rps "${RPS:-5000}"
run "ShouldAllow, Redis, open loop ${RPS:-5000}/s" open-redis "$REDIS" "${sa[@]}" --rps "${RPS:-5000}"
echo
echo "$(nproc) cores, $(date -u +%Y-%m-%d), DURATION=$DURATION CONCURRENCY=$CONCURRENCY CONNECTIONS=$CONNECTIONS, 1000 keys, client on the same machine"
