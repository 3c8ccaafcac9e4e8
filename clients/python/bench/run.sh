#!/usr/bin/env bash
# The Python comparison: this package against the daemon (release build, DynamoDB store) and the
# Python zae-limiter 0.17 from PyPI, both on the same DynamoDB Local, same workload, same run.
#
#   bash clients/python/bench/run.sh            # SECONDS_PER_RUN=6 DAEMON_THREADS=1 by default
#
# Prints one JSON line per run, then a table with the daemon's speed-up over the Python library.
set -euo pipefail

root=$(cd "$(dirname "$0")/../../.." && pwd)
seconds=${SECONDS_PER_RUN:-6}
threads=${DAEMON_THREADS:-1}
# shellcheck source=../../../scripts/dynamodb-local.sh
source "$root/scripts/dynamodb-local.sh"
start_dynamodb_local "$root"

cargo build --quiet --release --bin zae-limiter
bin="$root/target/release/zae-limiter"
work=$(mktemp -d)
table=zae-limiter-bench
"$bin" deploy --table "$table" --endpoint-url "$ZAE_TEST_DYNAMODB_ENDPOINT" >/dev/null
cat >"$work/zae-limiter.toml" <<TOML
[limiter]
backend = "dynamodb"
[dynamodb]
table = "$table"
endpoint_url = "$ZAE_TEST_DYNAMODB_ENDPOINT"
TOML
RUST_LOG=warn "$bin" serve --config "$work/zae-limiter.toml" --socket "$work/zl.sock" --no-metrics \
  --worker-threads "$threads" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
trap 'kill "$daemon_pid" 2>/dev/null || true; kill "$ddb_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do [ -S "$work/zl.sock" ] && break; sleep 0.1; done

venv="$root/.cache/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'zae-limiter==0.17.0' "$root/clients/python"
rm -rf "$root/clients/python/build"

# DynamoDB Local is a fresh JVM: warm it (JIT) before measuring anything.
"$venv/bin/python" "$root/clients/python/bench/bench.py" --target daemon --socket "$work/zl.sock" \
  --mode consume --tasks 32 --seconds 8 --prefix warmup >/dev/null
results="$work/results.jsonl"
bench() { "$venv/bin/python" "$root/clients/python/bench/bench.py" --seconds "$seconds" "$@" | tee -a "$results"; }
for entities in 1 100; do
  bench --target daemon --socket "$work/zl.sock" --mode acquire --tasks 32 --entities "$entities"
  bench --target daemon --socket "$work/zl.sock" --mode consume --tasks 32 --entities "$entities"
  bench --target python --endpoint "$ZAE_TEST_DYNAMODB_ENDPOINT" --tasks 32 --entities "$entities"
done
bench --target daemon --socket "$work/zl.sock" --mode acquire --tasks 1
bench --target python --endpoint "$ZAE_TEST_DYNAMODB_ENDPOINT" --tasks 1

# One task against a daemon with the memory store: the client's and the daemon's own latency,
# without DynamoDB Local's write (its p50 alone is ~2 ms here).
RUST_LOG=warn "$bin" serve --socket "$work/zlm.sock" --no-metrics --worker-threads "$threads" \
  >"$work/memory-daemon.log" 2>&1 &
memory_pid=$!
trap 'kill "$daemon_pid" "$memory_pid" 2>/dev/null || true; kill "$ddb_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do [ -S "$work/zlm.sock" ] && break; sleep 0.1; done
for mode in acquire consume; do
  "$venv/bin/python" "$root/clients/python/bench/bench.py" --seconds "$seconds" --target daemon \
    --socket "$work/zlm.sock" --mode "$mode" --tasks 1 | sed 's/"target": "daemon"/"target": "daemon-memory"/'
done

"$venv/bin/python" - "$results" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
base = {(r["tasks"], r["entities"]): r["decisions_per_s"] for r in rows if r["target"] == "python"}
print("\n| client | mode | tasks | entities | decisions/s | x Python lib | p50 ms | p99 ms | client CPU us/decision | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    ratio = r["decisions_per_s"] / base[(r["tasks"], r["entities"])] if base.get((r["tasks"], r["entities"])) else float("nan")
    client = "zae-limiter-client -> daemon" if r["target"] == "daemon" else "Python zae-limiter 0.17"
    print(f"| {client} | {r['mode']} | {r['tasks']} | {r['entities']} | {r['decisions_per_s']:,.0f} | {ratio:.1f} | {r['p50_ms']} | {r['p99_ms']} | {r['client_cpu_us_per_decision']} | {r['errors']} |")
PY
