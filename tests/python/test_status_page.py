"""The status page in a real browser: headless Chromium (Debian's, driven by Playwright) loads `/`
while sluicegate-load runs against sluicegate, and must show the limiter working: the chart gets points,
the allowed and denied counts rise, the top denied keys name the hammered key, and the loaded rules
are listed. A screenshot is saved (target/test-artifacts/status-page.png, or STATUS_SCREENSHOT).

The binaries come from SLUICEGATE_BIN and SLUICEGATE_LOAD_BIN (scripts/test.sh builds and sets them).
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
RULES = """domain: edge
descriptors:
  - key: api_key
    rate_limit: { unit: second, requests_per_unit: 5, name: per_key }
  - key: job
    concurrency: { max: 3, lease: 60s, name: jobs }
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, timeout=15):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, "sluicegate exited during start"
        assert time.time() < deadline, "sluicegate did not become ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sluicegate():
    binary = os.environ.get("SLUICEGATE_BIN", str(ROOT / "target/debug/sluicegate"))
    assert os.path.exists(binary), f"{binary} missing: run `cargo build` (scripts/test.sh does)"
    work = tempfile.mkdtemp(prefix="sluicegate-page-")
    rules = Path(work) / "rules.yaml"
    rules.write_text(RULES)
    grpc_port, http_port = free_port(), free_port()
    # MAX_QUEUE_MS (10 ms) would shed a call of a debug build that waited for its turn on busy CI cores.
    env = {"PATH": os.environ["PATH"], "RUST_LOG": "warn", "MAX_QUEUE_MS": "1000"}
    # The work directory as cwd: no developer .env is read.
    proc = subprocess.Popen(
        [binary, "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--rules", str(rules), "--debug-endpoints", "true", "--debug-show-keys", "true"],
        cwd=work, env=env,
    )
    wait_ready(f"http://127.0.0.1:{http_port}/readyz", proc)
    yield {"grpc": f"http://127.0.0.1:{grpc_port}", "http": f"http://127.0.0.1:{http_port}", "work": work}
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def load(t, *args):
    binary = os.environ.get("SLUICEGATE_LOAD_BIN", str(ROOT / "target/debug/sluicegate-load"))
    assert os.path.exists(binary), f"{binary} missing: run `cargo build --workspace` (scripts/test.sh does)"
    return subprocess.Popen(
        [binary, "--target", t["grpc"], "--duration", "12s", "--max-error-rate", "1", *args],
        cwd=t["work"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def until(check, seconds, what):
    deadline = time.time() + seconds
    while not check():
        assert time.time() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.2)


def number(text):
    text = text.strip()
    scale = {"k": 1e3, "M": 1e6}.get(text[-1:], 1)
    return float(text.rstrip("kM")) * scale


def test_the_status_page_shows_the_limiter_working(sluicegate):
    try:
        from playwright import sync_api
    except ImportError as e:  # never a skip: a missing tool is a failure that says how to fix it
        raise AssertionError("playwright missing: .venv/bin/pip install playwright (scripts/test.sh does)") from e
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: apt-get install -y chromium (scripts/test.sh does)"
    loads = [
        # Many users within their limits, and one key hammered far past its bucket.
        load(sluicegate, "--rps", "300", "--keys", "200", "--capacity", "20", "--rate", "10"),
        load(sluicegate, "--rps", "200", "--keys", "1", "--key-prefix", "hammered-key-",
             "--capacity", "5", "--rate", "1"),
        # Envoy's API too, so that a rule shows in the top rules.
        load(sluicegate, "--api", "envoy", "--rps", "100", "--keys", "3", "--domain", "edge",
             "--descriptor", "api_key={key}"),
        # Jobs acquiring slots of an in-flight limit and never releasing them: 3 held, the rest
        # refused (each request names its own lease, as Envoy's x-request-id would).
        load(sluicegate, "--api", "envoy", "--rps", "20", "--keys", "1000", "--domain", "edge",
             "--descriptor", "job=nightly,acquire={key}"),
    ]
    shot = Path(os.environ.get("STATUS_SCREENSHOT", ROOT / "target/test-artifacts/status-page.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(sluicegate["http"] + "/")

            # The chart gets points as seconds with decisions complete. (Polled from here: the
            # page's policy forbids evaluating strings, which Playwright's wait_for_function does.)
            until(lambda: int(page.get_attribute("#chart", "data-points") or 0) >= 3, 15, "chart points")
            allowed_1 = number(page.inner_text("#allowed-total"))
            denied_1 = number(page.inner_text("#denied-total"))
            page.wait_for_timeout(2500)
            allowed_2 = number(page.inner_text("#allowed-total"))
            denied_2 = number(page.inner_text("#denied-total"))
            assert allowed_2 > allowed_1 > 0, (allowed_1, allowed_2)
            assert denied_2 > denied_1 > 0, (denied_1, denied_2)

            # The hammered key heads the top denied keys; the rule shows in the top rules and
            # in the loaded rules; the backend is up.
            page.wait_for_selector("#top-keys tbody td.key", timeout=5000)
            first_key = page.inner_text("#top-keys tbody tr:first-child td.key")
            assert first_key == "hammered-key-0", first_key
            assert "per_key" in page.inner_text("#top-rules tbody")
            # Labels say what is counted: a rule's descriptors within their limit (the request
            # may still be refused by another rule), and the server's own decision time.
            assert "within limit" in page.inner_text("#top-rules thead")
            assert "decision time (server)" in page.inner_text("body")
            page.wait_for_selector("#rules tbody tr", timeout=12000)
            assert "5/second" in page.inner_text("#rules tbody")
            assert "at most 3 in flight" in page.inner_text("#rules tbody")
            # The in-flight rule shows its leases held.
            jobs = [r for r in page.inner_text("#top-rules tbody").splitlines() if "jobs" in r]
            assert jobs and jobs[0].split()[-1] == "3", jobs
            assert "memory up" in page.inner_text("#backend")
            # The memory backend never leases: the leased-quota section says it is off.
            assert page.inner_text("#leases").startswith("Off"), page.inner_text("#leases")
            assert float(page.inner_text("#deny-ratio").rstrip("%")) > 0

            page.screenshot(path=str(shot), full_page=True)
            assert not errors, errors
            browser.close()
    finally:
        for proc in loads:
            proc.kill()
            proc.wait()
    assert shot.stat().st_size > 10_000
