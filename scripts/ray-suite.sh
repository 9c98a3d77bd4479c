#!/usr/bin/env bash
# The SDK integration suite (tests/integration/test_sdk_*.py) and the Ray engine's own tests
# (test_ray_*.py: faults) against a server on the Ray engine,
# PostgreSQL and Redis: `--engine ray --database-url postgresql+psycopg://… --redis-url redis://…`.
#
# Ray binds wildcard addresses unless it runs where only loopback exists, so this script runs
# itself inside a loopback-only network namespace (unshare -n; root needed). There the machine's
# PostgreSQL is reached through its unix socket (PGSOCKET, default /var/run/postgresql) and a
# private redis-server is started on 127.0.0.1. Arguments go to pytest (e.g. -k sampling).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${TWINKLE_IN_NETNS:-}" != 1 ]]; then
  exec unshare -n env TWINKLE_IN_NETNS=1 "$0" "$@"
fi
ip link set lo up

PGSOCKET="${PGSOCKET:-/var/run/postgresql}"
DB="twinkle_ray_$(date +%s)_$$"
REDIS_PORT=$((20000 + RANDOM % 20000))
WORK="$(mktemp -d /tmp/twinkle-ray-suite.XXXXXX)"

cleanup() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  psql -q -h "$PGSOCKET" -U postgres -d postgres -c "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --daemonize yes \
  --dir "$WORK" --logfile "$WORK/redis.log"
psql -q -h "$PGSOCKET" -U postgres -d postgres -c "CREATE DATABASE \"$DB\""
DATABASE_URL="postgresql+psycopg://postgres@/$DB?host=$PGSOCKET"
# PostgreSQL is never upgraded implicitly: the deliberate step, as in production.
.venv/bin/twinkle db upgrade --database-url "$DATABASE_URL"

export TWINKLE_TEST_SERVER_ARGS="--engine ray --database-url $DATABASE_URL --redis-url redis://127.0.0.1:$REDIS_PORT/0"
echo "ray-suite: server args: $TWINKLE_TEST_SERVER_ARGS"
# The 50-round RL loop is left to the local run (make test) and test-vllm: on Ray it takes minutes,
# and the object-store path of versions is covered by the other test_sdk_versions tests.
.venv/bin/python -m pytest -q -p no:cacheprovider tests/integration/test_ray_*.py tests/integration/test_sdk_*.py \
  --deselect tests/integration/test_sdk_versions.py::test_an_rl_loop_leaves_no_folder_and_a_bounded_number_of_versions \
  "$@"
