"""The client against the real daemon, with the memory store and with DynamoDB Local."""

from __future__ import annotations

import asyncio
import datetime
import json
import time

import pytest
from conftest import Daemon, run

from zae_limiter_client import (
    EntityExistsError,
    FailedPrecondition,
    LeaseNotFound,
    Limit,
    OnUnavailable,
    RateLimiter,
    RateLimiterUnavailable,
    ResourceDisabled,
    RateLimitExceeded,
    SyncRateLimiter,
    ValidationError,
)


def limiter(daemon) -> RateLimiter:
    return RateLimiter(socket=daemon.socket, namespace=daemon.namespace)


def test_admits_then_refuses_with_retry_after(daemon, entity):
    limits = [Limit.per_minute("rpm", 2)]

    async def scenario():
        async with limiter(daemon) as zl:
            for _ in range(2):
                statuses = await zl.consume(entity, "gpt-4", {"rpm": 1}, limits=limits)
                assert [s.limit_name for s in statuses] == ["rpm"]
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, "gpt-4", {"rpm": 1}, limits=limits)
            return refused.value

    err = run(scenario())
    # One token comes back every 30 s.
    assert 0 < err.retry_after_seconds <= 30
    assert err.retry_after_header == str(int(err.retry_after_seconds) + 1)
    assert not err.never_fits and err.as_dict()["never_fits"] is False
    assert err.contended is False and err.as_dict()["contended"] is False, "refused by the limit"
    assert [v.limit_name for v in err.violations] == ["rpm"]
    assert err.passed == []
    assert err.primary_violation.limit_name == "rpm"
    assert err.refused_by is None
    body = json.loads(json.dumps(err.as_dict()))
    assert body["error"] == "rate_limit_exceeded"
    assert body["limits"][0]["entity_id"] == entity
    assert body["limits"][0]["available"] == 0
    assert body["limits"][0]["requested"] == 1
    assert body["limits"][0]["capacity"] == 2


def test_a_request_that_can_never_fit_still_gets_a_whole_retry_after_header(daemon, entity):
    """The README's 429 handler sends ``Retry-After: e.retry_after_header``: always an integer
    string (the library's wait for the deficit), and the body says that no wait helps. The limit
    is stored, so the daemon's statuses carry it."""

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(entity, [Limit.per_minute("rpm", 10)], resource="gpt-4")
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, "gpt-4", {"rpm": 11})
            return refused.value

    err = run(scenario())
    assert err.retry_after_seconds is None
    assert err.never_fits
    # A deficit of 1 token at 10 a minute: 6 s, so "7".
    assert err.retry_after_header == "7"
    body = err.as_dict()
    assert body["never_fits"] is True
    assert body["limits"][0]["capacity"] == 10, "the stored limit came with the status"


def test_adjust_into_debt_makes_the_next_wait_longer(daemon, entity):
    # The Python zae-limiter's measured case: capacity 1000/min, consume 100, adjust +2000.
    limits = [Limit.per_minute("tpm", 1000)]

    async def scenario():
        async with limiter(daemon) as zl:
            async with zl.acquire(entity, "gpt-4", {"tpm": 100}, limits=limits) as lease:
                assert [(st.limit_name, st.requested, st.exceeded) for st in lease.statuses] == [
                    ("tpm", 100, False)
                ]
                await lease.adjust(tpm=2000)
                assert lease.consumed == {"tpm": 2100}
            available = await zl.available(entity, "gpt-4", limits=limits)
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, "gpt-4", {"tpm": 1}, limits=limits)
            return available, refused.value

    available, err = run(scenario())
    assert -1100 <= available["tpm"] < -1090
    # 1,101 tokens at 1000/min: about 66 s.
    assert 60 < err.retry_after_seconds <= 66.1
    assert err.violations[0].available < -1090


def test_an_exception_rolls_back_and_is_reraised(daemon, entity):
    limits = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 1000)]

    async def scenario():
        async with limiter(daemon) as zl:
            before = await zl.available(entity, "gpt-4", limits=limits)
            with pytest.raises(KeyError, match="boom"):
                async with zl.acquire(
                    entity, "gpt-4", {"rpm": 1, "tpm": 500}, limits=limits
                ) as lease:
                    await lease.adjust(tpm=300)
                    raise KeyError("boom")
            after = await zl.available(entity, "gpt-4", limits=limits)
            return before, after, lease

    before, after, lease = run(scenario())
    assert before == {"rpm": 10, "tpm": 1000}
    assert after == before
    assert lease.closed


def test_a_clean_exit_commits_what_was_adjusted(daemon, entity):
    limits = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 1000)]

    async def scenario():
        async with limiter(daemon) as zl:
            async with zl.acquire(entity, "gpt-4", {"rpm": 1, "tpm": 500}, limits=limits) as lease:
                await lease.adjust(tpm=-200)
            after = await zl.available(entity, "gpt-4", limits=limits)
            with pytest.raises(LeaseNotFound):
                await lease.adjust(tpm=1)
            with pytest.raises(LeaseNotFound):
                await lease.commit()
            return after

    after = run(scenario())
    # Refill during the test is at most a few tokens of tpm (1000/min).
    assert after["rpm"] == 9
    assert 700 <= after["tpm"] < 710


def test_a_cascading_child_is_refused_by_its_parent(daemon, entity):
    parent, child = f"{entity}-project", f"{entity}-key"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(parent, name="Production")
            await zl.set_limits(parent, [Limit.per_day("rpm", 2)])
            created = await zl.create_entity(child, parent_id=parent, cascade=True)
            assert created.parent_id == parent and created.cascade
            await zl.set_limits(child, [Limit.per_day("rpm", 100)])
            with pytest.raises(EntityExistsError):
                await zl.create_entity(parent)
            assert [c.id for c in await zl.get_children(parent)] == [child]
            for _ in range(2):
                await zl.consume(child, "gpt-4", {"rpm": 1})
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(child, "gpt-4", {"rpm": 1})
            child_left = await zl.available(child, "gpt-4")
            return refused.value, child_left

    err, child_left = run(scenario())
    assert err.refused_by == parent
    assert parent in str(err)
    assert err.violations[0].entity_id == parent
    assert child_left == {"rpm": 98}


