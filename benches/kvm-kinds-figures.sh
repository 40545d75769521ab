#!/usr/bin/env bash
# Prints, side by side in one run, what the two kinds of KVM cost hvtrace:
# PVM KVM (this machine's /dev/kvm) and hardware SVM KVM (the hardware-KVM
# lane: scripts/hw-kvm.sh, nested inside QEMU's TCG), with QEMU's TCG alone
# as a third column for the boot.
#  - cold boot: `hvtrace run --no-cache --report -- true`, elapsed_ms (boot
#    to init's first request, snapshot writing and the command included);
#    QEMU TCG: start to the image's HVTRACE-READY on its control port;
#  - getpid untraced and traced by `hvtrace trace` (guest clock, as
#    hv-getpid-loop prints it) and the added cost per traced call;
#  - VM exits per trap and the trap handler's host time (`trace --report`).
# Best of the rounds; rounds interleave the kinds so a noisy machine's
# drift hits both alike. The lane's figures exclude L1's own start (~5 s):
# they are read from hvtrace's report and the guest's clock.
#
# Usage: benches/kvm-kinds-figures.sh [KERNEL] [calls] [rounds]
#   KERNEL: minimal (default), debian-6.1 or debian-6.12 (a Debian cold
#   boot takes most of an hour on PVM KVM).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kernel=${1:-minimal}
n=${2:-2000}
rounds=${3:-2}
cargo build --release -q -p hvtrace
hvtrace=$root/target/release/hvtrace

declare -A best
keep() { # key value: the smallest value seen
    [ -n "$2" ] || return 0
    if [ -z "${best[$1]:-}" ] || awk -v a="$2" -v b="${best[$1]}" 'BEGIN { exit !(a < b) }'; then
        best[$1]=$2
    fi
}
ns_per_call() { sed -n 's/.* \([0-9]*\) ns per call/\1/p' | tail -1; }
field() { # name, stderr text holding an hvtrace-report line
    grep '^hvtrace-report ' <<<"$2" | tail -1 | sed 's/^hvtrace-report //' |
        python3 -c "import json,sys; v=json.load(sys.stdin).get('$1'); print('' if v is None else v)"
}
runner() { # kind: the command that runs hvtrace on it
    case $1 in
    pvm) echo "$hvtrace" ;;
    svm) echo "$root/scripts/hw-kvm.sh" ;;
    esac
}

measure_boot() { # kind
    local err
    err=$($(runner "$1") run --kernel "$kernel" --no-cache --report -- true 2>&1 >/dev/null) ||
        { echo "$1: cold boot failed: $(tail -n 5 <<<"$err")" >&2; exit 1; }
    keep "$1.boot_s" "$(awk -v ms="$(field elapsed_ms "$err")" 'BEGIN { printf "%.1f", ms / 1000 }')"
}

measure_qemu_boot() {
    local dir k i start
    dir=$(mktemp -d)
    case $kernel in
    minimal) k=$(kernel-config/build.sh 2>/dev/null)/bzImage ;;
    debian-6.1) k=$(kernel-config/debian.sh 6.1 2>/dev/null) ;;
    debian-6.12) k=$(kernel-config/debian.sh 6.12 2>/dev/null) ;;
    esac
    i=$(images/build.sh 2>/dev/null)
    start=$(date +%s.%N)
    qemu-system-x86_64 -accel tcg -m 256 -nodefaults -display none -no-reboot \
        -kernel "$k" -initrd "$i" -append "console=ttyS0 panic=-1" \
        -serial "file:$dir/console" -serial "file:$dir/control" \
        -serial null -serial null </dev/null >/dev/null 2>&1 &
    local pid=$!
    until grep -q HVTRACE-READY "$dir/control" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { echo "QEMU ended before init was ready" >&2; exit 1; }
        sleep 0.2
    done
    keep "tcg.boot_s" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}

measure_getpid() { # kind
    local run out err
    run=$(runner "$1")
    keep "$1.plain" "$($run run --kernel "$kernel" -- hv-getpid-loop "$n" 2>/dev/null | ns_per_call)"
    err=$(mktemp)
    out=$($run trace --kernel "$kernel" --report -o /dev/null -- hv-getpid-loop "$n" 2>"$err")
    keep "$1.traced" "$(ns_per_call <<<"$out")"
    keep "$1.exits_per_trap" "$(printf '%.3f' "$(field vm_exits_per_trap "$(cat "$err")")")"
    keep "$1.handler_us" "$(printf '%.2f' "$(field handler_us_per_trap "$(cat "$err")")")"
    rm -f "$err"
}

for round in $(seq "$rounds"); do
    echo "round $round" >&2
    measure_boot pvm
    measure_boot svm
    measure_qemu_boot
    measure_getpid pvm
    measure_getpid svm
done

show() { echo "${best[$1]:-n/a}"; }
added() { # kind: added microseconds per traced call
    awk -v p="${best[$1.plain]}" -v t="${best[$1.traced]}" 'BEGIN { printf "%.1f", (t - p) / 1000 }'
}
echo "kernel $kernel; best of $rounds rounds; $n getpid calls per run (guest clock)"
printf '%-40s %14s %14s %14s\n' figure "PVM KVM" "SVM (nested)" "QEMU TCG"
printf '%-40s %14s %14s %14s\n' "cold boot to init's first request (s)" "$(show pvm.boot_s)" "$(show svm.boot_s)" "$(show tcg.boot_s)"
printf '%-40s %14s %14s %14s\n' "getpid untraced (ns/call)" "$(show pvm.plain)" "$(show svm.plain)" -
printf '%-40s %14s %14s %14s\n' "getpid traced (ns/call)" "$(show pvm.traced)" "$(show svm.traced)" -
printf '%-40s %14s %14s %14s\n' "added per traced getpid (us)" "$(added pvm)" "$(added svm)" -
printf '%-40s %14s %14s %14s\n' "VM exits per trap" "$(show pvm.exits_per_trap)" "$(show svm.exits_per_trap)" -
printf '%-40s %14s %14s %14s\n' "trap handler host time per trap (us)" "$(show pvm.handler_us)" "$(show svm.handler_us)" -
