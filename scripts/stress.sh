#!/usr/bin/env bash
# The test suite as CI's fresh, loaded machine runs it: both cores kept busy by CPU burners, the
# whole Rust suite once (which fills DynamoDB Local, as in CI), then each timing-sensitive test
# looped N times against that same DynamoDB Local, still under load. Any failure stops the run.
#
#   bash scripts/stress.sh [N]            # N rounds (default 20) of the tests listed below
#   bash scripts/stress.sh 20 daemon_dynamodb usage_of_two_daemons_adds_up_in_the_store
#                                         # N rounds of one test: BINARY TEST_NAME
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
rounds=${1:-20}
shift || true
if [ $# -ge 2 ]; then
  tests=("$1 $2")
else
  # binary, test name: the tests that depend on time or on ordering under load.
  tests=(
    "daemon_dynamodb usage_of_two_daemons_adds_up_in_the_store"
    "daemon_dynamodb three_daemons_on_one_table_never_over_admit"
    "limiter the_last_flush_comes_after_one_in_progress"
    "limiter calls_racing_an_idle_actor_are_answered"
    "limiter shed_acquires_are_never_admitted_by_the_policy"
    "daemon an_overloaded_bucket_sheds_load_with_unavailable"
    "daemon shutdown_answers_in_flight_requests_and_removes_the_socket"
    "daemon a_held_lease_lives_past_its_ttl_while_its_holder_renews_it"
    "faults lease_closes_survive_lost_answers"
  )
fi

# shellcheck source=scripts/dynamodb-local.sh
source "$root/scripts/dynamodb-local.sh"
start_dynamodb_local "$root"

burners=()
for _ in 1 2; do
  (while :; do :; done) &
  burners+=($!)
done
trap 'kill "${burners[@]}" 2>/dev/null || true; kill "$ddb_pid" 2>/dev/null || true' EXIT INT TERM

cd "$root"
echo "== the whole Rust suite, both cores busy"
cargo test --no-fail-fast
for round in $(seq 1 "$rounds"); do
  for t in "${tests[@]}"; do
    read -r binary name <<<"$t"
    if ! out=$(cargo test --quiet --test "$binary" "$name" 2>&1); then
      echo "$out"
      echo "FAILED in round $round/$rounds: $binary $name" >&2
      exit 1
    fi
    passed=$(grep -o "[0-9]* passed" <<<"$out" | head -n 1)
    [ "${passed%% *}" -gt 0 ] || { echo "no test matches $binary $name" >&2; exit 1; }
    echo "round $round/$rounds: $binary $name: $passed"
  done
done
echo "all $rounds rounds passed"