def test_stored_limits_resolve_entity_resource_then_entity_then_resource_then_system(
    daemon, entity
):
    resource = f"model-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            seen = []
            await zl.set_system_defaults([Limit.per_day("rpm", 1000)])
            await zl.set_resource_defaults(resource, [Limit.per_day("rpm", 50)])
            seen.append(await zl.available(entity, resource))
            await zl.set_limits(entity, [Limit.per_day("rpm", 40)])
            seen.append(await zl.available(entity, resource))
            await zl.set_limits(entity, [Limit.per_day("rpm", 30, burst=35)], resource=resource)
            seen.append(await zl.available(entity, resource))
            stored = await zl.get_limits(entity, resource=resource)
            await zl.delete_limits(entity, resource=resource)
            await zl.delete_limits(entity)
            seen.append(await zl.available(entity, resource))
            await zl.delete_resource_defaults(resource)
            defaults = await zl.get_resource_defaults(resource)
            events = await zl.get_audit_events(entity)
            return seen, stored, defaults, events

    seen, stored, defaults, events = run(scenario())
    # A fresh bucket of each resolved set starts full.
    assert seen[:3] == [{"rpm": 50}, {"rpm": 40}, {"rpm": 35}]
    assert stored == [Limit("rpm", 35, 30, 86_400)]
    assert defaults == []
    assert [e.action for e in events] == ["limits_deleted"] * 2 + ["limits_set"] * 2
    assert all(e.subject == entity for e in events)


def test_a_soft_limit_is_debited_into_debt_and_never_refuses(daemon, entity):
    """Stored soft, then soft for one call only: debited and reported, never the refusal; the
    hard limit beside it still refuses."""
    resource = f"model-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(
                entity,
                [Limit.per_day("rpm", 100), Limit.per_day("tpm", 1_000, soft=True)],
                resource=resource,
            )
            stored = await zl.get_limits(entity, resource=resource)
            overdrawn = []
            for _ in range(3):
                async with zl.acquire(entity, resource, {"rpm": 1, "tpm": 400}) as lease:
                    overdrawn.append(lease.overdrawn)
            statuses = lease.statuses
            left = await zl.available(entity, resource)
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, resource, {"rpm": 200, "tpm": 1})
            # The same limit given hard for one call refuses what soft admitted.
            hard = [Limit.per_day("rpm", 100), Limit.per_day("tpm", 1_000)]
            with pytest.raises(RateLimitExceeded) as hard_refused:
                await zl.consume(entity, resource, {"rpm": 1, "tpm": 1}, limits=hard)
            soft_once = [Limit.per_day("rpm", 100), Limit.per_day("tpm", 1_000, soft=True)]
            await zl.consume(entity, resource, {"rpm": 1, "tpm": 1}, limits=soft_once)
            return stored, overdrawn, statuses, left, refused.value, hard_refused.value

    stored, overdrawn, statuses, left, refused, hard_refused = run(scenario())
    assert stored == [Limit.per_day("rpm", 100), Limit.per_day("tpm", 1_000, soft=True)]
    assert overdrawn == [[], [], ["tpm"]]
    tpm = next(s for s in statuses if s.limit_name == "tpm")
    assert tpm.soft and tpm.overdrawn and not tpm.exceeded and tpm.deficit == 0
    assert tpm.retry_after_seconds == 0
    assert left == {"rpm": 97, "tpm": -200}
    # Refused by rpm alone: tpm (soft, in debt) is among the passed.
    assert [v.limit_name for v in refused.violations] == ["rpm"]
    assert [p.limit_name for p in refused.passed] == ["tpm"]
    assert [v.limit_name for v in hard_refused.violations] == ["tpm"]


def test_the_sync_limiter_has_the_same_methods(daemon, entity):
    limits = [Limit.per_minute("rpm", 5)]
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        with zl.acquire(entity, "gpt-4", {"rpm": 1}, limits=limits) as lease:
            lease.adjust(rpm=1)
        with pytest.raises(RuntimeError):
            with zl.acquire(entity, "gpt-4", {"rpm": 1}, limits=limits):
                raise RuntimeError("rolled back")
        zl.consume(entity, "gpt-4", {"rpm": 1}, limits=limits)
        assert zl.available(entity, "gpt-4", limits=limits) == {"rpm": 2}
        with pytest.raises(RateLimitExceeded):
            zl.consume(entity, "gpt-4", {"rpm": 3}, limits=limits)
        assert zl.time_until_available(entity, "gpt-4", {"rpm": 2}, limits=limits) == 0
        assert zl.time_until_available(entity, "gpt-4", {"rpm": 6}, limits=limits) == float("inf")
        assert 0 < zl.time_until_available(entity, "gpt-4", {"rpm": 3}, limits=limits) <= 12
        zl.create_entity(entity, name="sync")
        assert zl.get_entity(entity).name == "sync"
        assert zl.get_entity(entity + "-missing") is None
        zl.delete_entity(entity)
        assert zl.get_entity(entity) is None


def test_32_concurrent_tasks_never_over_admit(daemon, entity):
    limits = [Limit.per_day("rpm", 20)]

    async def scenario():
        async with limiter(daemon) as zl:
            admitted = refused = 0

            async def worker():
                nonlocal admitted, refused
                for _ in range(3):
                    try:
                        async with zl.acquire(entity, "gpt-4", {"rpm": 1}, limits=limits) as lease:
                            await asyncio.sleep(0)
                            await lease.adjust(rpm=0)
                        admitted += 1
                    except RateLimitExceeded:
                        refused += 1

            await asyncio.gather(*(worker() for _ in range(32)))
            left = await zl.available(entity, "gpt-4", limits=limits)
            return admitted, refused, left

    admitted, refused, left = run(scenario())
    # Per day: no token comes back while the test runs.
    assert admitted == 20
    assert refused == 32 * 3 - 20
    assert left == {"rpm": 0}


