#!/usr/bin/env bash
# The soak (see scripts/soak.py for what it does and checks): two replicas sharing Redis at 70% of
# the maximum measured open loop, Redis hung, killed and restarted every duration/5, the rules rewritten
# every duration/10. Exit status 1 if a check fails.
#
#   scripts/soak.sh              # 10 minutes, release build
#   scripts/soak.sh 60           # the one-minute version CI runs (SOAK_PROFILE=dev there)
#   scripts/soak.sh 600 --json soak.json
#
# SOAK_BUILD=0 takes the binaries already in target/ (scripts/test.sh: `cargo test` built them with
# the tests' feature set, and a plain `cargo build` would build every dependency again).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
profile=${SOAK_PROFILE:-release}
command -v redis-server >/dev/null || { echo "redis-server missing: apt-get install -y redis-server redis-tools" >&2; exit 1; }
if [[ ${SOAK_BUILD:-1} != 0 ]]; then
    cargo build --profile "$profile" --quiet --locked -p sluicegate -p sluicegate-client --bins
fi
exec python3 scripts/soak.py --duration "$seconds" --profile "$profile" "$@"
