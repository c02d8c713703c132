#!/usr/bin/env bash
# The load benchmark: throughput and p50/p99 latency over HTTP of one trivial POST handler,
# without the middleware and behind it (fresh keys, replays, an exempt route; memory store, and
# Redis when it answers), measured in one run with interleaved rounds, then the ratios.
#
#   bash benches/load/run.sh            # ROUNDS=5 DURATION=3s CONNECTIONS=32 by default
#
# Installs wrk (Debian package) if missing and builds the server in release mode.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-3s}"
CONNECTIONS="${CONNECTIONS:-32}"
REDIS_URL="${IDEMPOTENCY_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
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
BENCH_REDIS_URL="$REDIS_URL" $pin_server target/release/bench_server >"$work/servers" 2>"$work/server.log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q '^ready' "$work/servers" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$work/servers" || { cat "$work/server.log"; exit 1; }
url() { awk -v name="$1" '$1 == name { print $2 }' "$work/servers"; }
bare=$(url bare); memory=$(url memory); redis=$(url redis)

# case name, server URL, path, script
cases=(
  "bare $bare /orders fresh"
  "memory_fresh $memory /orders fresh"
  "memory_replay $memory /orders replay"
  "bare_exempt $bare /exempt unkeyed"
  "memory_exempt $memory /exempt unkeyed"
)
if [ -n "$redis" ]; then
  cases+=("redis_fresh $redis /orders fresh" "redis_replay $redis /orders replay")
else
  echo "(no Redis at $REDIS_URL: the Redis cases are skipped)"
fi

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

echo "== $ROUNDS interleaved rounds of $DURATION, $CONNECTIONS connections, 1 wrk thread, 1 server worker"
for round in $(seq 1 "$ROUNDS"); do
  for case in "${cases[@]}"; do
    read -r name base path script <<<"$case"
    $pin_client wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$here/$script.lua" "$base$path" \
      | summarise >>"$work/$name"
  done
  echo "   round $round done"
done

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A rps
printf '%-16s %12s %10s %10s\n' case "requests/s" "p50 ms" "p99 ms"
for case in "${cases[@]}"; do
  read -r name _ <<<"$case"
  rps[$name]=$(cut -d' ' -f1 "$work/$name" | median)
  p50=$(cut -d' ' -f2 "$work/$name" | median)
  p99=$(cut -d' ' -f3 "$work/$name" | median)
  printf '%-16s %12.0f %10.3f %10.3f\n' "$name" "${rps[$name]}" "$p50" "$p99"
done
ratio() { awk -v a="$2" -v b="$3" -v n="$1" 'BEGIN { printf "ratio %s %.2f\n", n, a / b }'; }
ratio fresh_memory "${rps[memory_fresh]}" "${rps[bare]}"
ratio replay_memory "${rps[memory_replay]}" "${rps[bare]}"
ratio exempt "${rps[memory_exempt]}" "${rps[bare_exempt]}"
if [ -n "$redis" ]; then
  ratio fresh_redis "${rps[redis_fresh]}" "${rps[bare]}"
  ratio replay_redis "${rps[redis_replay]}" "${rps[bare]}"
fi
