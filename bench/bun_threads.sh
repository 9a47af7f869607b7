#!/bin/bash
# Where a Bun server's CPU goes, thread by thread (issue 13, Bun's part): the main JS thread, the JIT's
# compiler threads, the GC's helpers, fetch's HTTP thread, mimalloc's scavenger. A JS CPU profile
# (`bun --cpu-prof`) sees only the main thread; /proc/<pid>/task/*/stat sees them all. Each server
# answers wrk (c=32) for WARM seconds, then SECS measured seconds; rows take turns, ROUNDS times.
#
#   bench/bun_threads.sh                    # Bun's JS pass-through and main.ts, default mode
#   SECS=20 ROUNDS=2 bench/bun_threads.sh
# Env: SECS (8), WARM (3), ROUNDS (2), EVENTS (20). Needs wrk. Prints µs of CPU per request by thread.
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${SECS:-8}; WARM=${WARM:-3}; ROUNDS=${ROUNDS:-2}; EVENTS=${EVENTS:-20}
DIR=$(mktemp -d /tmp/bun-threads.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "not up: $1" >&2; exit 1; }

DIFY=$(free_port)
deno run -A "$ROOT/bench/dify_bench_server.ts" --port "$DIFY" --events "$EVENTS" >"$DIR/dify.log" 2>&1 &
PIDS+=($!)
wait_up "http://127.0.0.1:$DIFY/v1/info"
printf 'wrk.method = "POST"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer app-bench"\n' \
  '{"inputs":{},"query":"hi","response_mode":"streaming","user":"bench","conversation_id":""}' >"$DIR/dify.lua"
printf 'wrk.method = "POST"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Authorization"] = "Bearer app-bench"\n' \
  '{"model":"dify","stream":true,"messages":[{"role":"user","content":"hi"}]}' >"$DIR/chat.lua"

# name, script, wrk script, path
ROWS=("pass $ROOT/bench/passthrough_bun.ts dify /v1/chat-messages" "main $ROOT/main.ts chat /v1/chat/completions")
declare -A PORT
for row in "${ROWS[@]}"; do
  read -r name script lua path <<<"$row"
  PORT[$name]=$(free_port)
  env PORT="${PORT[$name]}" UPSTREAM="http://127.0.0.1:$DIFY" DIFY_API_URL="http://127.0.0.1:$DIFY/v1" DIFY_API_KEY=app-bench \
    KV_PATH="$DIR/$name.kv" BUN_CONFIG_MAX_HTTP_REQUESTS=2048 BENCH_PARENT_PID=$$ bun "$script" >"$DIR/$name.log" 2>&1 &
  PIDS+=($!)
  echo "$!" >"$DIR/$name.pid"
  wait_up "http://127.0.0.1:${PORT[$name]}/healthz"
  wrk -t1 -c32 -d"${WARM}s" -s "$DIR/$lua.lua" "http://127.0.0.1:${PORT[$name]}$path" >/dev/null
done
# Per thread name: utime+stime in clock ticks.
snap() { for t in /proc/"$1"/task/*; do echo "$(tr ' ' _ <"$t/comm") $(awk '{print $14+$15}' "$t/stat")"; done |
  awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
for round in $(seq "$ROUNDS"); do
  for row in "${ROWS[@]}"; do
    read -r name script lua path <<<"$row"
    pid=$(cat "$DIR/$name.pid")
    snap "$pid" >"$DIR/t0"
    out=$(wrk -t1 -c32 -d"${SECS}s" -s "$DIR/$lua.lua" "http://127.0.0.1:${PORT[$name]}$path")
    snap "$pid" >"$DIR/t1"
    n=$(echo "$out" | grep -o "[0-9]* requests in" | cut -d' ' -f1)
    echo "round $round, $name: $n requests, $(echo "$out" | grep -o 'Requests/sec: *[0-9.]*')"
    join "$DIR/t0" "$DIR/t1" | awk -v n="$n" -v tick="$TICK_US" \
      '{d=($3-$2)*tick/n; tot+=d; if (d>=0.5) printf "  %-14s %6.1f µs/request\n", $1, d} END {printf "  %-14s %6.1f µs/request\n", "all threads", tot}'
  done
done