def test_bad_input_is_a_validation_error_naming_the_field(daemon, entity):
    limits = [Limit.per_minute("rpm", 5)]

    async def scenario():
        async with limiter(daemon) as zl:
            errors = []
            for call in (
                lambda: zl.consume("", "gpt-4", {"rpm": 1}, limits=limits),
                lambda: zl.consume(entity, "gpt-4", {"rpm": 10**16}, limits=limits),
                lambda: zl.consume(entity, "gpt-4", {"tpm": 1}, limits=limits),
                lambda: zl.consume(entity, "gpt-4", {"rpm": 1}, limits=[Limit("rpm", 0, 1, 1)]),
                lambda: zl.consume(entity, "gpt-4", {"rpm": -1}, limits=limits),
                lambda: zl.consume(entity, 7, {"rpm": 1}, limits=limits),
            ):
                with pytest.raises(ValidationError) as err:
                    await call()
                errors.append(err.value)
            return errors, await zl.available(entity, "gpt-4", limits=limits)

    errors, left = run(scenario())
    fields = [(e.code, e.field) for e in errors]
    assert fields[0] == ("INVALID_ARGUMENT", "entity_id")
    assert fields[1] == ("OUT_OF_RANGE", "consume[rpm]")
    assert fields[2][0] == "INVALID_ARGUMENT" and "tpm" in errors[2].message
    assert fields[3][0] == "INVALID_ARGUMENT" and fields[3][1].startswith("limits[0]")
    assert fields[4] == (None, "consume[rpm]")  # refused before sending
    assert fields[5] == (None, "resource")
    assert left == {"rpm": 5}, "nothing was consumed"
    # The field comes from the daemon's structured detail (google.rpc.BadRequest), over grpcio too.
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        with pytest.raises(ValidationError) as err:
            zl.consume(entity, "gpt-4", {"rpm": 10**16}, limits=limits)
    assert (err.value.code, err.value.field) == ("OUT_OF_RANGE", "consume[rpm]")


def test_closing_a_lease_twice_or_the_other_way(daemon, entity):
    limits = [Limit.per_minute("rpm", 5)]

    async def scenario():
        async with limiter(daemon) as zl:
            async with zl.acquire(entity, "gpt-4", {"rpm": 2}, limits=limits) as lease:
                await lease.rollback()
            with pytest.raises(LeaseNotFound):
                await lease.commit()
            return await zl.available(entity, "gpt-4", limits=limits)

    assert run(scenario()) == {"rpm": 5}


def test_entities_audit_and_usage(daemon, entity):
    parent = f"{entity}-p"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(parent)
            await zl.create_entity(entity, name="key", metadata={"team": "a"})
            moved = await zl.set_parent(entity, parent)
            with pytest.raises(FailedPrecondition):
                await zl.set_parent(parent, entity)  # a cycle
            await zl.consume(entity, "gpt-4", {"tpm": 7}, limits=[Limit.per_minute("tpm", 100)])
            deadline = time.monotonic() + 30
            usage = []
            while not usage and time.monotonic() < deadline:
                usage, _ = await zl.get_usage_snapshots(
                    entity, resource="gpt-4", window_type="hourly"
                )
                await asyncio.sleep(0.1)
            events = await zl.get_audit_events(entity, limit=10)
            return moved, usage, events, await zl.get_entity(entity)

    moved, usage, events, got = run(scenario())
    assert moved.parent_id == parent
    assert got.metadata == {"team": "a"}
    assert usage and usage[0].consumed == {"tpm": 7.0} and usage[0].period == "hour"
    assert len(events) >= 2 and events.next_page is None


def test_a_held_lease_lives_past_the_ttl_and_an_abandoned_one_expires():
    """The limiter renews the leases it holds, so an LLM stream longer than the daemon's lease TTL
    keeps its lease; a lease nobody renews expires and what it took stays consumed."""
    import grpc

    from conftest import Daemon
    from zae_limiter_client._proto import ratelimit_pb2 as pb

    d = Daemon("memory", extra="lease_ttl_ms = 2000\n")
    try:
        # A day's worth: the seconds this test takes refill less than a token.
        limits = [Limit.per_day("tpm", 1000)]

        async def held_async():
            async with RateLimiter(socket=d.socket, namespace=d.namespace) as zl:
                async with zl.acquire("async", "gpt-4", {"tpm": 100}, limits=limits) as lease:
                    assert lease.ttl_seconds == 2.0
                    await asyncio.sleep(6.5)
                    await lease.adjust(tpm=400)
                return await zl.available("async", "gpt-4", limits=limits)

        assert run(held_async()) == {"tpm": 500}
        with SyncRateLimiter(socket=d.socket, namespace=d.namespace) as zl:
            with zl.acquire("sync", "gpt-4", {"tpm": 100}, limits=limits) as lease:
                time.sleep(6.5)
                lease.adjust(tpm=400)
            assert zl.available("sync", "gpt-4", limits=limits) == {"tpm": 500}
            # Abandoned: acquired by a client that never calls again.
            with grpc.insecure_channel(f"unix:{d.socket}") as channel:
                acquire = channel.unary_unary(
                    "/zae_limiter.v1.RateLimiter/Acquire",
                    request_serializer=pb.AcquireRequest.SerializeToString,
                    response_deserializer=pb.AcquireResponse.FromString,
                )
                answer = acquire(
                    pb.AcquireRequest(
                        namespace=d.namespace,
                        entity_id="gone",
                        resource="gpt-4",
                        consume={"tpm": 100},
                        limits=[limits[0]._to_pb()],
                    )
                )
                assert answer.allowed and answer.lease_ttl_ms == 2000
                time.sleep(4.5)
                commit = channel.unary_unary(
                    "/zae_limiter.v1.RateLimiter/Commit",
                    request_serializer=pb.LeaseRequest.SerializeToString,
                    response_deserializer=pb.LeaseResponse.FromString,
                )
                with pytest.raises(grpc.RpcError) as expired:
                    commit(pb.LeaseRequest(lease_id=answer.lease_id))
                assert expired.value.code() == grpc.StatusCode.NOT_FOUND
            assert zl.available("gone", "gpt-4", limits=limits) == {"tpm": 900}
    finally:
        d.stop()


