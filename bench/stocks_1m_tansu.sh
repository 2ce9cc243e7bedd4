#!/usr/bin/env bash
# Quick measurement: N seed ticks (default 1M) through pipelines/stocks.yaml against a Tansu broker
# (memory storage) on a free loopback port. Prints the run's wall time, CPU time and peak RSS.
#
#   make build && bench/stocks_1m_tansu.sh [N]
#
# The backlog is produced first (`flowgate produce --rate 0`: event time 1 ms apart, ending now);
# then `flowgate run --until-idle 3s` consumes it from the earliest offset. The wall time includes
# the group join and the 3 s idle wait before the run stops.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
TANSU=${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}
FLOWGATE=${FLOWGATE_BIN:-target/debug/flowgate}
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
"$TANSU" broker --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" \
  --storage-engine memory://tansu/ > "$WORK/tansu.log" 2>&1 &
BROKER=$!
trap 'kill $BROKER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
"$TANSU" topic create ticks --broker "tcp://127.0.0.1:$PORT" --partitions 3 > /dev/null
"$FLOWGATE" produce --brokers "127.0.0.1:$PORT" --topic ticks --count "$N" --rate 0 2>&1 | tail -1
start=$(date +%s.%N)
DATA_DIR="$WORK/data" KAFKA_BROKERS="127.0.0.1:$PORT" GROUP=bench \
  /usr/bin/time -f "cpu_user_s=%U cpu_sys_s=%S max_rss_kb=%M" \
  "$FLOWGATE" run pipelines/stocks.yaml --until-idle 3s 2> "$WORK/run.log"
end=$(date +%s.%N)
grep -E "done:" "$WORK/run.log" | sed 's/^.*INFO //'
tail -1 "$WORK/run.log"
python3 - "$start" "$end" "$N" <<'PY'
import sys
start, end, n = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
wall = end - start
print(f"wall {wall:.2f} s including the 3 s idle wait; {n / (wall - 3):,.0f} events/s over the rest")
PY
