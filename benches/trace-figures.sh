#!/usr/bin/env bash
# Prints the cost of tracing, measured side by side in one run on the
# default guest (times are the guest's own CLOCK_MONOTONIC, as printed by
# the test programs):
#  - a getpid loop and a fork/exec loop: untraced; traced by hvtrace (all
#    calls); traced by Debian's strace inside the guest. Per-call added cost
#    of each, and the ratio hvtrace/strace;
#  - the same loops untraced while another guest thread (their parent
#    shell) is traced: slowdown against no tracer at all.
# Usage: benches/trace-figures.sh [getpid-calls] [forkexec-iterations] [rounds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=target/release/hvtrace
n=${1:-2000}
m=${2:-3}
rounds=${3:-3}
"$hv" run -- true >/dev/null 2>&1   # make sure the snapshot is cached

getpid_ns() { sed -n 's/.* \([0-9]*\) ns per call/\1/p'; }
fork_ns() { sed -n 's/.* \([0-9]*\) ns per iteration/\1/p'; }

declare -A best
run() { # label, metric, command...
    local label=$1 metric=$2; shift 2
    local v; v=$("$@" 2>/dev/null | $metric | tail -1)
    [ -n "$v" ] || { echo "no figure from: $*" >&2; exit 1; }
    if [ -z "${best[$label]:-}" ] || [ "$v" -lt "${best[$label]}" ]; then best[$label]=$v; fi
    echo "  $label: $v" >&2
}

for _ in $(seq "$rounds"); do
    # Interleaved so that drift of the machine hits every variant alike.
    run g_plain getpid_ns "$hv" run -- hv-getpid-loop "$n"
    run g_hv getpid_ns "$hv" trace -o /dev/null -- hv-getpid-loop "$n"
    run g_strace getpid_ns "$hv" run -- strace -o /dev/null hv-getpid-loop "$n"
    run g_bystander getpid_ns "$hv" trace -o /dev/null -- /bin/sh -c "hv-getpid-loop $n; true"
    run f_plain fork_ns "$hv" run -- hv-forkexec-loop "$m"
    run f_hv fork_ns "$hv" trace -f -o /dev/null -- hv-forkexec-loop "$m"
    run f_strace fork_ns "$hv" run -- strace -f -o /dev/null hv-forkexec-loop "$m"
    run f_bystander fork_ns "$hv" trace -o /dev/null -- /bin/sh -c "hv-forkexec-loop $m; true"
done

# The best of the rounds: noise on a shared machine only ever adds time.
best_of() { echo "${best[$1]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b == 0 ? 0 : a / b) }'; }
echo "best of $rounds rounds; getpid loop: $n calls; fork/exec loop: $m iterations (guest clock)"
printf '%-26s %14s %14s %14s %14s %14s %10s\n' loop untraced hvtrace strace hv_added strace_added hv/strace
for l in g f; do
    p=$(best_of ${l}_plain); h=$(best_of ${l}_hv); s=$(best_of ${l}_strace)
    name=$([ $l = g ] && echo "getpid (ns/call)" || echo "fork+exec+wait (ns/iter)")
    printf '%-26s %14s %14s %14s %14s %14s %10s\n' "$name" "$p" "$h" "$s" $((h - p)) $((s - p)) "$(ratio $((h - p)) $((s - p)))"
done
printf '\n%-26s %14s %14s %10s\n' "untraced, parent traced" no_tracer with_tracer slowdown
for l in g f; do
    p=$(best_of ${l}_plain); b=$(best_of ${l}_bystander)
    name=$([ $l = g ] && echo "getpid (ns/call)" || echo "fork+exec+wait (ns/iter)")
    printf '%-26s %14s %14s %10s\n' "$name" "$p" "$b" "$(ratio "$b" "$p")"
done