def test_a_call_names_its_own_failure_policy_over_the_daemon_s():
    """The store cannot be reached and the daemon's policy is ``block``: a call that says
    ``allow`` is admitted (unrecorded), one that says nothing is refused as unavailable, and a
    policy that is neither is refused before anything is sent."""
    closed = socket_free_port()
    daemon = Daemon(
        "dynamodb",
        extra='failure_policy = "block"\n[server]\nrequest_timeout_ms = 1000',
        endpoint=f"http://127.0.0.1:{closed}",
    )
    limits = [Limit.per_minute("rpm", 10)]
    try:
        with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            with zl.acquire("e", "r", {"rpm": 1}, limits=limits, on_unavailable="allow") as lease:
                lease.adjust(rpm=1)  # an unbacked lease: nothing is written
            statuses = zl.consume(
                "e", "r", {"rpm": 1}, limits=limits, on_unavailable=OnUnavailable.ALLOW
            )
            assert statuses == []
            with pytest.raises(RateLimiterUnavailable):
                zl.consume("e", "r", {"rpm": 1}, limits=limits)
            with pytest.raises(ValidationError) as bad:
                zl.consume("e", "r", {"rpm": 1}, limits=limits, on_unavailable="sometimes")
            assert bad.value.field == "on_unavailable"
    finally:
        daemon.stop()


def socket_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_namespace_failure_policy_is_stored_with_the_system_defaults(daemon, entity):
    async def scenario():
        async with RateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
            seen = [await zl.get_failure_policy()]
            await zl.set_failure_policy("allow")
            seen.append(await zl.get_failure_policy())
            limits = [Limit.per_day("rpm", 1000)]
            await zl.set_system_defaults(limits, on_unavailable=OnUnavailable.BLOCK)
            seen.append(await zl.get_failure_policy())
            stored = await zl.get_system_defaults()
            with pytest.raises(ValidationError):
                await zl.set_system_defaults(limits, on_unavailable="maybe")
            await zl.delete_failure_policy()
            seen.append(await zl.get_failure_policy())
            await zl.delete_system_defaults()
            events = await zl.get_audit_events("#system")
            return seen, stored, events

    seen, stored, events = run(scenario())
    assert seen == [None, OnUnavailable.ALLOW, OnUnavailable.BLOCK, None]
    assert stored == ([Limit.per_day("rpm", 1000)], OnUnavailable.BLOCK), "as the library's"
    # The newest four (records of one millisecond have no order among them).
    assert sorted(e.action for e in events.events[:4]) == [
        "failure_policy_deleted",
        "failure_policy_set",
        "limits_deleted",
        "limits_set",
    ]


def test_a_disabled_resource_is_refused_before_limits_and_an_entity_can_be_carved_out(
    daemon, entity
):
    resource = f"model-{entity}"
    limits = [Limit.per_minute("rpm", 100)]

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.disable_resource(resource)
            with pytest.raises(ResourceDisabled) as refused:
                # Over limit too, and asking to be let through: disabled is the answer.
                await zl.consume(
                    entity, resource, {"rpm": 500}, limits=limits, on_unavailable="allow"
                )
            await zl.enable_entity(entity)
            carved_out = await zl.consume(entity, resource, {"rpm": 1}, limits=limits)
            await zl.disable_entity(entity, resource)
            with pytest.raises(ResourceDisabled) as nearest:
                async with zl.acquire(entity, resource, {"rpm": 1}, limits=limits):
                    pass
            await zl.clear_entity_disabled(entity, resource)
            await zl.clear_entity_disabled(entity)
            await zl.clear_resource_disabled(resource)
            served = await zl.consume(entity, resource, {"rpm": 1}, limits=limits)
            left = await zl.available(entity, resource, limits=limits)
            return refused.value, carved_out, nearest.value, served, left

    refused, carved_out, nearest, served, left = run(scenario())
    assert (refused.entity_id, refused.resource) == (entity, resource)
    assert refused.level == f"resource {resource}"
    assert isinstance(refused, FailedPrecondition) and refused.code == "FAILED_PRECONDITION"
    assert nearest.level == f"entity {entity} on resource {resource}"
    assert [s.limit_name for s in carved_out] == [s.limit_name for s in served] == ["rpm"]
    assert left == {"rpm": 98}, "the refused calls took nothing"


def test_check_availability_answers_from_one_snapshot(daemon, entity):
    limits = [Limit.per_minute("rpm", 10), Limit.per_minute("tpm", 100, soft=True)]

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.consume(entity, "gpt-4", {"rpm": 8, "tpm": 150}, limits=limits)
            short = await zl.check_availability(
                entity, "gpt-4", {"rpm": 5, "tpm": 10}, limits=limits
            )
            idle = await zl.check_availability(entity, "gpt-4", limits=limits)
            never = await zl.check_availability(entity, "gpt-4", {"rpm": 11}, limits=limits)
            return short, idle, never

    short, idle, never = run(scenario())
    assert not short.allowed and short.exceeded == ["rpm"]
    assert short.deficit == {"rpm": 3}
    assert short.available["rpm"] == 2 and short.available["tpm"] == -50
    assert short.needed == {"rpm": 5, "tpm": 10}
    # Three tokens at one per 6 s (the refill since the consume may have brought part of one).
    assert 0 < short.retry_after_seconds <= 18
    tpm = short.status("tpm")
    assert tpm.soft and not tpm.exceeded and tpm.overdrawn
    assert idle.allowed and idle.retry_after_seconds == 0 and idle.needed == {}
    assert never.retry_after_seconds == float("inf") and never.exceeded == ["rpm"]
    assert short.checked_at_ms <= idle.checked_at_ms


