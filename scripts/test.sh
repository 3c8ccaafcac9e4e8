#!/usr/bin/env bash
# Runs the whole test suite (Rust and Python) against the real DynamoDB Local, on a fresh machine.
#
# Starts DynamoDB Local (scripts/dynamodb-local.sh: installed into .cache/ on first use, stopped by
# PID however the tests end), runs `cargo test` with ZAE_TEST_DYNAMODB_ENDPOINT pointing at it,
# then the Python client's tests (pytest, in a virtual environment under .cache/ with packages from
# PyPI) against the daemon binary just built. Extra arguments go to `cargo test`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/dynamodb-local.sh
source "$root/scripts/dynamodb-local.sh"
start_dynamodb_local "$root"

cd "$root"
cargo test "$@"

# The Python client (clients/python), installed as a user would, tested against the daemon binary.
cargo build --quiet --bin zae-limiter
venv="$root/.cache/python-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$root/clients/python[test]" \
  "pyyaml==6.0.2"
rm -rf "$root/clients/python/build"
# The Python client's tests, then the operator kit's (deploy/: dashboard, alert rules, configs).
ZAE_LIMITER_BIN="$root/target/debug/zae-limiter" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  "$root/clients/python/tests" "$root/deploy/tests"
