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
#   bench/cluster.sh hop        # instead: Redis a network hop away (see hop() below)
#   bench/cluster.sh chaos      # instead: the chaos tests, longer (see chaos() below)
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

# Redis a network hop away: two nodes reach their Redis through the delaying TCP proxy of the
# end-to-end tests (tests/common/proxy.rs), at ~1.4 ms and ~2.5 ms round trip, with HOP_USERS
# connections (default 12,000). Per delay: a Redis restarted empty (how long until GET /online
# is whole again; then whether it stays whole, i.e. no live node is reaped) and route-login
# churn (logins/s, refused route logins, users who stayed but dropped out, ghost entries after
# everyone left; HOP_WORKERS churn workers, default 128: each churn cycle is ~25 round trips
# in a row through the proxy, so 1,000 logins/s at ~3 ms needs ~80 busy workers), the same
# churn while Redis restarts empty (presence whole and no ghost afterwards), and a paced p2p
# probe (4 pairs, ~400 msg/s, acks and resends as a client must) across a restart of a Redis
# with its append-only file, beside HOP_USERS idle connections (lost / sent, latency p99). The
# measuring is the tests' own, run at this scale (HOP_DELAYS and HOP_TESTS pick some of them;
# RESULTS=<dir of an earlier run> then puts the new logs beside the old ones in one table);
# PROFILE=release builds them optimised (a second full build: mind the disk).
hop() {
  local users=${HOP_USERS:-12000} profile=()
  [ "${PROFILE:-debug}" = release ] && profile=(--release)
  mkdir -p "$RESULTS"
  for delay in ${HOP_DELAYS:-600 1250}; do
    for t in ${HOP_TESTS:-presence_is_back_within_5s_of_a_redis_restart_with_redis_a_hop_away \
             route_login_churn_with_redis_a_hop_away_leaves_no_ghost \
             route_login_churn_across_an_empty_redis_restart_leaves_presence_whole \
             a_paced_probe_across_a_redis_restart_loses_nothing}; do
      log "$t, ${delay} us each way, $users users"
      if CIM_TEST_HOP_USERS=$users CIM_TEST_HOP_DELAY_US=$delay CIM_TEST_CHURN_WORKERS=${HOP_WORKERS:-128} \
        CIM_TEST_PROBE_USERS=$users \
        cargo test "${profile[@]}" -q -p cim-tests --test cluster_latency "$t" -- --exact --nocapture \
        >"$RESULTS/hop-$delay-$t.log" 2>&1; then
        echo ok >>"$RESULTS/hop-$delay-$t.log"
      else
        echo FAILED >>"$RESULTS/hop-$delay-$t.log"
      fi
    done
  done
  log "results"
  python3 - "$RESULTS" "$users" <<'EOF'
import pathlib, re, sys
d, users = pathlib.Path(sys.argv[1]), sys.argv[2]
R = "presence_is_back_within_5s_of_a_redis_restart_with_redis_a_hop_away"
C = "route_login_churn_with_redis_a_hop_away_leaves_no_ghost"
CR = "route_login_churn_across_an_empty_redis_restart_leaves_presence_whole"
P = "a_paced_probe_across_a_redis_restart_loses_nothing"
# The delays whose logs are in the results directory (HOP_DELAYS, HOP_TESTS and a directory
# that already holds an earlier run's logs make a partial rerun).
cols = sorted({p.name.split("-")[1] for p in d.glob("hop-*-*.log")}, key=int)
def text(delay, test):
    p = d / f"hop-{delay}-{test}.log"
    return p.read_text() if p.exists() else "not-run"
def grab(delay, test, pattern):
    m = re.search(pattern, text(delay, test))
    if not m:
        return "—"
    v = m.group(1)
    # Rust's Duration debug form (533.378678ms, 1.231925488s) to 2 decimals.
    d_ = re.fullmatch(r"([0-9.]+)(ms|s)", v)
    if d_ and "." in v:
        return f"{float(d_.group(1)):.2f} {d_.group(2)}"
    return v
rtt = [grab(c, R, r"round trip through the proxy: ([0-9.]+m?s)") for c in cols]
print(f"| two nodes, {users} connections | " + " | ".join(f"Redis {r} away" for r in rtt) + " |")
print("|---|" + "---:|" * len(cols))
rows = [
    ("Redis restarted empty: presence back on `GET /online`", R, r"users back on GET /online ([0-9.]+m?s)"),
    ("then `GET /online` stays whole, no live node reaped", R, r"no live node reaped: GET /online stayed whole for ([0-9]+s)"),
    ("route-login churn: logins/s", C, r"disconnects, ([0-9]+)/s"),
    ("route logins refused", C, r"refused: ([0-9]+)"),
    ("staying users missing / extra entries after the churn (node a)", C, r"after the churn on node-a: ([0-9]+ missing, [0-9]+ extra)"),
    ("ghost entries after every client disconnected", C, r"disconnected: ([0-9]+)"),
    ("churn across an empty Redis restart: logins refused once it was back", CR, r"; ([0-9]+) after\)"),
    ("then missing / extra entries (node a)", CR, r"after the churn on node-a: ([0-9]+ missing, [0-9]+ extra)"),
    ("then ghost entries after every client disconnected", CR, r"disconnected: ([0-9]+)"),
    ("paced probe across a Redis restart (AOF): lost / sent", P, r"probe row: lost ([0-9]+ / [0-9]+)"),
    ("paced probe: messages/s reached", P, r"msg/s asked, ([0-9]+) msg/s"),
    ("paced probe: latency p99 (first send to first delivery)", P, r"probe row: .*p99 ([0-9]+ ms)"),
    ("paced probe: duplicates before de-dup", P, r"duplicated ([0-9]+)"),
]
for label, test, pattern in rows:
    print(f"| {label} | " + " | ".join(grab(c, test, pattern) for c in cols) + " |")
outcome = [" / ".join(text(c, t).split()[-1] for t in (R, C, CR, P)) for c in cols]
print("| test outcome (restart / churn / churn across restart / probe) | " + " | ".join(outcome) + " |")
EOF
  log "raw logs in $RESULTS"
}
# The chaos tests of tests/chaos.rs (three nodes chatting on a Redis with AOF, on a Redis
# Cluster; node b SIGKILLed and started again under its id, Redis killed and started again),
# CHAOS_ROUNDS times in one run each (default 5; CI runs one round), built optimised: every
# acknowledged message must reach every recipient exactly once after de-duplication, in each
# sender's order. Prints each scenario's counts (sent, acknowledged, delivered, redelivered
# before de-dup, lost) and its take-over times.
chaos() {
  mkdir -p "$RESULTS"
  local rounds=${CHAOS_ROUNDS:-5} failed=0
  for t in chat_survives_a_killed_node_and_a_redis_restart_with_nothing_lost \
           chat_on_a_redis_cluster_survives_a_killed_node_and_a_cluster_restart_with_nothing_lost; do
    log "$t, $rounds rounds"
    if CIM_TEST_CHAOS_ROUNDS=$rounds cargo test --release -q -p cim-tests --test chaos "$t" -- --exact --nocapture \
      >"$RESULTS/chaos-$t.log" 2>&1; then
      echo "ok" >>"$RESULTS/chaos-$t.log"
    else
      echo "FAILED" >>"$RESULTS/chaos-$t.log"; failed=1
    fi
    grep -E "round\(s\) of chaos|was killed|^lost|FAILED|^ok$" "$RESULTS/chaos-$t.log" || true
  done
  log "raw logs in $RESULTS"
  return $failed
}
if [ "${1:-}" = hop ]; then hop; exit 0; fi
if [ "${1:-}" = chaos ]; then chaos; exit $?; fi

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
