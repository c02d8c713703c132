#!/usr/bin/env bash
# Crash recovery on PostgreSQL: the demo server (`--example orders`, keys held by the handler's
# transaction, a 60 s lease) is SIGKILLed while a keyed request's handler runs, after the
# handler inserted its order and before it answers; a new server is started, and the same
# request is retried until it is not refused with 409. Prints which retry ran the handler and
# how long after the restart it answered, whether the next one replayed it, and how many
# orders exist (1: the lost request's uncommitted order died with its process). With a lease
# instead, retries got 409 for the whole lease.
#
#   bash benches/load/crash.sh      # ROUNDS=3; run.sh runs it when PostgreSQL answers
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS="${ROUNDS:-3}"
SERVER_URL="${IDEMPOTENCY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
database="bench_crash_recovery"
DATABASE_URL="${SERVER_URL%/*}/$database"
ORDER='{"item":"book"}'

cargo build --release --locked --quiet --example orders
export PGOPTIONS="-c client_min_messages=warning"
psql -q "$SERVER_URL" -c "DROP DATABASE IF EXISTS $database" -c "CREATE DATABASE $database" >/dev/null

work=$(mktemp -d)
server=""
# SIGKILL, as a crash: the process gets no chance to end its transactions.
stop_server() {
  if [ -n "$server" ]; then kill -9 "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  server=""
}
cleanup() {
  stop_server
  psql -q "$SERVER_URL" -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Starts the demo on a free port; sets $server and $address.
start_demo() {
  BIND=127.0.0.1:0 RUST_LOG=error IDEMPOTENCY_DATABASE_URL="$DATABASE_URL" \
    IDEMPOTENCY_LEASE_MS=60000 target/release/examples/orders >"$work/demo.out" 2>"$work/demo.err" &
  server=$!
  for _ in $(seq 1 100); do grep -q '^listening on' "$work/demo.out" 2>/dev/null && break; sleep 0.05; done
  address=$(awk '/^listening on/ { sub("http://", "", $3); print $3 }' "$work/demo.out")
  [ -n "$address" ] || { cat "$work/demo.err"; exit 1; }
}
post() { curl -s -o "$work/body" -w '%{http_code}' -X POST "http://$address/orders/slow" \
  -H "Idempotency-Key: $1" -H 'Content-Type: application/json' -d "$ORDER"; }
now_ms() { date +%s%3N; }
orders_sequence() { psql -qtA "$DATABASE_URL" -c \
  "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM demo_orders_id_seq" 2>/dev/null || echo 0; }

echo "== crash recovery (PostgreSQL, key held by the handler's transaction, lease 60 s)"
for round in $(seq 1 "$ROUNDS"); do
  key="crash-$round-$$"
  start_demo
  before=$(orders_sequence)
  post "$key" >/dev/null 2>&1 &
  lost=$!
  # The handler inserts, then waits 300 ms before answering: kill it in between.
  for _ in $(seq 1 200); do [ "$(orders_sequence)" != "$before" ] && break; sleep 0.01; done
  stop_server
  wait "$lost" 2>/dev/null || true
  start_demo
  restarted=$(now_ms)
  tries=0
  while :; do
    tries=$((tries + 1))
    status=$(post "$key")
    [ "$status" != 409 ] && break
    [ $(($(now_ms) - restarted)) -gt 120000 ] && break
    sleep 0.05
  done
  free_after=$(($(now_ms) - restarted))
  replay=$(curl -s -o /dev/null -D - -X POST "http://$address/orders/slow" -H "Idempotency-Key: $key" \
    -H 'Content-Type: application/json' -d "$ORDER" | tr -d '\r' | awk -F': ' 'tolower($1) == "idempotent-replayed" { print $2 }')
  orders=$(curl -s "http://$address/orders/count")
  echo "crash-recovery round $round: retry $tries answered $status, $free_after ms after the restart (the handler takes 300 ms); the next one replayed: ${replay:-no}; orders $orders"
  stop_server
  psql -q "$DATABASE_URL" -c "TRUNCATE demo_orders" >/dev/null
done
