#!/usr/bin/env bash
# Benchmarks: decisions per second and latency of sluicegate on this machine, measured with
# sluicegate-load (release builds) in one run, each sluicegate row also as a ratio to a no-op gRPC
# server with sluicegate's services (examples/noop_server.rs: the transport ceiling). Prints Markdown;
# the figures in BENCHMARKS.md come from this script.
#
#   scripts/bench.sh                 # 10 s per scenario
#   DURATION=30s scripts/bench.sh    # longer runs
#   OUT=docs scripts/bench.sh        # also keep each run's JSON and summary in docs/
#   scripts/bench.sh overload        # open-loop steps at 1x-8x with a 20 ms deadline (scripts/overload.py)
#   scripts/bench.sh rlqs            # Envoy without a call per request: throughput and accuracy (scripts/rlqs_bench.py)
#   scripts/bench.sh leased          # leased quota in the client against a call per decision (scripts/leased_bench.py)
#   scripts/bench.sh quota-leases    # leased quota in the service (QUOTA_LEASES) against Redis and memory (scripts/quota_leases_bench.py)
#
# Client, server and Redis share the machine's cores, so the figures are a floor for the server.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ${1:-} == rlqs ]]; then
  cargo build --release --quiet --locked -p sluicegate -p sluicegate-client --bins
  exec python3 scripts/rlqs_bench.py "${@:2}"
fi

if [[ ${1:-} == leased ]]; then
  cargo build --release --quiet --locked -p sluicegate -p sluicegate-client --bins
  exec python3 scripts/leased_bench.py "${@:2}"
fi

if [[ ${1:-} == quota-leases ]]; then
  cargo build --release --quiet --locked -p sluicegate -p sluicegate-client --bins
  exec python3 scripts/quota_leases_bench.py "${@:2}"
fi

if [[ ${1:-} == overload ]]; then
  cargo build --release --quiet --locked -p sluicegate -p sluicegate-client --bins
  exec python3 scripts/overload.py "${@:2}"
fi

DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
CONNECTIONS=${CONNECTIONS:-4}
RPS=${RPS:-5000}
BUCKETS=${BUCKETS:-500000}
OUT=${OUT:-}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; exit 1; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }

cargo build --release --quiet --workspace --bins --examples
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
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >/dev/null &
pids+=($!)
REDIS_URL_="redis://127.0.0.1:$redis_port/0"

noop_port=$(free_port)
./target/release/examples/noop_server "127.0.0.1:$noop_port" 2>/dev/null &
pids+=($!)
wait_port "$noop_port"
NOOP=http://127.0.0.1:$noop_port

start_sluicegate() { # name, extra env...
  local grpc http
  grpc=$(free_port); http=$(free_port)
  env -u REDIS_URL "${@:2}" RUST_LOG=warn ./target/release/sluicegate --grpc-addr "127.0.0.1:$grpc" \
    --http-addr "127.0.0.1:$http" --rules "$work/rules.yaml" >/dev/null 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$http/readyz"
  eval "$1=http://127.0.0.1:$grpc"
}
start_sluicegate MEMORY
start_sluicegate REDIS REDIS_URL="$REDIS_URL_" REDIS_TIMEOUT_MS=1000
start_sluicegate REDIS_B REDIS_URL="$REDIS_URL_" REDIS_TIMEOUT_MS=1000

