#!/usr/bin/env bash
# cim next to Mosquitto and NATS with the same workload (cim-bench), then docs/BENCHMARKS.md.
# cim runs three times: plain; with authentication on (a second host verifying HS256 tokens,
# every simulated user logging in with its own token), so the document shows what tokens cost;
# and with `--builtin-handlers` (the handlers compiled into the host instead of WASM components,
# kind cim-native), so it shows what the components cost (the WASM tax). All three run on
# `--store memory`: these are the at-most-once rows (MQTT QoS 0, core NATS).
# Each server is first watched with no client at all (`cim-bench idle`: its idle CPU), then
# gets idle connections (memory per connection on a fresh server), then the message runs:
# p2p, group fan-out one message at a time, the latency floor (1 pair at 1,000 msgs/s) and
# unpaced fan-out (many group messages in flight: deliveries/s).
# Then the at-least-once section: p2p --qos 1 against cim on its default embedded store, cim
# on a Redis of its own (AOF, appendfsync everysec), a second Mosquitto with persistence on
# (QoS 1, persistent sessions) and a second nats-server with JetStream (-js, file storage).
#
#   bench/compare.sh               # everything, ~9 minutes on 2 cores (after the build; ~2.5 of
#                                  # them the at-least-once section, most of that cim on Redis)
#   QUICK=1 bench/compare.sh       # smaller numbers, ~1 minute, to check the script itself
#   PEERS=running bench/compare.sh # use the Mosquitto/NATS already on :1883/:4222
#
# By default the script starts its own Mosquitto and NATS (fresh processes whose pids, memory
# and configuration are known; Mosquitto with `set_tcp_nodelay true`, as latency tests need)
# and its own cim-hosts on port 0 with the in-memory store (plain, with authentication on,
# with native handlers, run one after the other); for the at-least-once section always its own persistent
# Mosquitto, JetStream NATS and Redis (also with PEERS=running), and cim-hosts on the embedded
# and the Redis store; and stops them all at the end.
# Servers and generator run at nice -10 when root, so background builds disturb them less.
# Results (JSON, logs) stay in $RESULTS; the document goes to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=${QUICK:-0}
PEERS=${PEERS:-own}
OUT=${OUT:-docs/BENCHMARKS.md}
RESULTS=${RESULTS:-$(mktemp -d /tmp/cim-bench.XXXXXX)}
MQTT_PORT=${MQTT_PORT:-18830}
NATS_PORT=${NATS_PORT:-14222}
mkdir -p "$RESULTS"

if [ "$QUICK" = 1 ]; then
  P2P_MSGS=2000; P2P_RUNS=1; G_SMALL=200; G_SMALL_MSGS=50; G_BIG=2000; G_BIG_MSGS=10
  C_SMALL=1000; C_BIG=3000; H_CALLS=1000; IDLE_SECS=3; FLOOR_MSGS=2000; FAN_MSGS=50
else
  P2P_MSGS=10000; P2P_RUNS=3; G_SMALL=1000; G_SMALL_MSGS=100; G_BIG=10000; G_BIG_MSGS=20
  C_SMALL=5000; C_BIG=14500; H_CALLS=10000; IDLE_SECS=10; FLOOR_MSGS=5000; FAN_MSGS=200
fi
# The latency floor: one pair paced at 1,000 msgs/s, far below what any target can do.
FLOOR=(p2p --pairs 1 --rate 1000 --messages "$FLOOR_MSGS")
# Unpaced fan-out: G_SMALL recipients with up to 32 group messages in flight, not one.
FANOUT=(group --users "$G_SMALL" --messages "$FAN_MSGS" --window 32)

NICE=()
if [ "$(id -u)" = 0 ]; then NICE=(nice -n -10); fi
log() { printf '\n=== %s\n' "$*" >&2; }

