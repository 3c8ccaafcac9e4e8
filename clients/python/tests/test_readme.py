"""The Python examples of the READMEs run as written against the daemon (with `call_llm`
standing for the application's model call)."""

from __future__ import annotations

import asyncio
import pathlib
import re
import time
import types

import pytest
from conftest import run

from zae_limiter_client import ValidationError

REPO = pathlib.Path(__file__).resolve().parents[3]


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("readme", ["README.md", "clients/python/README.md"])
def test_the_readme_example_admits_then_answers_429(daemon, monkeypatch, readme):
    block = python_blocks(REPO / readme)[0]
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    calls = []

    async def call_llm(prompt):
        calls.append(prompt)
        return types.SimpleNamespace(usage=types.SimpleNamespace(total_tokens=9_000))

    scope = {"call_llm": call_llm}
    exec(compile(block, readme, "exec"), scope)  # noqa: S102 - our own README
    handler = scope["handle"]

    async def scenario():
        # Each call takes 9,000 tokens of a 10,000/min (burst 15,000) budget: the second still
        # fits (debt allowed after admission), the third is refused with a 429.
        answers = [await handler(f"prompt {i}") for i in range(3)]
        await scope["limiter"].close()
        return answers

    answers = run(scenario())
    assert [a[0] for a in answers] == [200, 200, 429]
    status, headers, body = answers[2]
    assert int(headers["Retry-After"]) >= 1
    assert body["error"] == "rate_limit_exceeded"
    assert [v["limit_name"] for v in body["limits"] if v["exceeded"]] == ["tpm"]
    assert calls == ["prompt 0", "prompt 1"]


def readme_block(marker: str) -> str:
    """The Python client README's example that contains ``marker``."""
    (block,) = [b for b in python_blocks(REPO / "clients/python/README.md") if marker in b]
    return block


def test_the_soft_limit_example_reports_what_it_would_have_refused(daemon, monkeypatch):
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("soft=True"), "README.md", "exec"), scope)  # noqa: S102

    async def scenario():
        entity = f"key-{daemon.namespace}-soft"
        answers = [await scope["observe"](entity, 3_000) for _ in range(3)]
        await scope["limiter"].close()
        return answers

    # 3,000 tokens a call against a soft 5,000/min: the second call overdraws, and the third
    # is still admitted.
    assert run(scenario()) == [[], ["tpm"], ["tpm"]]


def test_the_disabled_resource_example_answers_403_but_to_the_kept_tenant(daemon, monkeypatch):
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("disable_resource"), "README.md", "exec"), scope)  # noqa: S102
    model = f"old-model-{daemon.namespace}"

    async def scenario():
        from zae_limiter_client import Limit

        await scope["limiter"].set_resource_defaults(model, [Limit.per_minute("rpm", 100)])
        await scope["retire"](model, "kept")
        answers = [await scope["call"](who, model) for who in ("kept", "other")]
        await scope["limiter"].close()
        return answers

    assert run(scenario()) == [(200, "ok"), (403, f"{model} is not available to other")]


