"""A lease as the Python zae-limiter's: adjustments kept and written with the commit, ``consume``
checked, ``release``, ``flush``; against the real daemon on both stores."""

from __future__ import annotations

import pytest
from conftest import run

from zae_limiter_client import (
    LeaseNotFound,
    Limit,
    RateLimiter,
    RateLimitExceeded,
    SyncRateLimiter,
    ValidationError,
)

# Per day: what a test takes is not refilled while it runs.
LIMITS = [Limit.per_day("tpm", 1000)]


def counting(zl):
    """The calls ``zl`` makes, by method name, recorded as they go out."""
    calls: list[str] = []
    call = zl._call

    def recorded(method, request, *args, **kwargs):
        calls.append(method.path.rsplit("/", 1)[1])
        return call(method, request, *args, **kwargs)

    zl._call = recorded
    return calls


def test_adjustments_are_written_with_the_commit_in_one_call(daemon, entity):
    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            calls = counting(zl)
            async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
                await lease.adjust(tpm=300)
                await lease.adjust({"tpm": -50})
                await lease.release(tpm=20)
                during = list(calls)
                held = lease.consumed
            after = list(calls)
            return during, held, after, await zl.available(entity, "gpt-4", limits=LIMITS)

    during, held, after, available = run(scenario())
    assert during == ["Acquire"], "adjust and release make no call"
    assert held == {"tpm": 330}
    assert after == ["Acquire", "Commit"]
    assert available == {"tpm": 670}


def test_giving_back_more_than_the_lease_holds_is_refused_at_once(daemon, entity):
    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
                await lease.adjust(tpm=50)
                with pytest.raises(ValidationError) as refused:
                    await lease.release(tpm=151)
                assert lease.consumed == {"tpm": 150}, "the refused call changed nothing"
            return refused.value, await zl.available(entity, "gpt-4", limits=LIMITS)

    refused, available = run(scenario())
    assert refused.field == "delta[tpm]" and "more than the lease holds (150)" in str(refused)
    assert available == {"tpm": 850}


def test_an_adjustment_the_daemon_refuses_raises_at_exit_and_the_lease_is_committed(
    daemon, entity
):
    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            with pytest.raises(ValidationError) as refused:
                async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
                    await lease.adjust(tpm=10, tpmm=5)  # a typo: the lease has no "tpmm"
            return refused.value, lease, await zl.available(entity, "gpt-4", limits=LIMITS)

    refused, lease, available = run(scenario())
    assert "tpmm" in str(refused)
    assert lease.closed
    # What the acquire took stays consumed; the refused adjustments were not written.
    assert available == {"tpm": 900}


def test_consume_takes_more_checked_and_goes_with_the_lease(daemon, entity):
    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
                await lease.consume(tpm=600)
                assert lease.consumed == {"tpm": 700}
                # The latest decision's: 900 were there for the 600 asked.
                assert [(s.available, s.requested) for s in lease.statuses] == [(900, 600)]
                with pytest.raises(RateLimitExceeded) as refused:
                    await lease.consume(tpm=301)
                assert lease.consumed == {"tpm": 700}, "a refused consume takes nothing"
                # Gives back more than the acquire took: the rest comes out of what consume took.
                await lease.release(tpm=650)
            committed = await zl.available(entity, "gpt-4", limits=LIMITS)

            with pytest.raises(KeyError):
                async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
                    await lease.consume(tpm=200)
                    raise KeyError("rolled back")
            rolled_back = await zl.available(entity, "gpt-4", limits=LIMITS)
            return refused.value, committed, rolled_back

    refused, committed, rolled_back = run(scenario())
    assert [v.limit_name for v in refused.violations] == ["tpm"]
    assert committed == {"tpm": 950}
    assert rolled_back == committed, "a rollback gives back what consume took too"


def test_flush_writes_what_was_adjusted_so_far_and_the_sync_lease_does_the_same(daemon, entity):
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        calls = counting(zl)
        with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=LIMITS) as lease:
            lease.adjust(tpm=200)
            lease.flush()
            assert calls == ["Acquire", "Adjust"]
            lease.flush()  # nothing pending: a renewal
            assert calls[-1] == "Renew"
            lease.consume(tpm=100)
            lease.release(tpm=350)  # out of the flushed adjustment, the acquire, and consume
            assert lease.consumed == {"tpm": 50}
        assert calls[-2:] == ["Commit", "Commit"], "the lease and what consume took"
        assert zl.available(entity, "gpt-4", limits=LIMITS) == {"tpm": 950}
        with pytest.raises(LeaseNotFound):
            lease.flush()
        with pytest.raises(LeaseNotFound):
            lease.consume(tpm=1)
