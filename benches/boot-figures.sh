#!/usr/bin/env bash
# Prints the VMM's boot figures, measured side by side in one run:
#  - cold boot (no snapshot) to the command's first output, per kernel,
#    and the same kernel + image under QEMU TCG;
#  - VMM set-up time before the guest's first instruction;
#  - restore from the cached snapshot to first output, and its ratio to cold;
#  - the PVM syscall fix-up: a guest getpid loop, per call;
#  - VMM RSS beyond guest RAM.
# Usage: benches/boot-figures.sh [kernel...]   (default: minimal)
# Cold boots take minutes each here (guest kernel code is emulated on PVM).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=target/release/hvtrace
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(minimal)
img=$(images/build.sh 2>/dev/null)

field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }

qemu_first_output_ms() { # kernel-file
    local dir; dir=$(mktemp -d)
    local t0; t0=$(date +%s%N)
    qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none -no-reboot \
        -kernel "$1" -initrd "$img" -append "console=ttyS0 panic=-1" \
        -serial "file:$dir/console" -serial "file:$dir/ctl" -serial null -serial null &
    local pid=$!
    until grep -q HVTRACE-READY "$dir/ctl" 2>/dev/null; do sleep 0.05; done
    local t1; t1=$(date +%s%N)
    kill $pid; wait $pid 2>/dev/null || true
    rm -rf "$dir"
    echo $(( (t1 - t0) / 1000000 ))
}

printf '%-12s %14s %14s %12s %14s %14s %8s\n' kernel cold_first_ms qemu_ready_ms setup_ms restore_first_ms cold/restore rss+KiB
for k in "${kernels[@]}"; do
    case $k in
        minimal) qk=$(kernel-config/build.sh 2>/dev/null)/bzImage ;;
        debian-6.1) qk=$(kernel-config/debian.sh 6.1 2>/dev/null) ;;
        debian-6.12) qk=$(kernel-config/debian.sh 6.12 2>/dev/null) ;;
        *) qk=$k ;;
    esac
    cold=$($hv run --kernel "$k" --no-cache --report -- echo first 2>&1 >/dev/null | grep hvtrace-report)
    warm=$($hv run --kernel "$k" --report -- echo first 2>&1 >/dev/null | grep hvtrace-report)
    q=$(qemu_first_output_ms "$qk")
    c=$(echo "$cold" | field first_output_ms); w=$(echo "$warm" | field first_output_ms)
    printf '%-12s %14.0f %14s %12.1f %14.0f %14.1f %8s\n' "$k" "$c" "$q" "$(echo "$cold" | field vmm_setup_ms)" "$w" \
        "$(echo "$c / $w" | bc -l)" "$(echo "$warm" | field vmm_rss_beyond_guest_ram_kib)"
done
# QEMU's column is the time to init's HVTRACE-READY line (QEMU has no
# snapshot cache and runs no command here); hvtrace's is to the command's output.

n=2000
g=$($hv run --report -- hv-getpid-loop $n 2>&1)
echo
echo "getpid loop in the guest ($n calls):"
echo "$g" | grep 'ns per call'
echo "syscall fix-ups during the run: $(echo "$g" | grep hvtrace-report | field syscall_fixups)"
