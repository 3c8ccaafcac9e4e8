"""The typed interface (``_client.pyi``) says what the implementation does: every public method
with the implementation's parameters, and a program written against it type-checks (mypy)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys
import textwrap

import zae_limiter_client
from zae_limiter_client import Lease, RateLimiter, SyncLease, SyncRateLimiter

STUB = pathlib.Path(zae_limiter_client.__file__).parent / "_client.pyi"


def _stub_methods() -> dict[str, dict[str, list[str]]]:
    """Class name -> method name -> parameter names, as the stub declares them."""
    tree = ast.parse(STUB.read_text())
    classes: dict[str, dict[str, list[str]]] = {}
    bases: dict[str, list[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
            methods = {}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = item.args
                    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
                    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
                    methods[item.name] = names
            classes[node.name] = methods
    for name, parents in bases.items():
        for parent in parents:
            classes[name] = {**classes.get(parent, {}), **classes[name]}
    return classes


def _public(cls: type) -> dict[str, list[str]]:
    # The limiters are built by their users; leases by the limiters only.
    dunders = ("__init__",) if cls in (RateLimiter, SyncRateLimiter) else ()
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in dunders:
            continue
        if callable(member):
            out[name] = list(inspect.signature(member).parameters)
    return out


def test_the_stub_names_every_public_method_with_its_parameters():
    stub = _stub_methods()
    for cls in (RateLimiter, SyncRateLimiter, Lease, SyncLease):
        declared = stub[cls.__name__]
        for name, params in _public(cls).items():
            assert name in declared, f"{cls.__name__}.{name} is missing from _client.pyi"
            assert declared[name] == params, f"{cls.__name__}.{name}: {declared[name]} != {params}"


def test_a_program_using_both_limiters_type_checks(tmp_path):
    program = tmp_path / "app.py"
    program.write_text(
        textwrap.dedent(
            """
            from zae_limiter_client import (
                Entity, Limit, LimitStatus, RateLimiter, RateLimitExceeded, SyncRateLimiter,
            )

            LIMITS = [Limit.per_minute("rpm", 100), Limit("tpm", 10_000, 10_000, 60)]

            async def handle(zl: RateLimiter) -> tuple[int, dict[str, str]]:
                try:
                    async with zl.acquire("key", "gpt-4", {"rpm": 1}, limits=LIMITS) as lease:
                        await lease.adjust(tpm=120)
                except RateLimitExceeded as e:
                    header: str = e.retry_after_header
                    return 429, {"Retry-After": header}
                statuses: list[LimitStatus] = await zl.consume("key", "gpt-4", {"rpm": 1})
                left: dict[str, int] = await zl.available("key", "gpt-4")
                wait: float = await zl.time_until_available("key", "gpt-4", {"rpm": 1})
                found: Entity | None = await zl.get_entity("key")
                return 200, {"left": str(left), "n": str(len(statuses) + int(wait))}

            def handle_sync(zl: SyncRateLimiter) -> list[Limit]:
                with zl.acquire("key", "gpt-4", {"rpm": 1}) as lease:
                    lease.adjust(tpm=5)
                    lease.renew()
                return zl.get_limits("key")
            """
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(program)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
