"""The socket as other programs reach it: a stock grpcio client with default options, and what a
caller sees when no daemon answers."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading

import grpc
import pytest
from conftest import run, stock_stubs

from zae_limiter_client import RateLimiter, RateLimiterUnavailable, SyncRateLimiter
from zae_limiter_client._proto import ratelimit_pb2 as pb

pb_grpc = stock_stubs()

HEALTH = "/grpc.health.v1.Health/Check"


def test_a_stock_grpcio_client_with_default_options(daemon, entity):
    # gRPC's C core sends the socket path as the HTTP/2 authority; no options set here.
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        check = channel.unary_unary(HEALTH)
        # HealthCheckRequest{} is empty; SERVING is field 1 = 1.
        assert check(b"", timeout=10) == b"\x08\x01"
        stub = pb_grpc.RateLimiterStub(channel)
        limit = pb.Limit(name="rpm", capacity=3, refill_amount=3, refill_period_ms=86_400_000)
        answers = [
            stub.Acquire(
                pb.AcquireRequest(
                    namespace=daemon.namespace,
                    entity_id=entity,
                    resource="gpt-4",
                    consume={"rpm": 1},
                    limits=[limit],
                    commit=True,
                ),
                timeout=10,
            ).allowed
            for _ in range(4)
        ]
    assert answers == [True, True, True, False]


def test_a_stock_grpcio_client_spends_a_quota_and_tops_it_up(daemon, entity):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.RateLimiterStub(channel)
        admin = pb_grpc.AdminStub(channel)
        quota = pb.Limit(name="month", capacity=2, quota_cron="0 0 1 * *", quota_tz="UTC")
        admin.SetLimits(
            pb.SetLimitsRequest(
                namespace=daemon.namespace,
                scope=pb.LimitScope(entity_id=entity),
                limits=[quota],
            ),
            timeout=10,
        )

        def acquire():
            request = pb.AcquireRequest(
                namespace=daemon.namespace,
                entity_id=entity,
                resource="gpt-4",
                consume={"month": 1},
                commit=True,
            )
            return stub.Acquire(request, timeout=10)

        spent = [acquire().allowed for _ in range(3)]
        topped = admin.TopUp(
            pb.BucketRequest(
                namespace=daemon.namespace,
                entity_id=entity,
                resource="gpt-4",
                amounts={"month": 5},
                idempotency_key="order-1",
            ),
            timeout=10,
        )
        after = [acquire().allowed for _ in range(6)]
    assert spent == [True, True, False]
    assert dict(topped.gained_milli) == {"month": 5_000}
    assert after == [True] * 5 + [False], "exactly the 5 bought, past the amount"


def test_a_stock_grpcio_client_is_limited_by_a_schedule_in_force_and_told_which(daemon, entity):
    # Always in force, the first entry halves the limit; a bad entry names its place.
    limit = pb.Limit(
        name="rpm",
        capacity=4,
        refill_amount=4,
        refill_period_ms=86_400_000,
        schedule=[pb.ScheduleEntry(cron="* * * * *", scale_permille=500)],
        schedule_tz="Europe/Berlin",
    )
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        stub = pb_grpc.RateLimiterStub(channel)

        def acquire(limits):
            request = pb.AcquireRequest(
                namespace=daemon.namespace,
                entity_id=entity,
                resource="gpt-4",
                consume={"rpm": 1},
                limits=limits,
                commit=True,
            )
            return stub.Acquire(request, timeout=10)

        answers = [acquire([limit]) for _ in range(3)]
        bad = pb.Limit()
        bad.CopyFrom(limit)
        bad.schedule.add(cron="* * * *", scale_permille=2_000)
        with pytest.raises(grpc.RpcError) as refused:
            acquire([bad])
    assert [a.allowed for a in answers] == [True, True, False]
    (status,) = answers[2].statuses
    assert status.in_force.capacity == 2 and not status.in_force.schedule
    assert status.limit.capacity == 4 and status.limit.schedule_tz == "Europe/Berlin"
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "limits[0].schedule" in refused.value.details()
    assert "entry 1" in refused.value.details()


def test_a_stock_grpc_aio_client_with_default_options(daemon, entity):
    async def scenario():
        async with grpc.aio.insecure_channel(f"unix:{daemon.socket}") as channel:
            stub = pb_grpc.RateLimiterStub(channel)
            request = pb.AvailableRequest(
                namespace=daemon.namespace,
                entity_id=entity,
                resource="gpt-4",
                limits=[pb.Limit(name="rpm", capacity=3, refill_amount=3, refill_period_ms=60_000)],
            )
            answers = await asyncio.gather(*(stub.Available(request, timeout=10) for _ in range(8)))
            return [a.statuses[0].available_milli for a in answers]

    assert run(scenario()) == [3000] * 8


def test_is_available_follows_the_daemon_s_health(daemon):
    async def scenario():
        async with RateLimiter(socket=daemon.socket) as zl:
            return await zl.is_available()

    assert run(scenario()) is True
    assert SyncRateLimiter(socket=daemon.socket).is_available() is True
    missing = os.path.join(tempfile.mkdtemp(), "none.sock")

    async def gone():
        async with RateLimiter(socket=missing) as zl:
            return await asyncio.wait_for(zl.is_available(timeout=1), 30)

    assert run(gone()) is False
    assert SyncRateLimiter(socket=missing).is_available(timeout=1) is False


def test_no_daemon_is_unavailable_naming_the_socket():
    missing = os.path.join(tempfile.mkdtemp(), "none.sock")

    async def scenario():
        async with RateLimiter(socket=missing, timeout=2) as zl:
            with pytest.raises(RateLimiterUnavailable) as err:
                await asyncio.wait_for(zl.consume("e", "r", {"rpm": 1}), 30)
            return err.value

    err = run(scenario())
    assert missing in str(err)
    with pytest.raises(RateLimiterUnavailable, match="none.sock"):
        SyncRateLimiter(socket=missing, timeout=2).available("e", "r")


def test_a_daemon_that_never_answers_fails_by_the_timeout():
    """Something listens on the socket but never speaks HTTP/2 (a hung daemon): the call ends
    with RateLimiterUnavailable when its timeout passes, not a hang."""
    path = os.path.join(tempfile.mkdtemp(), "hung.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:

        async def scenario():
            async with RateLimiter(socket=path, timeout=0.5) as zl:
                assert await asyncio.wait_for(zl.is_available(timeout=0.5), 30) is False
                with pytest.raises(RateLimiterUnavailable) as err:
                    await asyncio.wait_for(zl.consume("e", "r", {"rpm": 1}), 30)
                return err.value

        err = run(scenario())
        assert err.code == "DEADLINE_EXCEEDED"
        assert path in str(err)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
