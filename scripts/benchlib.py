"""What the benchmark scripts share: free loopback ports, and waiting for a server to answer."""

import socket
import time
import urllib.request


def free_port():
    """A port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
