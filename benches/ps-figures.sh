#!/usr/bin/env bash
# Prints how long `hvtrace ps` takes on a busy guest (hv-procs: 2
# processes with N threads each), for this checkout and, side by side in
# the same run, for a baseline build: each binary serves its own VM (the
# task walk runs in the VM's hvtrace), both VMs run at once, and the calls
# are interleaved so that drift of a noisy machine hits both alike.
#  - first ps: loads the kernel's symbols and BTF, then walks;
#  - ps again: best of the repeated calls (the walk alone).
# Usage: benches/ps-figures.sh [--baseline PATH-TO-HVTRACE] [threads] [calls]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
baseline=
if [ "${1:-}" = --baseline ]; then baseline=$2; shift 2; fi
threads=${1:-1000}
calls=${2:-10}
cargo build --release -q -p hvtrace
current=$root/target/release/hvtrace
"$current" run -- true >/dev/null 2>&1   # make sure the snapshot is cached
tmp=$(mktemp -d)
pids=()
cleanup() {
    for s in "$tmp"/*.sock; do
        [ -S "$s" ] || continue
        python3 -c "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{\"v\":1,\"op\":\"shutdown\"}\n'); s.recv(100)" "$s" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

labels=(current)
declare -A bin=([current]=$current)
if [ -n "$baseline" ]; then labels=(baseline current); bin[baseline]=$baseline; fi

for l in "${labels[@]}"; do
    "${bin[$l]}" run --api-sock "$tmp/$l.sock" -- hv-procs 2 "$threads" > "$tmp/$l.out" 2>"$tmp/$l.err" &
    pids+=($!)
done
for l in "${labels[@]}"; do
    until grep -q "hv-procs: ready" "$tmp/$l.out" 2>/dev/null; do
        sleep 0.5
        if ! [ -S "$tmp/$l.sock" ] && grep -q "error" "$tmp/$l.err"; then cat "$tmp/$l.err" >&2; exit 1; fi
    done
done

ms_of() { # binary, socket: wall-clock ms of one ps
    local t0 t1; t0=$(date +%s%N)
    "$1" ps --api-sock "$2" > "$tmp/ps.txt"
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
}
declare -A first best tasks
for l in "${labels[@]}"; do
    first[$l]=$(ms_of "${bin[$l]}" "$tmp/$l.sock")
    tasks[$l]=$(( $(wc -l < "$tmp/ps.txt") - 1 ))
done
for _ in $(seq "$calls"); do
    for l in "${labels[@]}"; do
        v=$(ms_of "${bin[$l]}" "$tmp/$l.sock")
        if [ -z "${best[$l]:-}" ] || [ "$v" -lt "${best[$l]}" ]; then best[$l]=$v; fi
    done
done
echo "hvtrace ps on the default guest with hv-procs 2 $threads (wall clock, client included)"
printf '%-28s' figure; for l in "${labels[@]}"; do printf ' %10s' "$l"; done; echo
printf '%-28s' "tasks listed"; for l in "${labels[@]}"; do printf ' %10s' "${tasks[$l]}"; done; echo
printf '%-28s' "first ps (ms)"; for l in "${labels[@]}"; do printf ' %10s' "${first[$l]}"; done; echo
printf '%-28s' "ps again, best of $calls (ms)"; for l in "${labels[@]}"; do printf ' %10s' "${best[$l]}"; done; echo