def test_several_resources_are_acquired_all_or_none(daemon, entity):
    model, budget = f"model-{entity}", f"budget-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_resource_defaults(model, [Limit.per_hour("tpm", 1000)])
            await zl.set_resource_defaults(budget, [Limit.per_day("weekly", 50)])
            async with zl.acquire(
                entity, model, {"tpm": 100}, also={budget: {"weekly": 10}}
            ) as lease:
                assert lease.resources == (model, budget)
                assert lease.resource(model) is lease
                held = lease.resource(budget)
                assert [s.resource for s in held.statuses] == [budget]
                await lease.adjust(tpm=20)
                await held.adjust(weekly=-5)
                with pytest.raises(ValidationError):
                    lease.resource("elsewhere")
            # The budget refuses: the model's share is given back.
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, model, {"tpm": 1}, also={budget: {"weekly": 46}})
            # An exception inside the block rolls back every resource.
            with pytest.raises(KeyError):
                async with zl.acquire(entity, model, {"tpm": 1}, also={budget: {"weekly": 1}}):
                    raise KeyError("the work failed")
            with pytest.raises(ValidationError) as invalid:
                await zl.consume(entity, model, {"tpm": 1}, also={budget: {"nope": 1}})
            with pytest.raises(ValidationError) as with_limits:
                await zl.consume(
                    entity,
                    model,
                    {"tpm": 1},
                    limits=[Limit.per_hour("tpm", 5)],
                    also={budget: {"weekly": 1}},
                )
            statuses = await zl.consume(entity, model, {"tpm": 1}, also={budget: {"weekly": 1}})
            left = (await zl.available(entity, model), await zl.available(entity, budget))
            return refused.value, invalid.value, with_limits.value, statuses, left

    refused, invalid, with_limits, statuses, left = run(scenario())
    assert refused.refused_resource == budget
    assert [(v.resource, v.limit_name) for v in refused.violations] == [(budget, "weekly")]
    assert {s.resource for s in refused.statuses} == {model, budget}
    assert refused.as_dict()["refused_resource"] == budget
    assert invalid.field == "also[0].consume", invalid
    assert with_limits.field == "also", with_limits
    assert [(s.resource, s.limit_name) for s in statuses] == [(model, "tpm"), (budget, "weekly")]
    assert left == ({"tpm": 879}, {"weekly": 44})


def test_the_sync_limiter_acquires_several_resources(daemon, entity):
    model, budget = f"model-{entity}", f"budget-{entity}"
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        zl.set_resource_defaults(model, [Limit.per_hour("tpm", 1000)])
        zl.set_resource_defaults(budget, [Limit.per_day("weekly", 50)])
        with zl.acquire(entity, model, {"tpm": 10}, also={budget: {"weekly": 10}}) as lease:
            lease.resource(budget).adjust(weekly=1)
        with pytest.raises(RuntimeError):
            with zl.acquire(entity, model, {"tpm": 10}, also={budget: {"weekly": 10}}):
                raise RuntimeError("rolled back")
        assert zl.available(entity, model) == {"tpm": 990}
        assert zl.available(entity, budget) == {"weekly": 39}


def test_cascade_is_set_per_resource_and_per_entity(daemon, entity):
    org, key, model = f"org-{entity}", f"key-{entity}", f"model-{entity}"
    limits = [Limit.per_hour("tok", 100)]

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(org)
            await zl.create_entity(key, parent_id=org, cascade=True)
            await zl.set_limits(org, limits)
            await zl.set_limits(key, limits)
            await zl.set_resource_cascade(model, False)  # off for the model, for everyone...
            await zl.consume(key, model, {"tok": 1})
            await zl.set_entity_cascade(key, True, resource=model)  # ...but this key
            await zl.consume(key, model, {"tok": 2})
            read = (
                await zl.get_resource_cascade(model),
                await zl.get_entity_cascade(key, resource=model),
                await zl.get_entity_cascade(key),
            )
            await zl.clear_entity_cascade(key, resource=model)
            await zl.clear_resource_cascade(model)
            await zl.consume(key, model, {"tok": 4})  # the entity's own flag again
            with pytest.raises(ValidationError):
                await zl.set_resource_cascade(model, "yes")
            return read, await zl.available(org, model)

    read, left = run(scenario())
    assert read == (False, True, None)
    assert left == {"tok": 94}, "charged 2 and 4, not 1"


def test_a_bypassed_entity_is_counted_not_debited_and_its_parent_is_charged(daemon, entity):
    org, key, model = f"org-{entity}", f"key-{entity}", f"model-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(org)
            await zl.create_entity(key, parent_id=org, cascade=True)
            await zl.set_limits(org, [Limit.per_day("tok", 100)])
            await zl.set_limits(key, [Limit.per_day("tok", 10)])
            await zl.disable_resource(model)
            await zl.bypass_entity(key, until=datetime.timedelta(hours=1))
            async with zl.acquire(key, model, {"tok": 30}) as lease:
                await lease.adjust(tok=20)
                bypassed = lease.bypassed
            seen = await zl.check_availability(key, model, {"tok": 1000})
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(key, model, {"tok": 60})  # the org has 50 left
            # Ended: the next level decides (the entity's bypass).
            await zl.bypass_entity(key, model, until=datetime.datetime(2000, 1, 1))
            await zl.consume(key, model, {"tok": 20})
            with pytest.raises(ValidationError):
                await zl.bypass_resource(model, until="tomorrow")
            await zl.clear_entity_disabled(key)
            with pytest.raises(ResourceDisabled):
                await zl.consume(key, model, {"tok": 1})
            await zl.clear_resource_disabled(model)
            with pytest.raises(RateLimitExceeded):
                await zl.consume(key, model, {"tok": 20})  # the key's own 10 again
            await zl.clear_entity_disabled(key, model)
            return (
                bypassed,
                seen,
                refused.value.refused_by,
                await zl.available(key, model),
                await zl.available(org, model),
            )

    bypassed, seen, refused_by, key_left, org_left = run(scenario())
    assert bypassed
    assert seen.bypassed and seen.allowed and seen.retry_after_seconds == 0.0
    assert seen.exceeded == ["tok"], "the statuses are the bucket's own"
    assert refused_by == org
    assert key_left == {"tok": 10}, "never debited"
    assert org_left == {"tok": 30}