def test_the_quota_example_refuses_until_the_next_month_in_berlin(daemon, monkeypatch):
    import datetime
    import zoneinfo

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("monthly_plan("), "README.md", "exec"), scope)  # noqa: S102
    limiter, tenant = scope["limiter"], f"tenant-{daemon.namespace}-quota"

    async def scenario():
        await scope["monthly_plan"](tenant)
        first = await scope["generate"](tenant, "gpt-4", 9_000)
        limits = await limiter.get_limits(tenant)
        await limiter.top_up(tenant, "gpt-4", {"tpm": 10_000})  # the minute's limit is not it
        await limiter.set_limits(tenant, [
            Limit.quota("monthly_tokens", 10_000, cron="0 0 1 * *", tz="Europe/Berlin"),
            Limit.per_minute("tpm", 10_000),
        ])
        assert await scope["generate"](tenant, "gpt-4", 10_000) == "ok"
        second = await scope["generate"](tenant, "gpt-4", 1)
        await limiter.close()
        return first, limits, second

    from zae_limiter_client import Limit

    first, limits, second = run(scenario())
    assert first == "ok"
    quota = next(limit for limit in limits if limit.name == "monthly_tokens")
    assert quota.is_quota and (quota.quota_cron, quota.quota_tz) == ("0 0 1 * *", "Europe/Berlin")
    assert (quota.capacity, quota.refill_amount, quota.refill_period_ms) == (1_000_000, 0, 0)
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    now = datetime.datetime.now(berlin)
    month = (now.replace(day=28) + datetime.timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    wait = (month - now).total_seconds()
    assert second.startswith("retry in "), second
    assert abs(float(second.removeprefix("retry in ").removesuffix("s")) - wait) < 60, second


def test_the_schedule_example_halves_the_budget_in_new_york_business_hours(daemon, monkeypatch):
    import datetime
    import zoneinfo

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("off_peak_discount("), "README.md", "exec"), scope)  # noqa: S102
    tenant = f"tenant-{daemon.namespace}-schedule"

    def peak() -> bool:
        now = datetime.datetime.now(zoneinfo.ZoneInfo("America/New_York"))
        return now.weekday() < 5 and 9 <= now.hour <= 17

    async def scenario():
        await scope["off_peak_discount"](tenant)
        before = peak()
        capacity = await scope["minute_budget"](tenant, "gpt-4")
        limits = await scope["limiter"].get_limits(tenant)
        await scope["limiter"].close()
        return before, capacity, peak(), limits

    before, capacity, after, limits = run(scenario())
    if before == after:  # not asked across the boundary itself
        assert capacity == (5_000 if before else 10_000)
    (stored,) = limits
    assert stored.capacity == 10_000, "the stored limit keeps its own values"
    assert stored.schedule == (scope["PEAK"],)


def test_the_session_example_refuses_the_51st_request_until_the_window_ends(daemon, monkeypatch):
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("start_plan("), "README.md", "exec"), scope)  # noqa: S102
    user = f"user-{daemon.namespace}-session"

    async def scenario():
        await scope["start_plan"](user)
        answers = [await scope["ask"](user) for _ in range(51)]
        await scope["limiter"].close()
        return answers

    answers = run(scenario())
    assert answers[:50] == ["ok"] * 50
    assert answers[50] == "session used up, back in 5.0 h"


def test_the_fleet_report_example_sums_the_model_s_entities(daemon, monkeypatch):
    from zae_limiter_client import Limit

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("fleet_report("), "README.md", "exec"), scope)  # noqa: S102
    limiter, model = scope["limiter"], f"model-{daemon.namespace}-fleet"

    async def scenario():
        await limiter.set_resource_defaults(model, [Limit.per_day("tpm", 1_000)])
        await limiter.set_limits("vip", [Limit.per_day("tpm", 3_000)], resource=model)
        await limiter.consume("vip", model, {"tpm": 3_000})
        await limiter.consume("regular", model, {"tpm": 1_000})
        deadline, report = time.monotonic() + 20, None
        while time.monotonic() < deadline:  # the DynamoDB index settles within a moment
            report = await scope["fleet_report"](model)
            if report[1]:
                break
            await asyncio.sleep(0.1)
        await limiter.close()
        return report

    assert run(scenario()) == (100, ["vip"])


def test_the_reset_example_gives_the_budget_back_once(daemon, monkeypatch):
    from zae_limiter_client import Limit, RateLimitExceeded

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("reset_bucket("), "README.md", "exec"), scope)  # noqa: S102
    limiter, tenant = scope["limiter"], f"tenant-{daemon.namespace}-reset"

    async def scenario():
        await limiter.set_limits(tenant, [Limit.per_day("tpm", 1_000)])
        await limiter.consume(tenant, "gpt-4", {"tpm": 1_000})
        try:
            await limiter.consume(tenant, "gpt-4", {"tpm": 1})
            refused = False
        except RateLimitExceeded:
            refused = True
        given = [await scope["apologise"](tenant, "gpt-4", 7) for _ in range(2)]
        await limiter.consume(tenant, "gpt-4", {"tpm": 600})
        left = await limiter.available(tenant, "gpt-4")
        await limiter.close()
        return refused, given, left

    refused, given, left = run(scenario())
    assert refused
    assert given[0]["tpm"] >= 1_000 - 1 and given[1] == given[0], "the retry gives nothing more"
    assert 400 <= left["tpm"] < 402, left


