"""The asyncio transport (_h2, _hpack) on its own and against the daemon at its edges."""

from __future__ import annotations

import asyncio
import gc
import os

import pytest
from conftest import Daemon, run

from zae_limiter_client import Limit, RateLimiter, RateLimiterUnavailable, ValidationError
from zae_limiter_client import _hpack


def test_hpack_decodes_the_rfc_7541_response_examples_with_huffman():
    # RFC 7541 C.6: three responses with Huffman coding and a 256-byte table (evictions).
    decoder = _hpack.Decoder(256)
    decoder.max_size = 256
    first = decoder.decode(
        bytes.fromhex(
            "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad"
            "171863c78f0b97c8e9ae82ae43d3"
        )
    )
    assert first == [
        (b":status", b"302"),
        (b"cache-control", b"private"),
        (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
        (b"location", b"https://www.example.com"),
    ]
    second = decoder.decode(bytes.fromhex("4883640effc1c0bf"))
    assert second[0] == (b":status", b"307") and second[3] == first[3]
    third = decoder.decode(
        bytes.fromhex(
            "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6"
            "c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007"
        )
    )
    assert third[0] == (b":status", b"200")
    assert third[5] == (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
    assert decoder.size == 215


@pytest.mark.parametrize(
    "block",
    [b"\x80", b"\xff\xff\xff\xff\xff\xff", b"\x40\x81", b"\x00\x85\xff", b"\x3f\xe2\x1f"],
)
def test_hpack_refuses_broken_blocks(block):
    with pytest.raises(_hpack.HpackError):
        _hpack.Decoder().decode(block)


def test_a_request_larger_than_the_flow_control_window_is_sent_and_answered(daemon):
    # 200 KB: more than HTTP/2's initial 64 KiB window, so the transport waits for WINDOW_UPDATEs.
    huge = "e" * 200_000

    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            with pytest.raises(ValidationError) as err:
                await zl.consume(huge, "gpt-4", {"rpm": 1}, limits=[Limit.per_minute("rpm", 1)])
            return err.value

    assert run(scenario()).field == "entity_id"


def test_cancelled_calls_leave_the_connection_usable(daemon, entity):
    limits = [Limit.per_day("rpm", 1000)]

    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            tasks = [
                asyncio.ensure_future(zl.consume(entity, "gpt-4", {"rpm": 1}, limits=limits))
                for _ in range(50)
            ]
            await asyncio.sleep(0)
            for task in tasks[::2]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            admitted = sum(1 for t in tasks if not t.cancelled() and t.exception() is None)
            await zl.consume(entity, "gpt-4", {"rpm": 1}, limits=limits)
            left = (await zl.available(entity, "gpt-4", limits=limits))["rpm"]
            return admitted, left

    admitted, left = run(scenario())
    assert admitted >= 25
    # A cancelled call is charged only if the daemon decided before it heard the cancel.
    assert left <= 1000 - admitted - 1


def test_a_restarted_daemon_is_reconnected(tmp_path):
    """One limiter, one event loop: the daemon goes away (calls fail as unavailable, no hang)
    and comes back on the same socket (the next call opens a new connection)."""
    socket_path = str(tmp_path / "zl.sock")
    limits = [Limit.per_minute("rpm", 100)]
    daemons = [Daemon("memory", socket_path=socket_path)]
    namespace = daemons[0].namespace

    async def scenario():
        async with RateLimiter(socket=socket_path, namespace=namespace, timeout=5) as zl:
            await zl.consume("e", "r", {"rpm": 1}, limits=limits)
            # In a thread: the event loop must keep running to hear the daemon's GOAWAY.
            await asyncio.to_thread(daemons[0].stop)
            with pytest.raises(RateLimiterUnavailable):
                await zl.consume("e", "r", {"rpm": 1}, limits=limits)
            restarted = await asyncio.to_thread(
                Daemon, "memory", socket_path=socket_path, namespace=namespace
            )
            daemons.append(restarted)
            await zl.consume("e", "r", {"rpm": 1}, limits=limits)
            return await zl.available("e", "r", limits=limits)

    try:
        # The new daemon's memory store starts empty: one call since the restart.
        assert run(scenario()) == {"rpm": 99}
    finally:
        for daemon in daemons[1:]:
            daemon.stop()


def test_a_forked_child_opens_its_own_connection(daemon):
    limits = [Limit.per_minute("rpm", 100)]
    zl = RateLimiter(socket=daemon.socket, namespace=daemon.namespace)
    run(zl.consume("fork", "r", {"rpm": 1}, limits=limits))
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection belongs to another process and loop
        try:
            run(zl.consume("fork", "r", {"rpm": 1}, limits=limits))
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    left = run(zl.available("fork", "r", limits=limits))
    assert left == {"rpm": 98}
    # The connections of the finished event loops close with the limiter.
    del zl
    gc.collect()