def test_a_call_s_limits_reach_a_cascade_parent_without_limits_of_its_own(daemon, entity):
    org, model = f"org-{entity}", f"model-{entity}"
    given = [Limit.per_hour("tok", 10)]

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(org)  # no stored limits
            for key in ("a", "b"):
                await zl.create_entity(f"{key}-{entity}", parent_id=org, cascade=True)
            await zl.consume(f"a-{entity}", model, {"tok": 6}, limits=given)
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(f"b-{entity}", model, {"tok": 6}, limits=given)
            await zl.consume(f"b-{entity}", model, {"tok": 4}, limits=given)
            return refused.value.refused_by, await zl.available(org, model, limits=given)

    refused_by, left = run(scenario())
    assert refused_by == org, "the org's share of the call's 10 was left at 4"
    assert left == {"tok": 0}


def test_reset_and_top_up_give_back_once_per_key(daemon, entity):
    model = f"model-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(entity, [Limit.per_day("tok", 100), Limit.per_day("rpm", 10)])
            never = await zl.reset_bucket(entity, model)
            await zl.consume(entity, model, {"tok": 90, "rpm": 10})
            topped = await zl.top_up(entity, model, {"tok": 30}, idempotency_key="buy-1")
            again = await zl.top_up(entity, model, {"tok": 30}, idempotency_key="buy-1")
            full = await zl.top_up(entity, model, {"tok": 500})
            with pytest.raises(ValidationError) as reused:
                await zl.reset_bucket(entity, model, idempotency_key="buy-1")
            with pytest.raises(ValidationError) as unknown:
                await zl.reset_bucket(entity, model, limits=["tpm"])
            with pytest.raises(ValidationError) as zero:
                await zl.top_up(entity, model, {"tok": 0})
            reset = await zl.reset_bucket(entity, model, limits=["rpm"])
            left = await zl.available(entity, model)
            audit = await zl.get_audit_events(entity)
            return never, topped, again, full, reused, unknown, zero, reset, left, audit

    never, topped, again, full, reused, unknown, zero, reset, left, audit = run(scenario())
    assert (never.shards, never.amounts) == (0, {"rpm": 0, "tok": 0}), "never used: full"
    assert (topped.shards, topped.replayed, topped.amounts["tok"]) == (1, False, 30)
    assert (again.replayed, again.amounts) == (True, topped.amounts)
    assert 59 < full.amounts["tok"] <= 60, "at most the room below capacity"
    assert reused.value.field == "idempotency_key"
    assert unknown.value.field == "limits" and "tpm" in str(unknown.value)
    assert zero.value.field == "amounts[tok]"
    assert (reset.entity_id, reset.resource) == (entity, model)
    assert list(reset.amounts) == ["rpm"] and 9.99 < reset.amounts["rpm"] <= 10
    assert 99 < left["tok"] <= 100 and left["rpm"] == 10
    actions = [e.action for e in audit]
    assert actions.count("bucket_topped_up") == 2 and actions.count("bucket_reset") == 2


def test_the_sync_limiter_resets_a_bucket(daemon, entity):
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        zl.set_limits(entity, [Limit.per_day("tok", 10)])
        zl.consume(entity, "m", {"tok": 10})
        done = zl.reset_bucket(entity, "m", idempotency_key="k")
        assert done.shards == 1 and 9 < done.amounts["tok"] <= 10
        assert zl.reset_bucket(entity, "m", idempotency_key="k").replayed


def test_a_quota_with_a_bad_calendar_is_refused_naming_the_field(daemon, entity):
    async def scenario():
        async with limiter(daemon) as zl:
            errors = []
            for cron, tz in (("* * * * *", "UTC"), ("0 0 1 * *", "Mars/Olympus"), ("0 0 1", "UTC")):
                with pytest.raises(ValidationError) as refused:
                    await zl.set_limits(entity, [Limit.quota("tok", 10, cron=cron, tz=tz)])
                errors.append(refused.value)
            return errors

    errors = run(scenario())
    assert [e.field for e in errors] == ["limits[0].quota_cron"] * 3
    assert "never starts matching" in str(errors[0]) and "Mars/Olympus" in str(errors[1])
    for bad in (datetime.timedelta(milliseconds=1500), datetime.timedelta(0), 18_000):
        with pytest.raises(ValidationError) as session:
            Limit.quota("tok", 10, reset_after=bad)
        assert session.value.field == "reset_after"
    with pytest.raises(ValidationError):
        Limit.quota("tok", 10)


def test_entities_with_custom_limits_and_resources_with_defaults_are_listed(daemon, entity):
    model = f"model-{entity}"
    keys = [f"{entity}-{i}" for i in range(5)]

    async def scenario():
        async with limiter(daemon) as zl:
            for key in keys:
                await zl.set_limits(key, [Limit.per_minute("rpm", 5)], resource=model)
            await zl.set_limits(f"{entity}-default", [Limit.per_minute("rpm", 5)])
            await zl.set_resource_defaults(model, [Limit.per_minute("rpm", 50)])
            await zl.delete_limits(keys[4], model)
            # The DynamoDB index is eventually consistent: wait for it to settle.
            deadline = time.monotonic() + 20
            while True:
                first, cursor = await zl.list_entities_with_custom_limits(model, limit=3)
                rest, end = await zl.list_entities_with_custom_limits(model, cursor=cursor)
                resources = await zl.list_resources_with_defaults()
                if (first + rest == keys[:4] and model in resources) or time.monotonic() > deadline:
                    return first, cursor, rest, end, resources
                await asyncio.sleep(0.1)

    first, cursor, rest, end, resources = run(scenario())
    assert first == keys[:3] and cursor == keys[2]
    assert rest == [keys[3]] and end is None
    assert model in resources