def test_the_bypass_example_admits_past_the_limit_and_still_meters(daemon, monkeypatch):
    from zae_limiter_client import Limit

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("bypass_entity("), "README.md", "exec"), scope)  # noqa: S102
    limiter, tenant = scope["limiter"], f"tenant-{daemon.namespace}"

    async def scenario():
        await limiter.set_limits(tenant, [Limit.per_minute("tpm", 1_000)])
        before = await scope["answer"](tenant, "gpt-4", 10)
        await scope["incident"](tenant)
        during = [await scope["answer"](tenant, "gpt-4", 5_000) for _ in range(2)]
        deadline, usage = time.monotonic() + 20, 0.0
        while usage < 10_010 and time.monotonic() < deadline:
            records, _ = await limiter.get_usage_snapshots(tenant)
            usage = sum(u.consumed.get("tpm", 0) for u in records if u.period == "hour")
            await asyncio.sleep(0.1)
        left = await limiter.available(tenant, "gpt-4")
        await limiter.clear_entity_disabled(tenant)
        await limiter.close()
        return before, during, usage, left

    before, during, usage, left = run(scenario())
    assert (before, during) == ("limited", ["bypassed", "bypassed"])
    assert usage == 10_010, "every token metered"
    assert left["tpm"] >= 990, "only the first call debited"


def test_the_multi_resource_example_charges_both_resources_or_neither(daemon, monkeypatch):
    from zae_limiter_client import Limit, RateLimitExceeded

    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("also="), "README.md", "exec"), scope)  # noqa: S102
    limiter, search = scope["limiter"], scope["search"]
    entity = f"searcher-{daemon.namespace}"

    async def run_search():
        return 7

    async def scenario():
        await limiter.set_resource_defaults(
            "search", [Limit.per_minute("rpm", 100), Limit.per_hour("units", 1000)]
        )
        await limiter.set_resource_defaults("budget", [Limit.per_day("weekly", 20)])
        used = await search(entity, 10, run_search)
        with pytest.raises(RateLimitExceeded) as refused:
            await search(entity, 14, run_search)  # 13 of the budget left
        left = await limiter.available(entity, "search"), await limiter.available(entity, "budget")
        await limiter.close()
        return used, refused.value, left

    used, refused, left = run(scenario())
    assert used == 7
    assert refused.refused_resource == "budget"
    assert left == ({"rpm": 99, "units": 993}, {"weekly": 13})


def test_the_cascade_per_resource_example_charges_the_org_for_the_model_only(daemon, monkeypatch):
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", daemon.socket)
    scope: dict = {}
    exec(compile(readme_block("set_resource_cascade"), "README.md", "exec"), scope)  # noqa: S102
    limiter = scope["limiter"]
    org, key = f"org-{daemon.namespace}", f"key-{daemon.namespace}"

    async def scenario():
        await scope["gateway"](org, [key])
        await limiter.consume(key, "gpt-4", {"tpm": 1000})
        await limiter.consume(key, "embeddings", {"tpm": 1000})
        # The org's usage, exact (its balances refill meanwhile).
        deadline, usage = time.monotonic() + 20, []
        while not usage and time.monotonic() < deadline:
            usage, _ = await limiter.get_usage_snapshots(org, window_type="hourly")
            await asyncio.sleep(0.1)
        await limiter.clear_resource_cascade("gpt-4")
        await limiter.close()
        return usage

    usage = run(scenario())
    assert [(u.resource, u.consumed) for u in usage if u.period == "hour"] == [
        ("gpt-4", {"tpm": 1000.0})
    ]


