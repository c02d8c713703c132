#!/usr/bin/env bash
# The load benchmark: throughput and p50/p99 latency over HTTP of one trivial POST handler,
# without the middleware and behind it (fresh keys, replays, an exempt route; memory store, and
# Redis when it answers), measured in one run with interleaved rounds, then the ratios.
#
#   bash benches/load/run.sh     # ROUNDS=5 SLICES=6 SLICE=1s CONNECTIONS=32 by default
#   ONLY=pg bash benches/load/run.sh   # the PostgreSQL cases only, then crash recovery (crash.sh)
#
# Installs wrk (Debian package) if missing and builds the server in release mode.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS="${ROUNDS:-5}"
SLICES="${SLICES:-6}"
SLICE="${SLICE:-1s}"
CONNECTIONS="${CONNECTIONS:-32}"
REDIS_URL="${IDEMPOTENCY_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
DATABASE_URL="${IDEMPOTENCY_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
here=benches/load

if ! command -v wrk >/dev/null 2>&1; then
  echo "== installing wrk"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
echo "== building the server (release)"
cargo build --release --locked --quiet --bin bench_server

# The server on one core and wrk on the other, so that neither steals the other's time slices
# (the ratios are only steady that way on a 2-core machine).
pin_server=""; pin_client=""
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  pin_server="taskset -c 0"; pin_client="taskset -c 1"
fi

work=$(mktemp -d)
server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap 'stop_server; rm -rf "$work"' EXIT

# Starts a fresh server (empty stores), so that every round measures the same conditions: a
# fresh-key round would otherwise pay for a table grown by all the rounds before it.
start_server() {
  BENCH_REDIS_URL="$REDIS_URL" BENCH_DATABASE_URL="$DATABASE_URL" $pin_server target/release/bench_server >"$work/servers" 2>"$work/server.log" &
  server=$!
  for _ in $(seq 1 100); do grep -q '^ready' "$work/servers" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$work/servers" || { cat "$work/server.log"; exit 1; }
}
url() { awk -v name="$1" '$1 == name { print $2 }' "$work/servers"; }

# shellcheck source=benches/load/cases.sh
source "$here/cases.sh"
start_server
if [ -n "$(url redis)" ]; then
  cases+=("redis_fresh redis /orders fresh" "redis_replay redis /orders replay")
else
  echo "(no Redis at $REDIS_URL: the Redis cases are skipped)"
fi
if [ -n "$(url postgres)" ]; then
  cases+=("pg_bare pg_bare /orders fresh" "pg_fresh postgres /orders fresh"
          "pg_replay postgres /orders replay" "pg_lease_fresh postgres_lease /orders fresh"
          "pg_lease_replay postgres_lease /orders replay")
else
  echo "(no PostgreSQL at $DATABASE_URL: the PostgreSQL cases are skipped)"
fi
if [ -n "${ONLY:-}" ]; then
  # ONLY=memory keeps the cases whose name starts with it, and the bare ones they are measured
  # by (the PostgreSQL cases have their own, pg_bare).
  kept=()
  for case in "${cases[@]}"; do
    case "$case" in
      "$ONLY"*) kept+=("$case") ;;
      bare*) [[ "$ONLY" == pg* ]] || kept+=("$case") ;;
    esac
  done
  cases=("${kept[@]}")
fi
stop_server

