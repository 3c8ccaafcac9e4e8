"""Python benchmark: N asyncio tasks deciding on one hot entity (or a few), through this package
against the daemon, or through the Python zae-limiter 0.17 against the same DynamoDB Local.

Every decision consumes rpm 1 and tpm 100 under limits far above the load (all admitted).
Prints one JSON line: decisions/s, latency p50/p99 of one decision (ms), and the CPU time of this
Python process per decision (us): the client's own cost.

    python bench.py --target daemon --socket /tmp/zl.sock --mode acquire --tasks 32
    python bench.py --target daemon --socket /tmp/zl.sock --mode consume --tasks 32
    python bench.py --target python --endpoint http://127.0.0.1:8000 --tasks 32

`run.sh` next to this file starts everything and runs the whole comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

CONSUME = {"rpm": 1, "tpm": 100}


def limits(module):
    return [
        module.Limit.per_minute("rpm", 10**9),
        module.Limit.per_minute("tpm", 10**12),
    ]


async def daemon_decider(args):
    import zae_limiter_client as zl

    limiter = zl.RateLimiter(socket=args.socket)
    chosen = limits(zl)

    async def decide(entity: str) -> None:
        if args.mode == "consume":
            await limiter.consume(entity, "gpt-4", CONSUME, limits=chosen)
        else:
            async with limiter.acquire(entity, "gpt-4", CONSUME, limits=chosen):
                pass

    return decide, limiter.close


async def python_decider(args):
    from zae_limiter import Limit, RateLimiter, Repository
    from zae_limiter.repository import Repository as PlainRepository

    plain = PlainRepository(
        name=args.stack,
        region="us-east-1",
        endpoint_url=args.endpoint,
        _skip_deprecation_warning=True,
    )
    await plain.create_table()
    repo = (
        await Repository.builder()
        .stack(args.stack)
        .region("us-east-1")
        .endpoint_url(args.endpoint)
        .build()
    )
    limiter = RateLimiter(repository=repo)
    chosen = [Limit.per_minute("rpm", 10**9), Limit.per_minute("tpm", 10**12)]

    async def decide(entity: str) -> None:
        # Write-on-enter; a block without adjustments commits with no further write.
        async with limiter.acquire(
            entity_id=entity, resource="gpt-4", limits=chosen, consume=CONSUME
        ):
            pass

    async def close():
        await limiter.close()
        await plain.close()

    return decide, close


async def main(args) -> dict:
    make = daemon_decider if args.target == "daemon" else python_decider
    decide, close = await make(args)
    entities = [f"{args.prefix}-{i}" for i in range(args.entities)]
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop = False

    async def task(n: int) -> None:
        nonlocal errors
        i = n
        while not stop:
            entity = entities[i % len(entities)]
            i += 1
            started = time.perf_counter()
            try:
                await decide(entity)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
                continue
            if measuring:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(task(n)) for n in range(args.tasks)]
    await asyncio.sleep(args.warmup)
    measuring = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(args.seconds)
    cpu1, wall1 = time.process_time(), time.perf_counter()
    measuring = False
    stop = True
    await asyncio.gather(*tasks)
    await close()
    decisions = len(latencies)
    ordered = sorted(latencies)
    return {
        "target": args.target,
        "mode": "acquire+commit" if args.target == "python" else args.mode,
        "tasks": args.tasks,
        "entities": args.entities,
        "decisions": decisions,
        "errors": errors,
        "decisions_per_s": round(decisions / (wall1 - wall0), 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3) if ordered else None,
        "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1000, 3) if ordered else None,
        "client_cpu_us_per_decision": (
            round((cpu1 - cpu0) / decisions * 1e6, 1) if decisions else None
        ),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["daemon", "python"], required=True)
    parser.add_argument("--mode", choices=["acquire", "consume"], default="acquire")
    parser.add_argument("--socket", default=os.environ.get("ZAE_LIMITER_SOCKET"))
    parser.add_argument("--endpoint", default=os.environ.get("ZAE_TEST_DYNAMODB_ENDPOINT"))
    parser.add_argument("--stack", default="zae-bench")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--entities", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--prefix", default=f"bench{os.getpid()}")
    print(json.dumps(asyncio.run(main(parser.parse_args()))), flush=True)