#: The Python example of the Python zae-limiter 0.17's README, as it is there.
LIBRARY_EXAMPLE = """
from zae_limiter import Repository, RateLimiter, Limit

# Async rate limiter with declarative infrastructure
repo = await Repository.builder("my-app", "us-east-1").build()
limiter = RateLimiter(repository=repo)

# Define default limits (can be overridden per-entity)
default_limits = [
    Limit.per_minute("rpm", 100),
    Limit.per_minute("tpm", 10_000),
]

async with limiter.acquire(
    entity_id="api-key-123",
    resource="gpt-4",
    limits=default_limits,
    consume={"rpm": 1, "tpm": 500},  # Estimate tokens upfront
) as lease:
    response = await call_llm()
    # Reconcile actual usage (can go negative for post-hoc adjustment)
    await lease.adjust(tpm=response.usage.total_tokens - 500)
    # Tokens written to DynamoDB on enter | Rolled back on exception

# Hierarchical entities: project → API key
await limiter.create_entity(entity_id="proj-1", name="Production")
await limiter.set_limits("proj-1", [Limit.per_minute("tpm", 100_000)])
await limiter.create_entity(entity_id="api-key-456", parent_id="proj-1", cascade=True)

# cascade is an entity property — acquire() auto-cascades to parent
# limits=None auto-resolves from stored config (Entity > Resource > System)
async with limiter.acquire(
    entity_id="api-key-456",
    resource="gpt-4",
    limits=None,
    consume={"rpm": 1, "tpm": 500},
) as lease:
    response = await call_llm()
"""

#: What moving over changes: the import, and how the limiter is built (the daemon's socket
#: instead of a repository). Nothing else.
MOVED = [
    (
        "from zae_limiter import Repository, RateLimiter, Limit",
        "from zae_limiter_client import RateLimiter, Limit",
    ),
    (
        'repo = await Repository.builder("my-app", "us-east-1").build()\n'
        "limiter = RateLimiter(repository=repo)",
        "limiter = RateLimiter()  # the daemon's socket: $ZAE_LIMITER_SOCKET",
    ),
]


def test_the_library_s_readme_example_runs_against_the_daemon(daemon, monkeypatch):
    """The library's README example, with only the import and the limiter's construction
    changed, runs as written, and ends as it does with the library: the first acquire admitted
    and charged, the entities and the project's limits stored, and the last acquire refused with
    a ``ValidationError`` on ``limits``, because the API key has no limits at any level (the
    library's ``_resolve_limits`` raises the same for a child whose parent alone has limits:
    the parent's limits are charged in cascade, they do not stand for the child's)."""
    import ast

    from conftest import Daemon

    source = LIBRARY_EXAMPLE
    for before, after in MOVED:
        assert source.count(before) == 1, before
        source = source.replace(before, after)
    # A daemon of its own: the example's ids are the other README examples' too.
    own = Daemon(daemon.backend)
    monkeypatch.setenv("ZAE_LIMITER_SOCKET", own.socket)

    async def call_llm():
        return types.SimpleNamespace(usage=types.SimpleNamespace(total_tokens=800))

    scope = {"call_llm": call_llm}
    code = compile(source, "zae-limiter README", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)

    async def scenario():
        began = time.monotonic()
        with pytest.raises(ValidationError) as refused:
            await eval(code, scope)  # noqa: S307 - the library's README, copied above
        limiter = scope["limiter"]
        limits = scope["default_limits"]
        try:
            first = await limiter.available("api-key-123", "gpt-4", limits=limits)
            took = time.monotonic() - began
            parent = await limiter.available("proj-1", "gpt-4")
            child = await limiter.get_entity("api-key-456")
            return refused.value, (first, took), parent, child
        finally:
            await limiter.close()

    try:
        refused, (first, took), parent, child = run(scenario())
    finally:
        own.stop()
    assert refused.field == "limits" and "api-key-456" in str(refused)
    # 500 estimated, 800 used: 800 of 10,000 taken; 10,000/min refill since (167 a second).
    assert 99 <= first["rpm"] <= 99 + int(100 / 60 * took + 1), (first, took)
    assert 9_200 <= first["tpm"] <= 9_200 + 167 * (took + 1), (first, took)
    assert child.parent_id == "proj-1" and child.cascade
    # The refused acquire took nothing from the parent.
    assert parent == {"tpm": 100_000}, parent
