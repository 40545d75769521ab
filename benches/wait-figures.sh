#!/usr/bin/env bash
# Prints how long a user waits for hvtrace on a cached snapshot, for this
# checkout and, side by side in the same run, for a baseline build:
#  - `hvtrace run -q -- /bin/sh -c 'echo again'`: wall clock from the
#    command's start to the guest's first byte on stdout, and to its exit;
#  - `hvtrace run -q -- true` and `hvtrace trace -q -o /dev/null -- true`:
#    the whole command, wall clock.
# Runs are interleaved (baseline, current, baseline, ...) so that drift of
# a noisy machine hits both alike; the best of the rounds is kept.
#
# Usage: benches/wait-figures.sh [--baseline PATH-TO-HVTRACE] [rounds]
# A baseline binary uses the scripts of the tree it was built in.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
baseline=
if [ "${1:-}" = --baseline ]; then baseline=$2; shift 2; fi
rounds=${1:-5}
cargo build --release -q -p hvtrace
current=$root/target/release/hvtrace
labels=(current)
declare -A bin=([current]=$current)
if [ -n "$baseline" ]; then labels=(baseline current); bin[baseline]=$baseline; fi
for l in "${labels[@]}"; do
    # Snapshots cached, the build scripts' results too.
    "${bin[$l]}" run -q -- true >/dev/null 2>&1
done

# Wall-clock ms to the first stdout byte and to the exit of one command.
timed() {
    python3 - "$@" <<'EOF'
import os, subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
first = p.stdout.read(1)
t1 = time.monotonic()
p.stdout.read()
if p.wait() != 0:
    sys.exit(f"{sys.argv[1:]} failed")
t2 = time.monotonic()
print(f"{(t1 - t0) * 1e3:.0f} {(t2 - t0) * 1e3:.0f}" if first else f"- {(t2 - t0) * 1e3:.0f}")
EOF
}

declare -A best
keep() { # key value: the smallest value seen
    if [ -z "${best[$1]:-}" ] || [ "$2" -lt "${best[$1]}" ]; then best[$1]=$2; fi
}
for _ in $(seq "$rounds"); do
    for l in "${labels[@]}"; do
        read -r first whole < <(timed "${bin[$l]}" run -q -- /bin/sh -c 'echo again')
        keep "$l.first" "$first"
        keep "$l.echo" "$whole"
        read -r _ whole < <(timed "${bin[$l]}" run -q -- true)
        keep "$l.true" "$whole"
        read -r _ whole < <(timed "${bin[$l]}" trace -q -o /dev/null -- true)
        keep "$l.trace" "$whole"
    done
done

echo "best of $rounds rounds, wall clock from the command's start (ms)"
printf '%-44s' figure; for l in "${labels[@]}"; do printf ' %10s' "$l"; done; echo
row() {
    printf '%-44s' "$1"
    for l in "${labels[@]}"; do printf ' %10s' "${best[$l.$2]}"; done
    echo
}
row "run -- sh -c 'echo again': first output" first
row "run -- sh -c 'echo again': exit" echo
row "run -- true: exit" true
row "trace -o /dev/null -- true: exit" trace
