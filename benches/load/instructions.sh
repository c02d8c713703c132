#!/usr/bin/env bash
# The load benchmark's steady twin: user-space instructions per request of the same server and
# cases as run.sh (without the middleware; fresh keys, replays and an exempt route on the memory
# store), counted by valgrind's callgrind while wrk sends requests. Instruction counts do not
# drift with the machine's load as throughput does, so these ratios repeat to within 1 %; they
# do not see cache misses or system calls, so they complement run.sh's figures, not replace them.
#
#   bash benches/load/instructions.sh     # MEASURE=5s by default
#
# Installs wrk and valgrind (Debian packages) if missing and builds the server in release mode.
# Under valgrind SHA-256 runs in software (the CPU's SHA extensions are hidden from it), which
# adds about 10 000 instructions to each keyed request that the real CPU does in about 150 ns.
set -euo pipefail
cd "$(dirname "$0")/../.."

MEASURE="${MEASURE:-5s}"
here=benches/load

for tool in wrk valgrind; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "== installing $tool"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
  fi
done
echo "== building the server (release)"
cargo build --release --locked --quiet --bin bench_server

work=$(mktemp -d)
server=""
stop_server() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=""; }
trap 'stop_server; rm -rf "$work"' EXIT

# Prints the instructions per request of one case: warms the server up, zeroes the counters,
# sends requests for MEASURE, dumps the counters and divides by the requests wrk completed.
measure() {
  local server_name=$1 path=$2 script=$3 out="$work/callgrind.$1.$3"
  # Without Redis: the Redis cases are run.sh's, and callgrind would count the client's waits.
  BENCH_REDIS_URL="" valgrind --tool=callgrind --callgrind-out-file="$out" \
    target/release/bench_server >"$work/servers" 2>"$work/valgrind.log" &
  server=$!
  for _ in $(seq 1 600); do grep -q '^ready' "$work/servers" 2>/dev/null && break; sleep 0.1; done
  grep -q '^ready' "$work/servers" || { cat "$work/valgrind.log"; exit 1; }
  local url
  url=$(awk -v name="$server_name" '$1 == name { print $2 }' "$work/servers")
  wrk -t1 -c4 -d2s -s "$here/$script.lua" "$url$path" >/dev/null
  callgrind_control --zero "$server" >/dev/null 2>&1
  local requests
  requests=$(wrk -t1 -c4 -d"$MEASURE" -s "$here/$script.lua" "$url$path" | awk '/requests in/ { print $1 }')
  callgrind_control --dump "$server" >/dev/null 2>&1
  stop_server
  local instructions
  instructions=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
  echo $((instructions / requests))
}

# shellcheck source=benches/load/cases.sh
source "$here/cases.sh"
echo "== instructions per request, $MEASURE per case under callgrind"
for case in "${cases[@]}"; do
  read -r name server_name path script <<<"$case"
  count=$(measure "$server_name" "$path" "$script")
  echo "$count" >"$work/$name"
  printf 'instructions %-16s %8d\n' "$name" "$count"
done
# As run.sh's ratios: the share of the bare handler's rate the middleware leaves, were
# instructions all that counted.
ratio() { awk -v n="$1" -v a="$(cat "$work/$2")" -v b="$(cat "$work/$3")" 'BEGIN { printf "instructions-ratio %s %.2f\n", n, b / a }'; }
ratio fresh_memory memory_fresh bare
ratio replay_memory memory_replay bare
ratio fresh_marked_route memory_marked bare
ratio exempt memory_exempt bare_exempt
