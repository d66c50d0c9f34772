#!/usr/bin/env bash
# The whole test suite, twice over the storage and bus layers:
#   1. embedded defaults: SQLite files and the in-process bus;
#   2. PostgreSQL and NATS JetStream (KILN_TEST_DATABASE_URL, KILN_TEST_NATS_URL).
# Starts PostgreSQL and NATS when they are down and fetches the real models into the asset
# cache (deploy/fetch-assets.sh). Usage: bash tests/run.sh [nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

PG_URL_BASE="${KILN_PG_URL_BASE:-postgres://postgres@127.0.0.1:5432}"
NATS_URL="${KILN_TEST_NATS_URL:-nats://127.0.0.1:4222}"

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do port_open "$1" "$2" && return 0; sleep 0.2; done
  echo "timed out waiting for $1:$2" >&2; return 1
}

ensure_postgres() {
  if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then return; fi
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    echo "installing PostgreSQL"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  for _ in $(seq 1 100); do pg_isready -q -h 127.0.0.1 -p 5432 && return; sleep 0.2; done
  echo "PostgreSQL did not start" >&2; exit 1
}

ensure_nats() {
  if port_open 127.0.0.1 4222; then return; fi
  if ! command -v nats-server >/dev/null && [[ ! -x /usr/sbin/nats-server ]]; then
    echo "installing nats-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
  fi
  echo "starting NATS with JetStream"
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server || echo /usr/sbin/nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  wait_port 127.0.0.1 4222
}

runner=(cargo nextest run --workspace --no-fail-fast)
if ! cargo nextest --version >/dev/null 2>&1; then
  runner=(cargo test --workspace --no-fail-fast)
fi

# The real models the suites use (cached under ~/.cache/kiln/assets after the first run).
bash deploy/fetch-assets.sh >/dev/null

# Python tools the suites run: an S3-compatible server for the registry's object-store tests
# (moto), the independent Open Inference Protocol client (tritonclient) and the example event
# consumer's nats-py and grpcio-tools, the public clients of the HTTP edge (openai, fireworks-ai); see
# tests/python/requirements.txt.
python3 -c "import moto.server, tritonclient.grpc, numpy, nats, grpc_tools, openai, fireworks" 2>/dev/null \
  || python3 -m pip install --quiet -r tests/python/requirements.txt

# Tests that spawn their own nats-server (the outage test) need the binary either way.
ensure_nats
ensure_postgres

echo "== suite 1/2: SQLite + in-process bus"
env -u KILN_TEST_DATABASE_URL -u KILN_TEST_NATS_URL "${runner[@]}" "$@"

echo "== suite 2/2: PostgreSQL + NATS JetStream"
# A fresh database for this run; each test mesh makes its own schema inside it.
psql -q "$PG_URL_BASE/postgres" -c "DROP DATABASE IF EXISTS kiln_test WITH (FORCE)" -c "CREATE DATABASE kiln_test"
KILN_TEST_DATABASE_URL="$PG_URL_BASE/kiln_test" KILN_TEST_NATS_URL="$NATS_URL" "${runner[@]}" "$@"