# --- Build ------------------------------------------------------------------------------
log "building cim-host and cim-bench (release)"
cargo build --release -p cim-host -p cim-bench
BENCH=./target/release/cim-bench
HOST=./target/release/cim-host
log "building the components"
if "$HOST" build --help >/dev/null 2>&1; then
  "$HOST" build
else
  (cd components && cargo build --target wasm32-wasip2 --release)
fi

# --- Servers ------------------------------------------------------------------------------
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
stop() { kill -TERM "$1" 2>/dev/null && wait "$1" 2>/dev/null || true; }

# Thousands of connections per process: soft open-files limit up to the hard one.
ulimit -n "$(ulimit -Hn)" || true

need() {
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing $2"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
  command -v "$1" >/dev/null || { echo "compare.sh: $1 is missing (Debian package $2)" >&2; exit 1; }
}

wait_port() { # host port
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "compare.sh: nothing listens on $1:$2" >&2; exit 1
}

need mosquitto mosquitto
need nats-server nats-server
need redis-server redis-server
need python3 python3
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MQTT_VERSION=$( (mosquitto -h 2>&1 || true) | head -1 | awk '{print $3}')
NATS_VERSION=$( (nats-server --version 2>&1 || true) | awk '{print $2}')

if [ "$PEERS" = running ]; then
  MQTT_PORT=1883; NATS_PORT=4222
  wait_port 127.0.0.1 1883; wait_port 127.0.0.1 4222
  MQTT_PID=$(pgrep -x mosquitto | head -1); NATS_PID=$(pgrep -x nats-server | head -1)
  PEER_NOTE="the Mosquitto and NATS already running on this machine (their own configuration)"
else
  cat >"$RESULTS/mosquitto.conf" <<EOF
listener $MQTT_PORT 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest none
EOF
  "${NICE[@]}" mosquitto -c "$RESULTS/mosquitto.conf" >"$RESULTS/mosquitto.log" 2>&1 &
  MQTT_PID=$!; PIDS+=("$MQTT_PID")
  "${NICE[@]}" nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$RESULTS/nats.log" 2>&1 &
  NATS_PID=$!; PIDS+=("$NATS_PID")
  wait_port 127.0.0.1 "$MQTT_PORT"; wait_port 127.0.0.1 "$NATS_PORT"
  PEER_NOTE="fresh Mosquitto (listener on loopback, no persistence, set_tcp_nodelay true) and NATS (defaults, no JetStream) started by the script"
fi
PEER_NOTE="$PEER_NOTE; cim on --store memory (at least once: see that section)"

