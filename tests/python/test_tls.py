"""A Python grpcio client against sluicegate's TLS port, with certificates made by openssl: answered
with the CA (and a client certificate under mTLS), refused in plaintext or without a certificate."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(cwd, name, san, usage):
    openssl(cwd, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    Path(cwd, f"{name}.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n")
    openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def certs():
    d = tempfile.mkdtemp(prefix="sluicegate-tls-")
    openssl(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA")
    issue(d, "server", "DNS:localhost", "serverAuth")
    issue(d, "client", "DNS:python-client", "clientAuth")
    return Path(d)


@pytest.fixture(scope="module")
def stubs():
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="sluicegate-py-")
    assert protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}",
                        f"--grpc_python_out={out}", str(ROOT / "proto/sluicegate/v1/sluicegate.proto")]) == 0
    sys.path.insert(0, out)
    from sluicegate.v1 import sluicegate_pb2, sluicegate_pb2_grpc  # noqa: E402

    return sluicegate_pb2, sluicegate_pb2_grpc


def start(certs, *extra):
    binary = os.environ.get("SLUICEGATE_BIN", str(ROOT / "target/debug/sluicegate"))
    grpc_port, http_port = free_port(), free_port()
    # MAX_QUEUE_MS (10 ms) would shed a call of a debug build that waited for its turn on busy CI cores.
    env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": "error", "MAX_QUEUE_MS": "1000"}
    proc = subprocess.Popen(
        [binary, "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
         "--grpc-tls", "--grpc-tls-cert", str(certs / "server.pem"),
         "--grpc-tls-key", str(certs / "server.key"), *extra],
        env=env, cwd=tempfile.mkdtemp(),
    )
    deadline = time.time() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1):
                break
        except OSError:
            assert proc.poll() is None, "sluicegate exited during start"
            assert time.time() < deadline
            time.sleep(0.05)
    return proc, grpc_port


def call(stubs, channel):
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(channel)
    return stub.ShouldAllow(pb.ShouldAllowRequest(key="py:tls"), timeout=3)


def secure(certs, port, client=False):
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "client.key").read_bytes() if client else None,
        certificate_chain=(certs / "client.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


def test_tls_with_the_ca_is_answered_plaintext_is_not(certs, stubs):
    proc, port = start(certs)
    try:
        assert call(stubs, secure(certs, port)).allowed
        with pytest.raises(grpc.RpcError):
            call(stubs, grpc.insecure_channel(f"127.0.0.1:{port}"))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_mtls_needs_a_client_certificate(certs, stubs):
    proc, port = start(certs, "--grpc-client-ca", str(certs / "ca.pem"),
                       "--grpc-client-san", "python-client")
    try:
        assert call(stubs, secure(certs, port, client=True)).allowed
        with pytest.raises(grpc.RpcError):
            call(stubs, secure(certs, port, client=False))
    finally:
        proc.terminate()
        proc.wait(timeout=15)