# redis-server's CPU time so far (clock ticks, user + system), then the microseconds its
# commands took (INFO commandstats): scripts (EVALSHA, their own commands included), and every
# other command (those that scripts call included: Redis counts them under their own names too).
redis_pid=$(pgrep -x redis-server | head -1 || true)
redis_cost() {
  local ticks=0 usec
  [ -n "$redis_pid" ] && ticks=$(awk '{ print $14 + $15 }' "/proc/$redis_pid/stat")
  usec=$(redis-cli -u "$REDIS_URL" INFO commandstats | awk -F'[:,=]' '
    /^cmdstat_/ { if ($1 ~ /^cmdstat_(eval|evalsha|eval_ro|evalsha_ro|fcall|fcall_ro)$/) s += $5; else o += $5 }
    END { print s + 0, o + 0 }')
  echo "$ticks $usec"
}
ticks_per_second=$(getconf CLK_TCK)

# Prints "requests_per_second p50_ms p99_ms" from wrk's output.
summarise() {
  awk '
    function ms(v) {
      if (v ~ /us$/) return substr(v, 1, length(v) - 2) / 1000;
      if (v ~ /ms$/) return substr(v, 1, length(v) - 2) + 0;
      if (v ~ /s$/) return substr(v, 1, length(v) - 1) * 1000;
      return v + 0;
    }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    $1 == "Requests/sec:" { rps = $2 }
    END { printf "%s %.3f %.3f\n", rps, p50, p99 }
  '
}

# Throughput on this machine drifts by ±20 % over seconds, whatever runs (the same bare server
# measured twice in a row gave 55 000 and 78 000 requests/s). So each round measures every case
# in short slices, taking turns, SLICES times: a slow spell falls on all cases alike, and each
# case's throughput in a round is the mean of its slices.
echo "== $ROUNDS rounds of $SLICES turns of $SLICE per case, $CONNECTIONS connections, 1 wrk thread, 1 server worker"
for round in $(seq 1 "$ROUNDS"); do
  start_server
  for _ in $(seq 1 "$SLICES"); do
    for case in "${cases[@]}"; do
      read -r name server_name path script <<<"$case"
      [ "$server_name" = redis ] && redis_before=$(redis_cost)
      $pin_client wrk -t1 -c"$CONNECTIONS" -d"$SLICE" --latency -s "$here/$script.lua" "$(url "$server_name")$path" \
        >"$work/slice"
      summarise <"$work/slice" | sed "s/^/$round /" >>"$work/$name"
      if [ "$server_name" = redis ]; then
        # requests, then redis-server's CPU ticks and command microseconds over the slice
        echo "$(awk '/requests in/ { print $1 }' "$work/slice") $(redis_cost) $redis_before" >>"$work/$name.cost"
      fi
    done
  done
  stop_server
  echo "   round $round done"
done

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# A case's throughput per round: the mean of its slices ("round requests_per_second" lines).
per_round() { awk '{ sum[$1] += $2; n[$1]++ } END { for (r in sum) print r, sum[r] / n[r] }' "$work/$1" | sort -n; }
printf '%-16s %12s %10s %10s\n' case "requests/s" "p50 ms" "p99 ms"
for case in "${cases[@]}"; do
  read -r name _ <<<"$case"
  rps=$(per_round "$name" | cut -d' ' -f2 | median)
  p50=$(cut -d' ' -f3 "$work/$name" | median)
  p99=$(cut -d' ' -f4 "$work/$name" | median)
  printf '%-16s %12.0f %10.3f %10.3f\n' "$name" "$rps" "$p50" "$p99"
done

# Each ratio is taken within a round, then the median over the rounds is printed, with the
# rounds' spread.
ratio() {
  paste -d' ' <(per_round "$2") <(per_round "$3") \
    | awk '{ print $2 / $4 }' | sort -n \
    | awk -v n="$1" '{ v[NR] = $1 } END {
        printf "ratio %s %.2f\n", n, v[int((NR + 1) / 2)];
        printf "spread %s %.2f-%.2f over %d rounds\n", n, v[1], v[NR], NR >> spread }' \
      spread="$work/spread"
}
if [ -s "$work/memory_fresh" ]; then
  ratio fresh_memory memory_fresh bare
  ratio replay_memory memory_replay bare
fi
if [ -s "$work/memory_marked" ]; then ratio fresh_marked_route memory_marked bare; fi
if [ -s "$work/memory_exempt" ]; then ratio exempt memory_exempt bare_exempt; fi
if [ -s "$work/redis_fresh" ]; then
  ratio fresh_redis redis_fresh bare
  ratio replay_redis redis_replay bare
fi
if [ -s "$work/pg_fresh" ]; then
  ratio fresh_postgres pg_fresh pg_bare
  ratio replay_postgres pg_replay pg_bare
  ratio fresh_postgres_lease pg_lease_fresh pg_bare
  ratio replay_postgres_lease pg_lease_replay pg_bare
fi
cat "$work/spread"
# redis-server's cost per request, over all slices of a case (the INFO calls themselves are
# counted too: a few microseconds per slice, over thousands of requests).
for name in redis_fresh redis_replay; do
  [ -s "$work/$name.cost" ] || continue
  awk -v name="$name" -v hz="$ticks_per_second" '
    { requests += $1; ticks += $2 - $5; scripts += $3 - $6; others += $4 - $7 }
    END { printf "redis-server %s, per request: %.1f us of process CPU; %.1f us in scripts, %.1f us in other commands (those scripts call included)\n",
          name, ticks / hz * 1e6 / requests, scripts / requests, others / requests }' "$work/$name.cost"
done
# Crash recovery, where the PostgreSQL cases ran: how soon a killed request's key is free.
if [ -s "$work/pg_fresh" ]; then
  bash "$here/crash.sh"
fi
