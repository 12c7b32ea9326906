#!/usr/bin/env python3
"""Leased quota in the service (QUOTA_LEASES): ShouldAllow and the Envoy API on Redis with leases,
against Redis without them and the memory backend, same callers, in one run. Run by
`scripts/bench.sh quota-leases` (release builds), prints Markdown; BENCHMARKS.md's table comes
from it.

Per run: decisions per second, the ratio to its baseline, Redis's script time per decision (usec of
EVALSHA in INFO commandstats over the decisions made; for the Envoy API a decision is a request),
bound violations (--check-bound), p99.
"""

import os
import shutil
import subprocess
import time

import benchlib
from benchlib import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = """domain: bench
descriptors:
""" + "".join(f"""  - key: k{i}
    rate_limit: {{ unit: second, requests_per_unit: 100 }}
""" for i in range(1, 5)) + """  - key: k5
    rate_limit: { unit: second, requests_per_unit: 10 }
"""

WITHIN = ["--capacity", "1000000", "--rate", "1000000"]
DENY = "Envoy deny-heavy, 100 keys at 10/s"
ONE = ["--api", "envoy", "--domain", "bench", "--keys", "1000", "--descriptor", "k1={key}"]
FOUR = ONE + [a for i in range(2, 5) for a in ("--descriptor", f"k{i}={{key}}")]


def evalsha_usec(port):
    """usec spent in EVALSHA so far (INFO commandstats)."""
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            fields = dict(kv.split("=") for kv in line.split(":", 1)[1].split(","))
            return float(fields["usec"])
    return 0.0


def load(target, work, name, seconds, args):
    # A prefix per run: each starts from full buckets.
    return benchlib.load(target, os.path.join(work, f"{name}.json"), seconds, ["--key-prefix", f"{name}-", *args])


def metric(http, name):
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def main():
    seconds, work = benchlib.setup("quota-leases-")
    with open(os.path.join(work, "rules.yaml"), "w") as f:
        f.write(RULES)
    rules = os.path.join(work, "rules.yaml")
    redis_port = free_port()
    procs = [subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)]
    servers = {}
    rows = []
    denied_locally = {}
    try:
        time.sleep(0.5)
        for name, extra in (("memory", {}),
                            ("redis", {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}),
                            ("redis+leases", {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                              "QUOTA_LEASES": "true"}),
                            ("redis+leases LEASE_MS=1000", {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
                                                            "QUOTA_LEASES": "true", "LEASE_MS": "1000"})):
            grpc, http = free_port(), free_port()
            env = {"PATH": os.environ["PATH"], "RUST_LOG": "warn", "REDIS_TIMEOUT_MS": "1000", **extra}
            procs.append(subprocess.Popen(
                [os.path.join(ROOT, "target/release/sluicegate"), "--grpc-addr", f"127.0.0.1:{grpc}",
                 "--http-addr", f"127.0.0.1:{http}", "--rules", rules], env=env, cwd=work,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_http(f"http://127.0.0.1:{http}/readyz")
            servers[name] = (f"http://127.0.0.1:{grpc}", http)

        def run(label, server, args, base=None):
            target, http = servers[server]
            before = evalsha_usec(redis_port)
            local_before = metric(http, "sluicegate_lease_answers_total")
            deny_before = metric(http, 'sluicegate_local_answers_total{api="envoy"}')
            j = load(target, work, f"{len(rows)}", seconds, args)
            usec = evalsha_usec(redis_port) - before
            local = metric(http, "sluicegate_lease_answers_total") - local_before
            denied_locally[label, server] = metric(http, 'sluicegate_local_answers_total{api="envoy"}') - deny_before
            decisions = j["allowed"] + j["denied"]
            # Takes answered from leases, per bucket: an Envoy request takes one per descriptor.
            local /= max(args.count("--descriptor"), 1)
            rows.append((label, server, j, usec / max(decisions, 1), local, base))
            time.sleep(1)
            return j["rate"]

        scenarios = (
            ("ShouldAllow, 1000 keys Zipf 1.1, within limits", ["--keys", "1000", "--zipf", "1.1", *WITHIN]),
            ("ShouldAllow, 100,000 keys uniform, within limits", ["--keys", "100000", *WITHIN]),
        )
        for label, args in scenarios:
            base = run(label, "memory", args)
            run(label, "redis", args, base)
            run(label, "redis+leases", args, base)
            run(label, "redis+leases LEASE_MS=1000", args, base)
        for server in ("redis", "redis+leases"):
            base = run("Envoy 1 descriptor, 1000 keys", server, [*ONE, "--rules", rules])
            run("Envoy 4 descriptors, 1000 keys", server, [*FOUR, "--rules", rules], base)
        deny = ["--api", "envoy", "--domain", "bench", "--keys", "100", "--descriptor", "k5={key}", "--rules", rules]
        run(DENY, "redis", deny)
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("| scenario | backend | decisions/s | ratio | EVALSHA us per decision | from leases | bound violations | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, server, j, per, local, base in rows:
        ratio = f"{j['rate'] / base:.2f}x" if base else "base"
        decisions = j["allowed"] + j["denied"]
        share = f"{100 * local / max(decisions, 1):.1f}%" if "leases" in server else "-"
        print(f"| {label} | {server} | {j['rate']:.0f} | {ratio} | {per:.2f} | {share} "
              f"| {j['bound']['violations']} | {j['latency_ms']['p99']:.2f} |")
    for label, server, j, _, _, _ in rows:
        if label == DENY:
            print(f"\n{label}: {denied_locally[label, server]:.0f} of {j['denied']} denials answered by the local deny cache "
                  "(sluicegate_local_answers_total{api=\"envoy\"}), without Redis")
    print()
    print("ratio: against memory for ShouldAllow, against 1 descriptor on the same backend for the Envoy API. "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d', time.gmtime())}, {seconds:.0f} s per run, "
          "64 callers over 4 connections; client, servers and Redis share the cores")


if __name__ == "__main__":
    main()
