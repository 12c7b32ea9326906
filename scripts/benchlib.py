"""What the benchmark scripts share: free loopback ports, and waiting for a server to answer."""

import json
import os
import socket
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    """A port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(prefix):
    """A Redis benchmark's start: its --seconds per run (RUN_S, 10 by default), redis-server
    present, and a fresh work directory."""
    import argparse
    import shutil
    import tempfile
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=float(os.environ.get("RUN_S", 10)))
    seconds = p.parse_args().seconds
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server missing: apt-get install -y redis-server")
    return seconds, tempfile.mkdtemp(prefix=prefix)


def load(target, out, seconds, args):
    """Runs release sluicegate-load against `target` for `seconds` (64 callers over 4 connections,
    the bound checked, errors tolerated) and returns its JSON report, kept at `out`."""
    subprocess.run(
        [os.path.join(ROOT, "target/release/sluicegate-load"), "--target", target,
         "--duration", f"{seconds}s", "--concurrency", "64", "--connections", "4",
         "--check-bound", "--max-error-rate", "1", "--json", out, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def wait_http(url, seconds=15):
    """Returns once `url` answers; exits the script if it does not within `seconds`."""
    end = time.time() + seconds
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise SystemExit(f"no answer from {url}")
