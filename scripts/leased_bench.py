#!/usr/bin/env python3
"""Leased quota: sluicegate-load --api leased (sluicegate-client's LeasedClient) against --api
should-allow (a call per decision), same callers, one sluicegate on Redis. Run by
`scripts/bench.sh leased` (release builds), prints Markdown; BENCHMARKS.md's table comes from it.

Scenarios, each run once per API with the bound checked (--check-bound):
- within limits: 1000 keys, Zipf 1.1, buckets far larger than the load (every decision allowed);
- over the limit: the same keys, buckets of 100 refilled at 50/s (most decisions denied);
- at the limit: one key, 64 callers, a bucket of 200 refilled at 1000/s: admitted against the
  bound capacity + rate x elapsed.
Per run: decisions per second, calls to sluicegate per decision, admitted, bound violations, p99.
"""

import os
import shutil
import subprocess
import time

import benchlib
from benchlib import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = (
    ("within limits, 1000 keys Zipf 1.1", ["--keys", "1000", "--zipf", "1.1", "--capacity", "1000000", "--rate", "1000000"]),
    ("over the limit, 1000 keys Zipf 1.1", ["--keys", "1000", "--zipf", "1.1", "--capacity", "100", "--rate", "50"]),
    ("at the limit, 1 key", ["--keys", "1", "--capacity", "200", "--rate", "1000"]),
)


def load(target, work, name, seconds, args):
    return benchlib.load(target, os.path.join(work, f"{name}.json"), seconds, args)


def main():
    seconds, work = benchlib.setup("leased-")
    redis_port, grpc, http = free_port(), free_port(), free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
    server = None
    rows = []
    try:
        time.sleep(0.5)
        env = {"PATH": os.environ["PATH"], "RUST_LOG": "warn", "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        server = subprocess.Popen(
            [os.path.join(ROOT, "target/release/sluicegate"), "--grpc-addr", f"127.0.0.1:{grpc}",
             "--http-addr", f"127.0.0.1:{http}"], env=env, cwd=work,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{http}/readyz")
        target = f"http://127.0.0.1:{grpc}"
        for i, (label, args) in enumerate(SCENARIOS):
            for api in ("should-allow", "leased"):
                # A prefix per run: each starts from full buckets.
                j = load(target, work, f"{i}-{api}", seconds, ["--api", api, "--key-prefix", f"b{i}{api}-", *args])
                rows.append((label, api, j))
                time.sleep(1)
    finally:
        if server:
            server.kill()
        redis.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("| scenario | api | decisions/s | vs should-allow | calls per decision | admitted | bound violations | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = {}
    for label, api, j in rows:
        if api == "should-allow":
            base[label] = j["rate"]
        per = j.get("calls_per_decision", 1.0)
        print(f"| {label} | {api} | {j['rate']:.0f} | {j['rate'] / base[label]:.1f}x | {per:.4f} "
              f"| {j['allowed']} | {j['bound']['violations']} | {j['latency_ms']['p99']:.2f} |")
    print()
    for (label, api, j) in [(l, a_, j) for l, a_, j in rows if l.startswith("at the limit")]:
        bound = 200 + 1000 * j["duration_s"]
        print(f"- at the limit, {api}: admitted {j['allowed']} of a bound of {bound:.0f} "
              f"({100 * j['allowed'] / bound:.1f}%)")
    print()
    print(f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d', time.gmtime())}, {seconds:.0f} s per run, "
          "64 callers over 4 connections, one sluicegate on Redis; client, server and Redis share the cores")


if __name__ == "__main__":
    main()