# Both hosts without rate limits: one generator address logging in thousands of users and
# sending flat out is exactly what the default limits stop; the runs measure the system.
start_cim() { # name extra-args... → sets CIM_PID, CIM_HTTP
  local name=$1; shift
  log "starting $name"
  RUST_LOG=${RUST_LOG:-warn} "${NICE[@]}" "$HOST" up --tcp 127.0.0.1:0 --http 127.0.0.1:0 \
    --no-rate-limits --data-dir "$RESULTS/$name-data" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log" &
  CIM_PID=$!; PIDS+=("$CIM_PID")
  for _ in $(seq 300); do
    grep -q '^cim-host ready' "$RESULTS/$name.out" 2>/dev/null && break
    kill -0 "$CIM_PID" 2>/dev/null || { cat "$RESULTS/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  READY=$(grep '^cim-host ready' "$RESULTS/$name.out") || { echo "$name did not get ready" >&2; exit 1; }
  CIM_HTTP=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$READY")
  echo "$READY" >&2
}

start_cim cim-host --store memory
TARGETS=("cim cim://$CIM_HTTP $CIM_PID" "mqtt mqtt://127.0.0.1:$MQTT_PORT $MQTT_PID" "nats nats://127.0.0.1:$NATS_PORT $NATS_PID")

bench() { # kind name target pid args...
  local kind=$1 name=$2 target=$3 pid=$4; shift 4
  log "$name against $target"
  "${NICE[@]}" "$BENCH" --target "$target" --server-pid "$pid" --json "$RESULTS/$name-$kind.json" "$@" \
    || echo "compare.sh: $name against $target failed (continuing)" >&2
}

# What a second cim host (auth on, native handlers) runs to compare with the plain host in the
# same state: both connection counts, p2p with half load, the small group.
same_runs() { # kind target extra-args...
  local kind=$1 target=$2; shift 2
  bench "$kind" "conns-$C_SMALL" "$target" "$CIM_PID" "$@" conns --n "$C_SMALL"
  bench "$kind" "conns-$C_BIG" "$target" "$CIM_PID" "$@" conns --n "$C_BIG"
  bench "$kind" p2p "$target" "$CIM_PID" "$@" p2p --pairs 16 --messages "$P2P_MSGS" \
    --runs "$P2P_RUNS" --half-load
  bench "$kind" "group-$G_SMALL" "$target" "$CIM_PID" "$@" group --users "$G_SMALL" \
    --messages "$G_SMALL_MSGS"
}

# --- Runs (no clients, then idle connections, while the servers are fresh) -----------------
# Idle CPU: all three watched at once (the generator only reads /proc meanwhile).
log "idle servers, ${IDLE_SECS} s"
IDLE_JOBS=()
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" idle "$target" "$pid" idle --secs "$IDLE_SECS" &
  IDLE_JOBS+=($!)
done
for job in "${IDLE_JOBS[@]}"; do wait "$job"; done
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" "conns-$C_SMALL" "$target" "$pid" conns --n "$C_SMALL"
  bench "$kind" "conns-$C_BIG" "$target" "$pid" conns --n "$C_BIG"
done
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" p2p "$target" "$pid" p2p --pairs 16 --messages "$P2P_MSGS" --runs "$P2P_RUNS" --half-load
done
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" "group-$G_SMALL" "$target" "$pid" group --users "$G_SMALL" --messages "$G_SMALL_MSGS"
done
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" p2p-floor "$target" "$pid" "${FLOOR[@]}"
  bench "$kind" "fanout-$G_SMALL" "$target" "$pid" "${FANOUT[@]}"
done
# The big group last: the native host below repeats everything before it, not this.
for t in "${TARGETS[@]}"; do
  read -r kind target pid <<<"$t"
  bench "$kind" "group-$G_BIG" "$target" "$pid" group --users "$G_BIG" --messages "$G_BIG_MSGS"
done
# --- cim with authentication on (the plain host stopped first, so they never compete) ----
stop "$CIM_PID"
AUTH_ISSUER=https://bench.invalid
head -c 48 /dev/urandom | base64 >"$RESULTS/auth-secret"
start_cim cim-host-auth --store memory --auth-hmac-secret-file "$RESULTS/auth-secret" --auth-issuer "$AUTH_ISSUER"
AUTH=(--token-secret-file "$RESULTS/auth-secret" --token-issuer "$AUTH_ISSUER")
AUTH_TARGET="cim://$CIM_HTTP"
# The same sequence as the plain host went through before its p2p and group runs (both
# connection counts first), so the two are compared in the same state.
same_runs cim-auth "$AUTH_TARGET" "${AUTH[@]}"
stop "$CIM_PID"

# --- cim with native handlers: the WASM tax ---------------------------------------------------
# The same sequence as the plain host up to its big group, so the two compare in the same state.
start_cim cim-host-native --store memory --builtin-handlers
NATIVE=(--kind cim-native)
NATIVE_TARGET="cim://$CIM_HTTP"
bench cim-native idle "$NATIVE_TARGET" "$CIM_PID" "${NATIVE[@]}" idle --secs "$IDLE_SECS"
same_runs cim-native "$NATIVE_TARGET" "${NATIVE[@]}"
bench cim-native p2p-floor "$NATIVE_TARGET" "$CIM_PID" "${NATIVE[@]}" "${FLOOR[@]}"
bench cim-native "fanout-$G_SMALL" "$NATIVE_TARGET" "$CIM_PID" "${NATIVE[@]}" "${FANOUT[@]}"
stop "$CIM_PID"

# --- At least once: every target in its durable mode, one server at a time ------------------
ALO=(p2p --qos 1 --pairs 16 --messages "$P2P_MSGS" --runs "$P2P_RUNS" --half-load)
start_cim cim-host-embedded --store embedded --log-sync os
bench cim p2p-alo "cim://$CIM_HTTP" "$CIM_PID" "${ALO[@]}"
stop "$CIM_PID"

REDIS_PORT=$(free_port)
mkdir -p "$RESULTS/redis"
log "Redis (appendonly yes, appendfsync everysec) on :$REDIS_PORT"
"${NICE[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --appendfsync everysec --dir "$RESULTS/redis" >"$RESULTS/redis.log" 2>&1 &
REDIS_PID=$!; PIDS+=("$REDIS_PID")
wait_port 127.0.0.1 "$REDIS_PORT"
start_cim cim-host-redis --store "redis://127.0.0.1:$REDIS_PORT" --redis-prefix "cimbench:"
bench cim-redis p2p-alo "cim://$CIM_HTTP" "$CIM_PID" --kind cim-redis "${ALO[@]}"
stop "$CIM_PID"; stop "$REDIS_PID"

MQTT_ALO_PORT=$(free_port)
mkdir -p "$RESULTS/mosquitto-data"
# `user`: a root-started Mosquitto would otherwise switch to the mosquitto user, who cannot
# write into this directory.
printf '%s\n' "listener $MQTT_ALO_PORT 127.0.0.1" "allow_anonymous true" "persistence true" \
  "persistence_location $RESULTS/mosquitto-data/" "set_tcp_nodelay true" "log_dest none" \
  "user $(id -un)" >"$RESULTS/mosquitto-alo.conf"
log "Mosquitto with persistence on :$MQTT_ALO_PORT"
"${NICE[@]}" mosquitto -c "$RESULTS/mosquitto-alo.conf" >"$RESULTS/mosquitto-alo.log" 2>&1 &
MQTT_ALO_PID=$!; PIDS+=("$MQTT_ALO_PID")
wait_port 127.0.0.1 "$MQTT_ALO_PORT"
bench mqtt p2p-alo "mqtt://127.0.0.1:$MQTT_ALO_PORT" "$MQTT_ALO_PID" "${ALO[@]}"
stop "$MQTT_ALO_PID"

NATS_JS_PORT=$(free_port)
log "NATS with JetStream on :$NATS_JS_PORT"
"${NICE[@]}" nats-server -a 127.0.0.1 -p "$NATS_JS_PORT" -js -sd "$RESULTS/nats-js" \
  >"$RESULTS/nats-js.log" 2>&1 &
NATS_JS_PID=$!; PIDS+=("$NATS_JS_PID")
wait_port 127.0.0.1 "$NATS_JS_PORT"
bench nats p2p-alo "nats://127.0.0.1:$NATS_JS_PORT" "$NATS_JS_PID" "${ALO[@]}"
stop "$NATS_JS_PID"

log "handler overhead"
"${NICE[@]}" "$BENCH" --json "$RESULTS/handler.json" handler --manifest spin.toml --calls "$H_CALLS" \
  || echo "compare.sh: the handler scenario failed (continuing)" >&2

# --- Report -------------------------------------------------------------------------------
OBS=()
[ -f bench/observations.md ] && OBS=(--observations bench/observations.md)
COMMAND="QUICK=$QUICK PEERS=$PEERS bench/compare.sh   # peers: $PEER_NOTE"
"$BENCH" report --dir "$RESULTS" --out "$OUT" --command "$COMMAND" "${OBS[@]}" \
  --version-of "Mosquitto $MQTT_VERSION" --version-of "NATS $NATS_VERSION"
log "done: $OUT (raw results in $RESULTS)"
