#!/usr/bin/env python3
"""Envoy without a call per request: what RLQS costs and how close to the limit it holds. Run by
`scripts/bench.sh rlqs` (release builds), prints Markdown; BENCHMARKS.md's RLQS section comes
from it.

1. Throughput through one Envoy (`--concurrency 1`, a direct-response route, no upstream), wrk with
   64 connections over 1,000 `x-user` values, in one run: no rate-limit filter (the ceiling), the
   RLS filter asking sluicegate on Redis per request, the quota filter (RLQS) with a bucket per
   `x-user` value assigned by sluicegate on Redis. Limits are high enough that every request is
   allowed: the rows measure what each way of asking costs.
2. Accuracy: two Envoys, each streaming to its own sluicegate replica over one Redis, one rule of
   100/s (`deploy/rules/rlqs.yaml`, the edge bucket); Envoy A offered 300/s throughout, Envoy B
   100/s, then 600/s from the middle on (a demand jump). Admitted per second over the fleet: the
   settled rate before the jump, the worst second and the worst 5 s after it, the settled rate at
   the end. sluicegate-load --api http drives both, open loop.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATION = os.environ.get("DURATION", "10s")
# PROFILE=0: no perf profile of Envoy's per-user run.
PROFILE = os.environ.get("PROFILE", "1") != "0"
RELEASE = os.path.join(ROOT, "target", "release")


def envoy_bin():
    venv = os.path.join(ROOT, ".venv", "bin", "envoy")
    return os.environ.get("ENVOY_BIN", venv)


class Procs:
    def __init__(self, work):
        self.work = work
        self.procs = []

    def start(self, args, env=None, log=None):
        out = open(os.path.join(self.work, log), "w") if log else subprocess.DEVNULL
        p = subprocess.Popen(args, env=env, stdout=out, stderr=out, cwd=self.work)
        self.procs.append(p)
        return p

    def stop(self, p):
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()


def sluicegate(procs, rules, redis_url, name):
    grpc, http = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "RULES"))}
    env.update(REDIS_URL=redis_url, RULES=rules, RUST_LOG="warn")
    procs.start(
        [f"{RELEASE}/sluicegate", "--grpc-addr", f"127.0.0.1:{grpc}", "--http-addr", f"127.0.0.1:{http}"],
        env=env,
        log=f"{name}.log",
    )
    wait_http(f"http://127.0.0.1:{http}/readyz")
    return grpc, http


def envoy(procs, config, name):
    listen, admin = free_port(), free_port()
    config = config.replace("LISTEN", str(listen)).replace("ADMIN", str(admin))
    path = os.path.join(procs.work, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(config)
    p = procs.start(
        [envoy_bin(), "-c", path, "--disable-hot-restart", "--concurrency", "1", "--log-level", "error",
         "--base-id", str(admin)],
        log=f"{name}.log",
    )
    wait_http(f"http://127.0.0.1:{admin}/ready")
    return p, listen


LISTENER = """
admin: { address: { socket_address: { address: 127.0.0.1, port_value: ADMIN } } }
static_resources:
  listeners:
  - name: l
    address: { socket_address: { address: 127.0.0.1, port_value: LISTEN } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "ok" } }
RATE_LIMITS
          http_filters:
FILTER
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: sluicegate
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: sluicegate
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: GRPC } } }
"""

RLS_ROUTE = """              rate_limits:
              - actions:
                - request_headers: { header_name: x-user, descriptor_key: user }"""

RLS_FILTER = """          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: bench
              failure_mode_deny: false
              timeout: 0.1s
              rate_limit_service:
                transport_api_version: V3
                grpc_service: { envoy_grpc: { cluster_name: sluicegate } }"""

RLQS_STATIC = """          - name: envoy.filters.http.rate_limit_quota
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig
              rlqs_server: { envoy_grpc: { cluster_name: sluicegate } }
              domain: quota
              bucket_matchers:
                on_no_match:
                  action:
                    name: edge
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings
                      bucket_id_builder: { bucket_id_builder: { name: { string_value: edge } } }
                      reporting_interval: 5s
                      no_assignment_behavior: { fallback_rate_limit: { blanket_rule: ALLOW_ALL } }
                      deny_response_settings: { http_status: { code: 429 } }"""

RLQS_FILTER = """          - name: envoy.filters.http.rate_limit_quota
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig
              rlqs_server: { envoy_grpc: { cluster_name: sluicegate } }
              domain: quota
              bucket_matchers:
                matcher_list:
                  matchers:
                  - predicate:
                      single_predicate:
                        input:
                          name: x-user
                          typed_config:
                            "@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                            header_name: x-user
                        value_match: { safe_regex: { google_re2: {}, regex: "[!-~]{1,256}" } }
                    on_match:
                      action:
                        name: per_user
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings
                          bucket_id_builder:
                            bucket_id_builder:
                              name: { string_value: per_user }
                              user:
                                custom_value:
                                  name: x-user
                                  typed_config:
                                    "@type": type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput
                                    header_name: x-user
                          reporting_interval: 5s
                          no_assignment_behavior: { fallback_rate_limit: { blanket_rule: ALLOW_ALL } }
                          deny_response_settings: { http_status: { code: 429 } }"""

BENCH_RULES = """domain: bench
descriptors:
  - key: user
    rate_limit: { unit: second, requests_per_unit: 1000000 }