def test_a_session_quota_opens_at_first_use_and_refuses_until_its_end(daemon, entity):
    window = datetime.timedelta(hours=5)

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(entity, [Limit.quota("session", 10, reset_after=window)])
            await zl.consume(entity, "chat", {"session": 10})
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, "chat", {"session": 1})
            return refused.value, await zl.get_limits(entity)

    refused, stored = run(scenario())
    assert 5 * 3600 - 30 < refused.retry_after_seconds <= 5 * 3600
    assert stored[0].is_quota and stored[0].reset_after == window
    (status,) = refused.statuses
    ends_in = status.resets_at_ms / 1000 - time.time()
    assert 5 * 3600 - 30 < ends_in <= 5 * 3600 + 1, "the window's end"
    assert status.as_dict()["kind"] == "quota" and status.as_dict()["resets_at_ms"] == status.resets_at_ms


def test_a_calendar_quota_topped_up_gains_exactly_that_for_its_period(daemon, entity):
    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(entity, [Limit.quota("month", 100, cron="0 0 1 * *")])
            await zl.consume(entity, "m", {"month": 100})
            bought = await zl.top_up(entity, "m", {"month": 250}, idempotency_key="order-9")
            left = await zl.available(entity, "m")
            await zl.consume(entity, "m", {"month": 250})
            with pytest.raises(RateLimitExceeded):
                await zl.consume(entity, "m", {"month": 1})
            return bought, left

    bought, left = run(scenario())
    assert bought.amounts == {"month": 250} and left == {"month": 250}


def test_the_principal_given_is_in_the_audit_record_beside_the_caller_s_uid(daemon, entity):
    import os

    model = f"model-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(entity, principal="alice@example.com")
            await zl.set_limits(entity, [Limit.per_day("tok", 10)], model, "ops-bot")
            await zl.consume(entity, model, {"tok": 5})
            await zl.reset_bucket(entity, model, None, "alice@example.com", "incident-7")
            with pytest.raises(ValidationError) as bad:
                await zl.top_up(entity, model, {"tok": 1}, principal="jos\u00e9")
            page = await zl.get_audit_events(entity)
            return page, bad.value

    page, bad = run(scenario())
    principals = [event.principal for event in page.events]
    uid = f"uid:{os.getuid()}"
    assert f"alice@example.com ({uid})" in principals
    assert f"ops-bot ({uid})" in principals
    assert principals.count(f"alice@example.com ({uid})") == 2, principals
    assert bad.field == "principal"


def sync_principal_reaches_the_record(daemon, entity):
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        zl.create_entity(entity, principal="sync-bot")
        return [event.principal for event in zl.get_audit_events(entity).events]


def test_the_sync_client_sends_the_principal_too(daemon, entity):
    import os

    assert sync_principal_reaches_the_record(daemon, entity) == [f"sync-bot (uid:{os.getuid()})"]


def test_a_session_quota_topped_up_gains_exactly_that_for_its_window(daemon, entity):
    async def scenario():
        async with limiter(daemon) as zl:
            window = datetime.timedelta(hours=5)
            await zl.set_limits(entity, [Limit.quota("s", 10, reset_after=window)])
            await zl.consume(entity, "m", {"s": 4})
            bought = await zl.top_up(entity, "m", {"s": 20})
            left = await zl.available(entity, "m")
            await zl.consume(entity, "m", {"s": 26})
            with pytest.raises(RateLimitExceeded) as refused:
                await zl.consume(entity, "m", {"s": 1})
            return bought, left, refused.value

    bought, left, refused = run(scenario())
    assert bought.amounts == {"s": 20} and left == {"s": 26}, "past the amount"
    (status,) = refused.statuses
    assert 4.9 * 3600 < status.retry_after_seconds <= 5 * 3600, "the same window"


def test_a_resource_s_capacity_sums_its_entities(daemon, entity):
    model = f"model-{entity}"
    org = f"org-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.create_entity(org)
            await zl.create_entity(f"{entity}-a", parent_id=org)
            await zl.set_resource_defaults(model, [Limit.per_day("tok", 100)])
            for who, spent in ((org, 10), (f"{entity}-a", 30), (f"{entity}-b", 100)):
                await zl.consume(who, model, {"tok": spent})
            everyone = await zl.get_resource_capacity(model, "tok")
            parents = await zl.get_resource_capacity(model, "tok", parents_only=True)
            none = await zl.get_resource_capacity(model, "rpm")
            return everyone, parents, none

    everyone, parents, none = run(scenario())
    assert [e.entity_id for e in everyone.entities] == sorted([org, f"{entity}-a", f"{entity}-b"])
    assert everyone.total_capacity == 300
    assert 160 <= everyone.total_available < 161, everyone
    assert 46 < everyone.utilization_pct <= 47
    assert [e.entity_id for e in parents.entities] == [org] and parents.total_capacity == 100
    assert none.entities == [] and none.total_capacity == 0


def test_each_resource_of_a_joint_acquire_says_whether_it_was_bypassed(daemon, entity):
    model, budget = f"model-{entity}", f"budget-{entity}"

    async def scenario():
        async with limiter(daemon) as zl:
            await zl.set_limits(entity, [Limit.per_day("tpm", 10)], resource=model)
            await zl.set_limits(entity, [Limit.per_day("weekly", 10)], resource=budget)
            await zl.bypass_entity(entity, model)
            async with zl.acquire(entity, model, {"tpm": 50}, also={budget: {"weekly": 4}}) as lease:
                flags = (lease.bypassed, lease.resource(budget).bypassed)
            return flags, await zl.available(entity, model), await zl.available(entity, budget)

    flags, model_left, budget_left = run(scenario())
    assert flags == (True, False)
    assert model_left == {"tpm": 10} and budget_left == {"weekly": 6}


