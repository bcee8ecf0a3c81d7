#!/usr/bin/env bash
# What the store and the number of nodes cost: the same p2p and group workloads (cim-bench) against
#   1. one cim-host on the embedded in-memory store,
#   2. one cim-host on Redis,
#   3. two cim-hosts on one Redis (users placed by consistent hash, so most pairs cross nodes),
#   4. three cim-hosts on a three-primary Redis Cluster,
# one after another in one run, then a Markdown table on stdout (the one in docs/CLUSTER.md).
#
#   bench/cluster.sh            # ~2 minutes after the build
#   QUICK=1 bench/cluster.sh    # smaller numbers, to check the script itself
#
# It starts everything it measures (the Redis servers on free ports, no persistence) and
# stops it at the end; the shared Redis on 6379 is not touched. Raw JSON stays in $RESULTS.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
RESULTS=${RESULTS:-$(mktemp -d /tmp/cim-cluster-bench.XXXXXX)}
if [ "$QUICK" = 1 ]; then MSGS=1000; RUNS=1; USERS=200; GMSGS=10; else MSGS=10000; RUNS=3; USERS=1000; GMSGS=50; fi
mkdir -p "$RESULTS"
log() { printf '\n=== %s\n' "$*" >&2; }

log "building (release)"
cargo build --release -p cim-host -p cim-bench >&2
(cd components && cargo build --target wasm32-wasip2 --release) >&2
HOST=./target/release/cim-host
BENCH=./target/release/cim-bench

PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap stop_all EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_redis() { # port
  for _ in $(seq 100); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "cluster.sh: redis on $1 did not answer" >&2; exit 1
}

redis() { # port [extra args...]: a throwaway redis-server
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$RESULTS" "$@" \
    >"$RESULTS/redis-$port.log" 2>&1 &
  PIDS+=("$!")
  wait_redis "$port"
}

node() { # name store-url: starts a cim-host (in this shell, so that stop_all knows it) and
          # sets HTTP to its HTTP address
  local name=$1 store=$2
  "$HOST" up --tcp 127.0.0.1:0 --http 127.0.0.1:0 --node-id "$name" --store "$store" \
    --data-dir "$RESULTS/data-$name" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log" &
  local pid=$!
  PIDS+=("$pid")
  for _ in $(seq 300); do
    grep -q '^cim-host ready' "$RESULTS/$name.out" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$RESULTS/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  HTTP=$(sed -n 's/^cim-host ready.* http=\([^ ]*\).*/\1/p' "$RESULTS/$name.out")
}

measure() { # label route
  log "$1"
  "$BENCH" --target "cim://$2" --json "$RESULTS/$1.p2p.json" p2p --pairs 16 --messages "$MSGS" --runs "$RUNS" >&2
  "$BENCH" --target "cim://$2" --json "$RESULTS/$1.group.json" group --users "$USERS" --messages "$GMSGS" >&2
}

# 1. memory
node solo memory
measure "1-memory" "$HTTP"
stop_all

# 2. one node on Redis
PORT=$(free_port); redis "$PORT"
node r1 "redis://127.0.0.1:$PORT"
measure "2-redis-1-node" "$HTTP"
stop_all

# 3. two nodes on Redis
PORT=$(free_port); redis "$PORT"
node a "redis://127.0.0.1:$PORT"; ROUTE=$HTTP
node b "redis://127.0.0.1:$PORT"
measure "3-redis-2-nodes" "$ROUTE"
stop_all

# 4. three nodes on a Redis Cluster
SEEDS=()
for _ in 1 2 3; do
  PORT=$(free_port)
  redis "$PORT" --cluster-enabled yes --cluster-config-file "nodes-$PORT.conf" --cluster-port "$(free_port)"
  SEEDS+=("127.0.0.1:$PORT")
done
redis-cli --cluster create "${SEEDS[@]}" --cluster-replicas 0 --cluster-yes >"$RESULTS/cluster-create.log"
for s in "${SEEDS[@]}"; do
  for _ in $(seq 100); do
    redis-cli -p "${s#*:}" cluster info | grep -q cluster_state:ok && break
    sleep 0.1
  done
done
URL="redis-cluster://$(IFS=,; echo "${SEEDS[*]}")"
node ca "$URL"; ROUTE=$HTTP
node cb "$URL"
node cc "$URL"
measure "4-redis-cluster-3-nodes" "$ROUTE"
stop_all

log "results"
python3 - "$RESULTS" <<'EOF'
import json, pathlib, sys
d = pathlib.Path(sys.argv[1])
k = lambda v: f"{v/1000:.1f}k"
rows = []
for f in sorted(d.glob("*.p2p.json")):
    name = f.name.removesuffix(".p2p.json")
    p = json.loads(f.read_text())
    g = json.loads((d / f"{name}.group.json").read_text())
    runs = [x for x in p["phases"] if x["mode"] == "max"]
    best = max(runs, key=lambda x: x["msgs_per_s"])
    lost = sum(x["lost"] + x["errors"] for x in p["phases"]) + g["expected_deliveries"] - g["deliveries"] + g["errors"]
    rows.append((name, p["max_msgs_per_s"], [x["msgs_per_s"] for x in runs], best["latency"]["p99_us"], lost, g))
base = rows[0][1]
users = rows[0][5]["users"]
print(f"| setup | p2p msgs/s (median) | p2p runs | ÷ one node in memory | p2p p99 | group to {users}: deliveries/s | fan-out p99 | lost + errors |")
print("|---|---:|---|---:|---:|---:|---:|---:|")
for name, med, runs, p99, lost, g in rows:
    print(f"| {name} | {k(med)} | {' / '.join(k(x) for x in runs)} | {med/base:.2f}× | {p99/1000:.1f} ms | {k(g['deliveries_per_s'])} | {g['fanout']['p99_us']/1000:.1f} ms | {lost} |")
EOF
log "raw results in $RESULTS"
