#!/usr/bin/env python3
"""Overload steps: what sluicegate does when offered more than it can answer. Run by
`scripts/bench.sh overload` (release builds), prints Markdown; BENCHMARKS.md's overload table comes
from it.

For each backend (memory, Redis), with the product's defaults (MAX_QUEUE_MS 10, REDIS_TIMEOUT_MS
15): the highest open-loop rate answered with p99 under 20 ms (closed-loop maximum, then open-loop
probes down from it, at most one call in a thousand failed) is 1x; then open loop at 1x, 2x, 4x and 8x of it, every call with a 20 ms
deadline (sluicegate-load --timeout 20ms: Envoy's default). Per step: offered and answered per
second (an answer is one within the deadline; the rest are errors at the client), the answered
rate as a share of 1x's (goodput), calls shed by reason and decisions made (from sluicegate's
/metrics), decisions made for callers who were gone by then (decisions minus answers, as a share
of decisions; the Redis backend refunds what those took), errors at the client by kind (deadline,
shed, unavailable, other: sluicegate-load's errors_by_kind), connections sluicegate tore down
(GOAWAY frames it sent with an error code, `sluicegate_goaways_total`) and RSS.

sluicegate runs on one core, the client and Redis on the other (taskset), as when Envoy runs on
other machines; where it can, sluicegate is also held to a quarter of its core (a cgroup quota),
so that the client's core can offer 8x of what sluicegate sustains.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchlib import free_port, wait_http

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE = "20ms"
STEPS = (1, 2, 4, 8)
PROBE_SHARES = (0.9, 0.75, 0.6, 0.45, 0.3, 0.2, 0.1)
# sluicegate on a core of its own, the client and Redis on the other (with 2 cores or more): as
# when Envoy runs elsewhere. Sharing the cores, the open-loop client at 4x and 8x takes the CPU
# sluicegate needs, and the steps measure the client's collapse more than the server's.
SERVER_CPU, CLIENT_CPU = "1", "0"
# And, where a cgroup (v1) cpu controller is writable (root), held to a share of that core
# (SERVER_CPU_SHARE, default 0.25) in 4 ms periods: one client core can then offer 8x of what the
# server sustains. 0 turns it off.
SERVER_CPU_SHARE = float(os.environ.get("SERVER_CPU_SHARE", "0.25"))
CGROUP = "/sys/fs/cgroup/cpu/sluicegate-overload"


def hold_to_share(pid):
    """Puts every thread of `pid` in a cgroup with SERVER_CPU_SHARE of a core; False if it cannot."""
    if SERVER_CPU_SHARE <= 0 or not os.access("/sys/fs/cgroup/cpu", os.W_OK):
        return False
    os.makedirs(CGROUP, exist_ok=True)
    with open(f"{CGROUP}/cpu.cfs_period_us", "w") as f:
        f.write("4000")
    with open(f"{CGROUP}/cpu.cfs_quota_us", "w") as f:
        f.write(str(int(4000 * SERVER_CPU_SHARE)))
    with open(f"{CGROUP}/cgroup.procs", "w") as f:
        f.write(str(pid))  # every thread, and the ones it starts later
    return True


def pin(cpus):
    return ["taskset", "-c", cpus] if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else []


def metrics(http):
    text = urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def goaway_reasons(m):
    """The reasons sluicegate_goaways_total has series for."""
    prefix = 'sluicegate_goaways_total{reason="'
    return [name[len(prefix):].split('"')[0] for name in m if name.startswith(prefix)]


def total(m, prefix, **labels):
    """Sum of the samples of `prefix` whose labels include `labels`."""
    s = 0.0
    for name, v in m.items():
        if not (name == prefix or name.startswith(prefix + "{")):
            continue
        if all(f'{k}="{val}"' in name for k, val in labels.items()):
            s += v
    return s


class Server:
    def __init__(self, name, work, env):
        self.grpc, self.http = free_port(), free_port()
        self.log = os.path.join(work, f"{name}.log")
        full = {"PATH": os.environ["PATH"], "RUST_LOG": "warn", **env}
        self.proc = subprocess.Popen(
            [*pin(SERVER_CPU), os.path.join(ROOT, "target/release/sluicegate"),
             "--grpc-addr", f"127.0.0.1:{self.grpc}", "--http-addr", f"127.0.0.1:{self.http}"],
            env=full, cwd=work, stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        wait_http(f"http://127.0.0.1:{self.http}/readyz")
        self.held = hold_to_share(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def load(target, work, name, seconds, args):
    out = os.path.join(work, f"{name}.json")
    subprocess.run(
        [*pin(CLIENT_CPU), os.path.join(ROOT, "target/release/sluicegate-load"), "--target", target,
         "--duration", f"{seconds}s", "--keys", "1000", "--capacity", "1000000", "--rate", "1000000",
         "--connections", "4", "--max-error-rate", "1", "--json", out, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def one_x(server, work, label, calib_s):
    closed = load(f"http://127.0.0.1:{server.grpc}", work, f"{label}-closed", calib_s,
                  ["--concurrency", "64"])["rate"]
    for share in PROBE_SHARES:
        rps = int(closed * share)
        j = load(f"http://127.0.0.1:{server.grpc}", work, f"{label}-probe", 4,
                 ["--rps", str(rps), "--timeout", DEADLINE])
        if j["errors"] <= j["requests"] / 1000 and j["latency_ms"]["p99"] < 20:
            return closed, rps
        time.sleep(1)
    raise SystemExit(f"{label}: no open-loop rate answered with p99 under 20 ms")


def steps(server, work, label, base, seconds):
    rows = []
    for m in STEPS:
        before = metrics(server.http)
        j = load(f"http://127.0.0.1:{server.grpc}", work, f"{label}-{m}x", seconds,
                 ["--rps", str(base * m), "--timeout", DEADLINE])
        time.sleep(0.5)  # the last calls' metrics
        after = metrics(server.http)
        delta = lambda name, **l: total(after, name, **l) - total(before, name, **l)  # noqa: E731
        answered = j["allowed"] + j["denied"]
        decisions = delta("sluicegate_decisions_total", result="allowed") + delta(
            "sluicegate_decisions_total", result="denied")
        shed = {r: int(delta("sluicegate_shed_total", reason=r))
                for r in ("deadline", "queue", "adaptive", "concurrency")}
        rows.append({
            "step": f"{m}x", "offered_per_s": j["requests"] / j["duration_s"],
            "answered_per_s": answered / j["duration_s"], "errors": j["errors"],
            "errors_by_kind": j["errors_by_kind"],
            "p99_ms": j["latency_ms"]["p99"], "shed": shed, "decisions": int(decisions),
            "gone_share": max(0.0, decisions - answered) / decisions if decisions else 0.0,
            "gone_refunds": int(delta("sluicegate_gone_refunds_total")),
            "torn": {r: int(n) for r in goaway_reasons(after)
                     if r != "no_error" and (n := delta("sluicegate_goaways_total", reason=r))},
            "rss_mb": total(after, "process_resident_memory_bytes") / 2**20,
        })
        time.sleep(1)  # let queues drain between steps
    return rows


def torn(by_reason):
    """GOAWAYs with an error: their count, and their reasons."""
    n = sum(by_reason.values())
    return f"{n} ({', '.join(f'{r} {c}' for r, c in sorted(by_reason.items()))})" if n else "0"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=float(os.environ.get("STEP_S", 8)))
    p.add_argument("--json")
    a = p.parse_args()
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server missing: apt-get install -y redis-server")
    work = tempfile.mkdtemp(prefix="overload-")
    redis_port = free_port()
    redis = subprocess.Popen(
        [*pin(CLIENT_CPU), "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work], stdout=subprocess.DEVNULL)
    servers = []
    report = {}
    report_held = False
    try:
        time.sleep(0.5)
        for label, env in (("memory", {}),
                           ("redis", {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})):
            s = Server(label, work, env)
            servers.append(s)
            report_held = s.held
            closed, base = one_x(s, work, label, 5)
            rows = steps(s, work, label, base, a.seconds)
            report[label] = {"closed_loop_per_s": closed, "one_x_per_s": base, "steps": rows}
            s.stop()
            servers.remove(s)
    finally:
        for s in servers:
            s.proc.kill()
        redis.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("| backend | step | offered/s | answered in 20 ms /s | goodput vs 1x | errors at client: deadline/shed/unavailable/other "
          "| shed deadline/queue/adaptive/concurrency | decisions | for callers gone | gone refunds "
          "| GOAWAYs with an error | p99 ms (all calls) | RSS MB |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in report.items():
        one = r["steps"][0]["answered_per_s"]
        for row in r["steps"]:
            sh = row["shed"]
            print(f"| {label} (1x = {r['one_x_per_s']}/s) | {row['step']} | {row['offered_per_s']:.0f} "
                  f"| {row['answered_per_s']:.0f} | {row['answered_per_s'] / one:.2f} "
                  f"| {'/'.join(str(row['errors_by_kind'][k]) for k in ('deadline', 'shed', 'unavailable', 'other'))} "
                  f"| {sh['deadline']}/{sh['queue']}/{sh['adaptive']}/{sh['concurrency']} "
                  f"| {row['decisions']} | {row['gone_share']:.1%} | {row['gone_refunds']} "
                  f"| {torn(row['torn'])} | {row['p99_ms']:.1f} | {row['rss_mb']:.0f} |")
    print()
    held = f"sluicegate on core {SERVER_CPU} held to {SERVER_CPU_SHARE:.0%} of it" if report_held else \
        f"sluicegate on core {SERVER_CPU}"
    print(f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d', time.gmtime())}, {a.seconds:.0f} s per step, "
          f"deadline {DEADLINE} per call, 1000 keys; {held}, the client and Redis on core {CLIENT_CPU}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