"""

QUOTA_RULES = """domain: quota
descriptors:
  - key: name
    value: edge
    rate_limit: { unit: second, requests_per_unit: 1000000 }
  - key: name
    value: per_user
    descriptors:
      - key: user
        rate_limit: { unit: second, requests_per_unit: 1000000 }
"""

WRK_LUA = """
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/", { ["x-user"] = "user-" .. (n % 1000) })
end
"""


def wrk(port, work):
    lua = os.path.join(work, "users.lua")
    out = subprocess.run(
        ["wrk", "-t2", "-c64", f"-d{DURATION}", "--latency", "-s", lua, f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, float(p99.group(1)) * scale, int(non2xx.group(1)) if non2xx else 0


def throughput(procs, redis_url):
    rules_dir = os.path.join(procs.work, "rules")
    os.makedirs(rules_dir)
    with open(os.path.join(rules_dir, "bench.yaml"), "w") as f:
        f.write(BENCH_RULES)
    with open(os.path.join(rules_dir, "quota.yaml"), "w") as f:
        f.write(QUOTA_RULES)
    grpc, http = sluicegate(procs, rules_dir, redis_url, "sg-throughput")
    lua = os.path.join(procs.work, "users.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    base = LISTENER.replace("GRPC", str(grpc))
    variants = [
        ("no rate-limit filter (the ceiling)", base.replace("RATE_LIMITS\n", "").replace("FILTER\n", "")),
        ("RLS filter -> sluicegate (Redis), a call per request",
         base.replace("RATE_LIMITS", RLS_ROUTE).replace("FILTER", RLS_FILTER)),
        ("quota filter (RLQS) -> sluicegate (Redis), one bucket",
         base.replace("RATE_LIMITS\n", "").replace("FILTER", RLQS_STATIC)),
        ("quota filter (RLQS) -> sluicegate (Redis), a bucket per user",
         base.replace("RATE_LIMITS\n", "").replace("FILTER", RLQS_FILTER)),
        # The filter's own cost: the same buckets, and no quota server listening (every bucket
        # stays on its no_assignment_behavior, ALLOW_ALL).
        ("quota filter, a bucket per user, no quota server (the filter alone)",
         LISTENER.replace("GRPC", str(free_port())).replace("RATE_LIMITS\n", "")
         .replace("FILTER", RLQS_FILTER)),
    ]
    rows = []
    profiles = []
    for name, config in variants:
        p, port = envoy(procs, config, "envoy-bench")
        # Warm up: connections, and for RLQS the 1,000 buckets' first reports and assignments.
        subprocess.run(["wrk", "-t1", "-c16", "-d3s", "-s", lua, f"http://127.0.0.1:{port}/"],
                       capture_output=True)
        profile = PROFILE and name.endswith("a bucket per user") and shutil.which("perf")
        perf = None
        if profile:
            data = os.path.join(procs.work, "perf.data")
            perf = subprocess.Popen(["perf", "record", "-F", "499", "-g", "-o", data, "-p", str(p.pid)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows.append((name, *wrk(port, procs.work)))
        if perf:
            perf.send_signal(2)
            perf.wait()
            report = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                                     "--percent-limit", "2", "-g", "none", "--sort", "symbol"],
                                    capture_output=True, text=True).stdout
            lines = [l for l in report.splitlines() if l.strip() and not l.startswith("#")]
            # The wheel's Envoy is stripped: only the kernel's and libc's symbols have names.
            profiles.append(lines[:15])
        procs.stop(p)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics").read().decode()
    print(f"Throughput through one Envoy (`--concurrency 1`), wrk -t2 -c64 -d{DURATION}, 1,000 x-user values:\n")
    print("| Envoy with | requests/s | vs ceiling | p99 | non-2xx |")
    print("|---|---|---|---|---|")
    ceiling = rows[0][1]
    for name, rps, p99, bad in rows:
        print(f"| {name} | {rps:,.0f} | {rps / ceiling:.2f}x | {p99:.2f} ms | {bad} |")
    reports = sum(float(v) for v in re.findall(r'^sluicegate_rlqs_reports_total\{[^}]*\} (\S+)', metrics, re.M))
    print(f"\n(RLQS: sluicegate heard of {reports:,.0f} requests in usage reports, without a call for any.)\n")
    for lines in profiles:
        print("Where Envoy's time goes with a bucket per user (perf, symbols over 2%):\n")
        print("```")
        print("\n".join(lines))
        print("```\n")


def load(port, rps, seconds, out):
    args = [f"{RELEASE}/sluicegate-load", "--api", "http", "--url", f"http://127.0.0.1:{port}/",
            "--rps", str(rps), "--duration", f"{seconds}s", "--json", out, "--connections", "8",
            "--max-error-rate", "1"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def timeline(path):
    with open(path) as f:
        j = json.load(f)
    start = j["started_unix_s"]
    return start, {i: s["allowed"] for i, s in enumerate(j["timeline"])}


def accuracy(procs, redis_url):
    rules = os.path.join(ROOT, "deploy", "rules", "rlqs.yaml")
    with open(os.path.join(ROOT, "deploy", "envoy", "envoy-rlqs.yaml")) as f:
        shipped = f.read()
    envoys = []
    for name in ("a", "b"):
        grpc, _ = sluicegate(procs, rules, redis_url, f"sg-{name}")
        # The shipped config, answering from Envoy itself instead of the demo app.
        config = (shipped.replace("port_value: 10000", "port_value: LISTEN")
                  .replace("port_value: 9901", "port_value: ADMIN")
                  .replace("port_value: 8081", f"port_value: {grpc}")
                  .replace("route: { cluster: upstream }",
                           'direct_response: { status: 200, body: { inline_string: "ok" } }'))
        assert "direct_response" in config
        envoys.append(envoy(procs, config, f"envoy-{name}")[1])
    half = 30
    outs = [os.path.join(procs.work, n) for n in ("a.json", "b1.json", "b2.json")]
    t0 = time.time()
    a = load(envoys[0], 300, 2 * half, outs[0])
    b1 = load(envoys[1], 100, half, outs[1])
    b1.wait()
    b2 = load(envoys[1], 600, half, outs[2])
    b2.wait()
    a.wait()
    fleet = {}
    for path in outs:
        start, seconds = timeline(path)
        offset = round(start - t0)
        for i, n in seconds.items():
            fleet[offset + i] = fleet.get(offset + i, 0) + n
    per_s = [fleet.get(i, 0) for i in range(2 * half)]
    before = sum(per_s[half - 10:half]) / 10
    after = per_s[half:half + 15]
    worst_1s = max(after)
    worst_5s = max(sum(after[i:i + 5]) / 5 for i in range(len(after) - 4))
    end = sum(per_s[2 * half - 10:2 * half]) / 10
    print("Accuracy: one rule of 100/s over two Envoys on two replicas (one Redis); A offered 300/s,")
    print(f"B 100/s, then 600/s from second {half} (total demand 400/s -> 900/s):\n")
    print("| admitted over the fleet | per second |")
    print("|---|---|")
    print(f"| settled, the 10 s before the jump | {before:.1f} |")
    print(f"| worst second in the 15 s after it | {worst_1s} |")
    print(f"| worst 5 s after it (mean) | {worst_5s:.1f} |")
    print(f"| settled, the last 10 s | {end:.1f} |")
    print("\nPer second: " + " ".join(str(n) for n in per_s))


def main():
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} missing: apt-get install -y {tool}")
    work = tempfile.mkdtemp()
    procs = Procs(work)
    try:
        redis_port = free_port()
        procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", work])
        time.sleep(0.5)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        throughput(procs, redis_url)
        accuracy(procs, redis_url)
    finally:
        procs.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
