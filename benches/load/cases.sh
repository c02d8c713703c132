# The load benchmark's cases without Redis, shared by run.sh and instructions.sh:
# case name, server name (as bench_server prints it), path, wrk script.
# shellcheck shell=bash
cases=(
  "bare bare /orders fresh"
  "memory_fresh memory /orders fresh"
  "memory_replay memory /orders replay"
  "memory_marked memory /marked fresh"
  "bare_exempt bare /exempt unkeyed"
  "memory_exempt memory /exempt unkeyed"
)
