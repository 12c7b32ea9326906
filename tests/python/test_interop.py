"""A gRPC client nobody here wrote (Python grpcio) against a real sluicegate.

Stubs are generated from proto/ by grpcio-tools at test time, exactly as a user would. The sluicegate
binary comes from SLUICEGATE_BIN (scripts/test.sh builds it and sets it).
"""

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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stubs():
    """sluicegate_pb2 and sluicegate_pb2_grpc generated from proto/ with grpcio-tools."""
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="sluicegate-py-")
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(ROOT / "proto/sluicegate/v1/sluicegate.proto"),
        ]
    )
    assert rc == 0, "grpcio-tools could not compile proto/sluicegate/v1/sluicegate.proto"
    sys.path.insert(0, out)
    from sluicegate.v1 import sluicegate_pb2, sluicegate_pb2_grpc  # noqa: E402

    return sluicegate_pb2, sluicegate_pb2_grpc


@pytest.fixture(scope="module")
def sluicegate():
    binary = os.environ.get("SLUICEGATE_BIN", str(ROOT / "target/debug/sluicegate"))
    assert os.path.exists(binary), f"{binary} missing: run `cargo build` (scripts/test.sh does)"
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "TB_CAPACITY", "TB_RATE")}
    env["RUST_LOG"] = "warn"
    # MAX_QUEUE_MS (10 ms) would shed a call of a debug build that waited for its turn on busy CI cores.
    env["MAX_QUEUE_MS"] = "1000"
    proc = subprocess.Popen(
        [
            binary,
            "--grpc-addr", f"127.0.0.1:{grpc_port}",
            "--http-addr", f"127.0.0.1:{http_port}",
            "--capacity", "3",
            "--rate", "0.001",
        ],
        env=env,
        # Not the repository: a developer's .env there must not reach the test.
        cwd=tempfile.gettempdir(),
    )
    deadline = time.time() + 15
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None, "sluicegate exited during start"
        assert time.time() < deadline, "sluicegate did not become ready"
        time.sleep(0.05)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield channel
    channel.close()
    proc.terminate()
    assert proc.wait(timeout=15) == 0, "sluicegate did not shut down cleanly on SIGTERM"


def test_should_allow_counts_down_then_denies(stubs, sluicegate):
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(sluicegate)
    answers = [stub.ShouldAllow(pb.ShouldAllowRequest(key="py:1"), timeout=2) for _ in range(4)]
    assert [a.allowed for a in answers] == [True, True, True, False]
    assert [round(a.tokens_remaining) for a in answers] == [2, 1, 0, 0]
    assert answers[0].capacity == 3 and answers[0].rate == 0.001
    assert answers[3].retry_after_ms > 0 and answers[0].retry_after_ms == 0
    dry = stub.ShouldAllow(pb.ShouldAllowRequest(key="py:2", cost=2, dry_run=True), timeout=2)
    assert dry.allowed and dry.tokens_remaining == 3


