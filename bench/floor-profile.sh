#!/usr/bin/env bash
# Where a lone message's time goes: a fresh release cim-host (extra flags: "$@", e.g.
# --builtin-handlers), one sender -> receiver pair at 1,000 msgs/s, profiled with `perf record`
# for 6 s while cim-bench sends; prints server CPU per message grouped by where the samples
# landed (kernel scheduler, wasmtime, guest code, ...), and context switches per message.
# Needs Debian's linux-perf and root (or perf_event_paranoid <= 1). The table in
# docs/BENCHMARKS.md ("Where a lone message's time goes") comes from this.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p cim-host -p cim-bench
D=$(mktemp -d /tmp/cim-floor-profile.XXXXXX)
RUST_LOG=warn ./target/release/cim-host up --tcp 127.0.0.1:0 --http 127.0.0.1:0 --no-rate-limits \
  --store memory --data-dir "$D/data" "$@" >"$D/out" 2>"$D/log" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 300); do grep -q '^cim-host ready' "$D/out" 2>/dev/null && break; sleep 0.1; done
HTTP=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' "$D/out")
BENCH=(./target/release/cim-bench --target "cim://$HTTP" --server-pid "$PID")
"${BENCH[@]}" p2p --pairs 1 --rate 1000 --messages 2000 >"$D/warm-up.txt" 2>&1
perf stat -e task-clock,context-switches -p "$PID" -o "$D/stat.txt" -- sleep 6 &
STAT=$!
perf record -q -F 4999 -p "$PID" -o "$D/perf.data" -- sleep 6 >/dev/null 2>&1 &
REC=$!
"${BENCH[@]}" p2p --pairs 1 --rate 1000 --messages 6000 >"$D/floor.txt" 2>&1
wait "$STAT" "$REC" || true
grep -E "latency|cpu" "$D/floor.txt" | head -2
perf report -i "$D/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null >"$D/report.txt"
python3 - "$D" <<'PY'
import collections, re, sys
d = sys.argv[1]
stat = open(f"{d}/stat.txt").read()
task_ms = float(re.search(r"([0-9.,]+)\s+msec task-clock", stat).group(1).replace(",", ""))
switches = int(re.search(r"([0-9,]+)\s+context-switches", stat).group(1).replace(",", ""))
messages = 6000
def group(dso, sym):
    if dso == "[kernel.kallsyms]":
        if re.search(r"finish_task_switch|schedule|_raw_spin|enqueue|dequeue|pick_next|switch|update_|wake|ttwu|select_task|idle|hrtimer|tick|psi_|rcu|futex|epoll|ep_", sym):
            return "kernel: scheduler, wake-ups (futex, epoll waits)"
        if re.search(r"tcp|^ip_|skb|sock|net_|napi|loopback|__dev_|inet|process_backlog|softirq|nf_|__sys_sendto|__sys_recvfrom", sym):
            return "kernel: loopback TCP"
        if re.search(r"page|fault|madvise|mm_|memcg|zap|pte|vma|unmap|folio", sym):
            return "kernel: memory (faults, madvise)"
        return "kernel: other (syscalls, timers)"
    if dso.startswith("[JIT]"):
        return "guest code (JIT)"
    if re.search(r"wasmtime|cranelift|wasmparser|component", sym):
        return "wasmtime (instantiate, lift/lower, drop)"
    if re.search(r"^mi_|_mi_|mimalloc", sym):
        return "allocator"
    if re.search(r"memset|memmove|memcpy|memcmp", sym):
        return "libc memset/memcpy"
    if re.search(r"tokio|mio|parking_lot|futures|std::thread|Condvar|park", sym):
        return "tokio, scheduling (user space)"
    if dso.startswith("libc") or dso == "[vdso]":
        return "libc, vdso (syscall stubs, clock)"
    return "cim-host (routing, protocol, store, metrics)"
shares = collections.Counter()
for line in open(f"{d}/report.txt"):
    m = re.match(r"\s+([0-9.]+)%\s+(\[JIT\] tid \d+|\S+)\s+\[[.kg]\]\s+(.*)", line)
    if m:
        shares[group(m.group(2), m.group(3))] += float(m.group(1))
per_msg = task_ms * 1000 / messages
print(f"| µs of server CPU per message | {per_msg:.0f} in all |\n|---|---:|")
for k, v in shares.most_common():
    print(f"| {k} | {v * per_msg / 100:.0f} ({v:.0f}%) |")
print(f"\ncontext switches per message: {switches / messages:.1f} (perf stat over the same 6 s)")
PY
echo "raw: $D" >&2