declare -A RATE P99
echo "| scenario | decisions/s | vs no-op | p50 ms | p99 ms | p99.9 ms | errors | bound |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
run() { # label, name, baseline name (or -), target, extra args...
  local label=$1 name=$2 base=$3 target=$4; shift 4
  # The no-op server allows everything: no bound to check there.
  local check=(--check-bound)
  [[ $name == *noop* ]] && check=()
  ./target/release/sluicegate-load --target "$target" --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --connections "$CONNECTIONS" "${check[@]}" \
    --json "$work/$name.json" "$@" > "$work/$name.txt" || true
  local line
  line=$(python3 - "$label" "$work/$name.json" "${RATE[$base]:-}" <<'PY'
import json, sys
j = json.load(open(sys.argv[2]))
l = j["latency_ms"]
base = sys.argv[3]
ratio = f"{j['rate'] / float(base):.2f}x" if base else "ceiling"
b = j["bound"]
bound = f"{b['violations']} violations" if b["checked"] else "-"
print(f"{j['rate']:.0f} {l['p99']:.3f} | {sys.argv[1]} | {j['rate']:.0f} | {ratio} | {l['p50']:.3f} | {l['p99']:.3f} | {l['p999']:.3f} | {j['errors']} | {bound} |")
PY
)
  RATE[$name]=${line%% *}; line=${line#* }
  P99[$name]=${line%% *}; line=${line#* }
  echo "$line"
  if [ -n "$OUT" ]; then mkdir -p "$OUT"; cp "$work/$name.json" "$work/$name.txt" "$OUT/"; fi
}
sa=(--capacity 100 --rate 50 --keys 1000)
deny=(--capacity 10 --rate 10 --keys 100)
one_plain=(--api envoy --domain bench --keys 1000 --descriptor 'k1={key}')
one=("${one_plain[@]}" --rules "$work/rules.yaml")
four=(--api envoy --domain bench --keys 1000 --descriptor 'k1={key}' --descriptor 'k2={key}' --descriptor 'k3={key}' --descriptor 'k4={key}' --rules "$work/rules.yaml")
run "no-op server, ShouldAllow" noop - "$NOOP" "${sa[@]}"
run "ShouldAllow, memory" sa-memory noop "$MEMORY" "${sa[@]}"
run "ShouldAllow, Redis" sa-redis noop "$REDIS" "${sa[@]}"
run "ShouldAllow, Redis, two replicas" sa-redis-2 noop "$REDIS,$REDIS_B" "${sa[@]}"
run "deny-heavy (100 keys at 10/s), memory" deny-memory noop "$MEMORY" "${deny[@]}"
run "deny-heavy (100 keys at 10/s), Redis" deny-redis noop "$REDIS" "${deny[@]}"
run "no-op server, Envoy 1 descriptor" noop-envoy - "$NOOP" "${one_plain[@]}"
run "Envoy 1 descriptor, memory" envoy1-memory noop-envoy "$MEMORY" "${one[@]}"
run "Envoy 4 descriptors, memory" envoy4-memory noop-envoy "$MEMORY" "${four[@]}"
run "Envoy 1 descriptor, Redis" envoy1-redis noop-envoy "$REDIS" "${one[@]}"
run "Envoy 4 descriptors, Redis" envoy4-redis noop-envoy "$REDIS" "${four[@]}"
# Latency without queueing: a fixed rate well under capacity (open loop, from intended start).
run "no-op server, open loop $RPS/s" open-noop - "$NOOP" "${sa[@]}" --rps "$RPS"
run "ShouldAllow, memory, open loop $RPS/s" open-memory open-noop "$MEMORY" "${sa[@]}" --rps "$RPS"
run "ShouldAllow, Redis, open loop $RPS/s" open-redis open-noop "$REDIS" "${sa[@]}" --rps "$RPS"
echo
python3 - "${RATE[sa-redis]}" "${RATE[noop]}" "${RATE[envoy4-redis]}" "${RATE[envoy1-redis]}" \
  "${RATE[deny-redis]}" "${RATE[deny-memory]}" "${RATE[sa-memory]}" "${P99[sa-redis]}" "${P99[noop]}" <<'PY'
import sys
sa_redis, noop, e4, e1, deny_redis, deny_mem, sa_mem, p99_redis, p99_noop = map(float, sys.argv[1:])
print("| target | measured |")
print("| --- | ---: |")
print(f"| ShouldAllow on Redis / no-op (>= 0.7) | {sa_redis / noop:.2f} |")
print(f"| Envoy 4 descriptors / 1 descriptor, Redis (>= 0.8) | {e4 / e1:.2f} |")
print(f"| deny-heavy Redis / memory (>= 0.9) | {deny_redis / deny_mem:.2f} |")
print(f"| memory / no-op (>= 0.9) | {sa_mem / noop:.2f} |")
print(f"| p99 Redis / no-op, closed loop (<= 1.3) | {p99_redis / p99_noop:.2f} |")
PY
echo
./target/release/examples/bucket_memory "$BUCKETS" "$REDIS_URL_"
echo
echo "$(nproc) cores, $(date -u +%Y-%m-%d), DURATION=$DURATION CONCURRENCY=$CONCURRENCY CONNECTIONS=$CONNECTIONS, 1000 keys unless noted, client on the same machine"