def test_bad_input_is_invalid_argument(stubs, sluicegate):
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(sluicegate)
    with pytest.raises(grpc.RpcError) as err:
        stub.ShouldAllow(pb.ShouldAllowRequest(key="py", capacity=-1), timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "capacity" in err.value.details()


def test_health(sluicegate):
    stub = health_pb2_grpc.HealthStub(sluicegate)
    for service in [
        "",
        "sluicegate.v1.RateLimitService",
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
    ]:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as err:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=2)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def reflect(channel, method, request):
    """One reflection round trip. v1 and v1alpha share their messages on the wire."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=2)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection(sluicegate, version):
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    listed = reflect(sluicegate, method, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "sluicegate.v1.RateLimitService",
        "envoy.service.ratelimit.v3.RateLimitService",
        "envoy.service.rate_limit_quota.v3.RateLimitQuotaService",
        "grpc.health.v1.Health",
    } <= names, names

    found = reflect(
        sluicegate,
        method,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="sluicegate.v1.RateLimitService"),
    )
    from google.protobuf import descriptor_pb2

    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in found.file_descriptor_response.file_descriptor_proto
    ]
    service = next(p for p in protos if p.package == "sluicegate.v1")
    request = next(m for m in service.message_type if m.name == "ShouldAllowRequest")
    assert [f.name for f in request.field] == [
        "key", "cost", "capacity", "rate", "dry_run", "reserve_ttl_ms", "up_to"]
    response = next(m for m in service.message_type if m.name == "ShouldAllowResponse")
    assert [f.name for f in response.field][-1] == "granted"
    # The RPCs a grpcurl user would list: ShouldAllow, ShouldAllowBatch, Settle, and the
    # in-flight limits' Acquire, Release and Renew.
    methods = {m.name for s in service.service for m in s.method}
    assert methods == {"ShouldAllow", "ShouldAllowBatch", "Settle", "Acquire", "Release", "Renew"}, methods
    settle = next(m for m in service.message_type if m.name == "SettleRequest")
    assert [f.name for f in settle.field] == [
        "key", "capacity", "rate", "reserved", "actual", "reservation_id"]


def test_reserve_work_settle(stubs, sluicegate):
    """The pattern of README "Charging what things really cost": reserve an estimate, do the
    work, settle the real cost; less gives the rest back, more goes into debt."""
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(sluicegate)
    shape = dict(capacity=100, rate=0.001)
    reserved = stub.ShouldAllow(
        pb.ShouldAllowRequest(key="py:llm", cost=60, reserve_ttl_ms=60000, **shape), timeout=2
    )
    assert reserved.allowed and round(reserved.tokens_remaining) == 40
    assert len(reserved.reservation_id) == 32
    settle = pb.SettleRequest(
        key="py:llm", actual=25, reservation_id=reserved.reservation_id, **shape
    )
    settled = stub.Settle(settle, timeout=2)
    assert round(settled.tokens_remaining) == 75 and not settled.in_debt
    # Once: a retry answers the same and gives nothing more back.
    assert round(stub.Settle(settle, timeout=2).tokens_remaining) == 75
    # Up to: a lease of what is there (75 of 500 asked), the unused part settled back.
    lease = stub.ShouldAllow(
        pb.ShouldAllowRequest(key="py:llm", cost=500, up_to=True, reserve_ttl_ms=60000, **shape),
        timeout=2,
    )
    assert lease.allowed and lease.granted == 75 and round(lease.tokens_remaining) == 0
    back = stub.Settle(
        pb.SettleRequest(key="py:llm", actual=5, reservation_id=lease.reservation_id, **shape),
        timeout=2,
    )
    assert round(back.tokens_remaining) == 70
    # Without a reservation id, a refund on the caller's word is refused (ALLOW_REFUNDS=false).
    with pytest.raises(grpc.RpcError) as refused:
        stub.Settle(pb.SettleRequest(key="py:llm", reserved=60, actual=0, **shape), timeout=2)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as unknown:
        stub.Settle(pb.SettleRequest(key="py:llm", actual=0, reservation_id="nope", **shape),
                    timeout=2)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    settled = stub.Settle(
        pb.SettleRequest(key="py:llm", reserved=0, actual=120, **shape), timeout=2
    )
    assert round(settled.tokens_remaining) == -50 and settled.in_debt
    again = stub.ShouldAllow(pb.ShouldAllowRequest(key="py:llm", cost=1, **shape), timeout=2)
    assert not again.allowed


def test_in_flight_acquire_renew_release(stubs, sluicegate):
    """README "In-flight limits" from Python: two slots, a third refused, a release frees one."""
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(sluicegate)
    acquire = pb.AcquireRequest(key="py:jobs", max_in_flight=2, lease_ttl_ms=60000)
    first = stub.Acquire(acquire, timeout=2)
    second = stub.Acquire(acquire, timeout=2)
    assert first.granted and second.granted and second.in_flight == 2
    third = stub.Acquire(acquire, timeout=2)
    assert not third.granted and third.lease_id == "" and third.retry_after_ms > 0
    renewed = stub.Renew(
        pb.RenewRequest(key="py:jobs", lease_id=first.lease_id, lease_ttl_ms=60000), timeout=2)
    assert renewed.granted
    released = stub.Release(pb.ReleaseRequest(key="py:jobs", lease_id=first.lease_id), timeout=2)
    assert released.released and released.in_flight == 1
    assert stub.Acquire(acquire, timeout=2).granted
    with pytest.raises(grpc.RpcError) as bad:
        stub.Acquire(pb.AcquireRequest(key="py:jobs"), timeout=2)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.value.details().startswith("max_in_flight")


def test_batch_all_or_nothing(stubs, sluicegate):
    pb, pb_grpc = stubs
    stub = pb_grpc.RateLimitServiceStub(sluicegate)
    shape = dict(capacity=5, rate=0.001)
    stub.ShouldAllow(pb.ShouldAllowRequest(key="py:org", cost=5, **shape), timeout=2)
    batch = stub.ShouldAllowBatch(
        pb.ShouldAllowBatchRequest(
            requests=[
                pb.ShouldAllowRequest(key="py:user", cost=2, **shape),
                pb.ShouldAllowRequest(key="py:org", cost=1, **shape),
            ],
            all_or_nothing=True,
        ),
        timeout=2,
    )
    assert not batch.allowed
    assert [r.allowed for r in batch.responses] == [True, False]
    user = stub.ShouldAllow(
        pb.ShouldAllowRequest(key="py:user", cost=5, dry_run=True, **shape), timeout=2
    )
    assert user.allowed, "the user's bucket was not charged"


def test_reflection_stub_from_grpcio_reflection(sluicegate):
    """The stock grpcio-reflection client (v1alpha) works unchanged."""
    stub = reflection_pb2_grpc.ServerReflectionStub(sluicegate)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
    )
    names = {s.name for s in next(iter(responses)).list_services_response.service}
    assert "sluicegate.v1.RateLimitService" in names


def test_envoy_rls_through_reflection_only(sluicegate):
    """Envoy's RateLimitRequest resolved from reflection (no proto files), as grpcurl would."""
    found = reflect(
        sluicegate,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="envoy.service.ratelimit.v3.RateLimitService"
        ),
    )
    from google.protobuf import descriptor_pb2

    names = {
        descriptor_pb2.FileDescriptorProto.FromString(b).name
        for b in found.file_descriptor_response.file_descriptor_proto
    }
    assert "envoy/service/ratelimit/v3/rls.proto" in names, names