def test_a_bad_identifier_or_name_is_the_library_s_finer_validation_error(daemon, entity):
    from zae_limiter_client import InvalidIdentifierError, InvalidNameError

    limits = [Limit.per_minute("rpm", 5)]
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        with pytest.raises(InvalidIdentifierError) as bad_id:
            zl.consume("bad\x01id", "gpt-4", {"rpm": 1}, limits=limits)
        with pytest.raises(InvalidIdentifierError) as bad_parent:
            zl.create_entity(entity, parent_id="bad\x01parent")
        with pytest.raises(InvalidNameError) as bad_resource:
            zl.consume(entity, "gpt\n4", {"rpm": 1}, limits=limits)
        with pytest.raises(InvalidNameError) as bad_type:
            zl.consume(entity, 7, {"rpm": 1}, limits=limits)
        with pytest.raises(InvalidNameError) as bad_limit:
            zl.set_limits(entity, [Limit.per_minute("r#pm", 5)])
        # Anything else stays a plain ValidationError.
        with pytest.raises(ValidationError) as other:
            zl.consume(entity, "gpt-4", {"rpm": 10**16}, limits=limits)
    assert bad_id.value.field == "entity_id"
    assert bad_resource.value.field == "resource" and bad_type.value.field == "resource"
    assert bad_limit.value.field.endswith(".name"), bad_limit.value.field
    assert bad_parent.value.field.endswith("parent_id"), bad_parent.value.field
    assert type(other.value) is ValidationError
    assert bad_id.value.reason == bad_id.value.message


def test_audit_events_read_with_the_library_s_names(daemon, entity):
    from zae_limiter_client import AuditAction

    parent = f"{entity}-project"
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        zl.create_entity(parent)
        zl.create_entity(entity)
        zl.set_parent(entity, parent)
        zl.set_limits(entity, [Limit.per_minute("rpm", 5)], resource="gpt-4")
        zl.set_resource_defaults("gpt-4", [Limit.per_minute("rpm", 9)])
        events = list(zl.get_audit_events(entity_id=entity))
        defaults = list(zl.get_audit_events("#resource:gpt-4"))
    actions = [e.action for e in events]
    assert actions == [
        AuditAction.LIMITS_SET,
        AuditAction.ENTITY_PARENT_CHANGED,
        AuditAction.ENTITY_CREATED,
    ]
    newest = events[0]
    assert newest.entity_id == entity and newest.resource is None
    assert newest.details == {"before": newest.before, "after": newest.after}
    assert newest.details["after"] is not None
    stamp = datetime.datetime.strptime(newest.timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(stamp.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000 - newest.at_ms) < 1
    assert [(e.entity_id, e.resource) for e in defaults] == [(None, "gpt-4")]


def test_usage_snapshots_and_summary_as_the_library_lists_them(daemon, entity):
    from zae_limiter_client import UsageSummary

    model = f"{entity}-model"
    keys = [f"{entity}-{i}" for i in range(3)]
    limits = [Limit.per_day("tpm", 1000)]
    with SyncRateLimiter(socket=daemon.socket, namespace=daemon.namespace) as zl:
        for i, key in enumerate(keys):
            zl.consume(key, model, {"tpm": 10 * (i + 1)}, limits=limits)
        zl.consume(keys[0], "other", {"tpm": 5}, limits=limits)

        def every(**query):
            """Every page: one resource across entities is a scan on DynamoDB, where a page
            reads `limit` items of the whole table (and may hold none of these)."""
            pages, seen, next_key = 0, [], None
            while True:
                page, next_key = zl.get_usage_snapshots(**query, next_key=next_key)
                pages, seen = pages + 1, seen + page
                if next_key is None:
                    return seen, pages

        # The daemon flushes usage every 200 ms here: wait for the three hourly snapshots.
        deadline, hourly = time.monotonic() + 30, []
        while len(hourly) < 3 and time.monotonic() < deadline:
            hourly, _ = every(resource=model, window_type="hourly", limit=1000)
            time.sleep(0.1)
        # Page after page (a page may hold fewer than asked); on DynamoDB a page of 1 would be
        # a call per item of the shared table.
        small = 1 if daemon.backend == "memory" else 100
        seen, pages = every(resource=model, window_type="daily", limit=small)
        both, _ = zl.get_usage_snapshots(keys[0])
        summary = zl.get_usage_summary(resource=model, window_type="hourly")
        with pytest.raises(ValidationError) as no_scope:
            zl.get_usage_snapshots()
        with pytest.raises(ValidationError) as bad_page:
            zl.get_usage_snapshots(keys[0], next_key="not a token")
    assert sorted((u.entity_id, u.counters["tpm"]) for u in hourly) == [
        (keys[0], 10),
        (keys[1], 20),
        (keys[2], 30),
    ]
    assert {u.window_type for u in hourly} == {"hourly"}
    first = hourly[0]
    assert first.window_start.endswith(":00:00Z") and first.window_end.endswith(":59:59Z")
    assert sorted(u.entity_id for u in seen) == keys
    assert pages >= 3 if daemon.backend == "memory" else pages >= 1, pages
    assert {u.window_type for u in seen} == {"daily"}
    assert sorted((u.resource, u.window_type) for u in both) == [
        (model, "daily"),
        (model, "hourly"),
        ("other", "daily"),
        ("other", "hourly"),
    ]
    assert isinstance(summary, UsageSummary)
    assert (summary.snapshot_count, summary.total, summary.average) == (3, {"tpm": 60}, {"tpm": 20.0})
    assert summary.min_window_start == summary.max_window_start == first.window_start
    assert no_scope.value.field == "entity_id"
    assert bad_page.value.field == "page" and bad_page.value.code == "INVALID_ARGUMENT"
