#!/usr/bin/env bash
# Prints how fast a guest command's output reaches the host, side by side
# in one run, best of several rounds (times are the guest's own, from
# /proc/uptime around each step; byte counts are checked on the host):
#  - through the output window (the command's stdout as hvtrace gives it:
#    a FIFO the guest image's relay moves into the window, one exit per
#    64 KiB), against the UART it replaced (the same command writing to
#    /dev/ttyS2: one exit per byte, a guest interrupt per 16);
#  - bulk bytes (dd from /dev/zero; the cost of making the zeros in the
#    guest kernel, measured alone, is given too) and lines (seq);
#  - on PVM KVM, with the guest kernel's user copies (`rep movsb`, one
#    emulator pass per byte) left to the guest (HVTRACE_PVM_GUEST_COPIES=1,
#    as before 2026-12-05) and performed by the VMM (what hvtrace does,
#    vmm/src/trap/pvm_copy.rs); both on the same cached snapshot.
# Usage: benches/output-figures.sh [MiB] [UART KiB] [seq lines] [rounds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=target/release/hvtrace
mib=${1:-2}
kib=${2:-16}
lines=${3:-3000}
rounds=${4:-3}

# One guest command; each step prints "label uptime" on stderr.
probe="t() { read u _ </proc/uptime; echo \"\$1 \$u\" >&2; }
t start
dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null >/dev/null; t zero_null
dd if=/dev/zero bs=65536 count=$((mib * 16)) 2>/dev/null; t zero_window
dd if=/dev/zero bs=1024 count=$kib 2>/dev/null >/dev/ttyS2; t zero_uart
seq $lines; t seq_window
seq $lines >/dev/ttyS2; t seq_uart"
seq_bytes=$(seq "$lines" | wc -c)
want_bytes=$((mib * 1048576 + kib * 1024 + 2 * seq_bytes))

declare -A best
round() { # variant, env...
    local variant=$1; shift
    local out err
    out=$(mktemp) err=$(mktemp)
    env "$@" "$hv" run -- /bin/sh -c "$probe" >"$out" 2>"$err" || {
        cat "$err" >&2
        exit 1
    }
    local got; got=$(wc -c <"$out")
    [ "$got" -eq "$want_bytes" ] || { echo "$variant: $got bytes reached the host, $want_bytes written" >&2; exit 1; }
    local prev="" label u
    while read -r label u; do
        case $label in start | zero_* | seq_*) ;; *) continue ;; esac
        if [ -n "$prev" ]; then
            local ms; ms=$(awk -v a="$prev" -v b="$u" 'BEGIN { printf "%d", (b - a) * 1000 }')
            local k="$variant/$label"
            if [ -z "${best[$k]:-}" ] || [ "$ms" -lt "${best[$k]}" ]; then best[$k]=$ms; fi
        fi
        prev=$u
    done < <(grep -E '^(start|zero_|seq_)' "$err")
    rm -f "$out" "$err"
}

for r in $(seq "$rounds"); do
    echo "round $r" >&2
    round guest HVTRACE_PVM_GUEST_COPIES=1
    round vmm HVTRACE_PVM_GUEST_COPIES=0
done

rate() { # bytes, ms -> KB/s (1000 bytes)
    awk -v b="$1" -v ms="$2" 'BEGIN { if (ms <= 0) print "-"; else printf "%.1f", b / ms }'
}
echo "best of $rounds rounds; guest clock (/proc/uptime, 10 ms); bulk ${mib} MiB (UART ${kib} KiB), seq $lines ($seq_bytes bytes)"
printf '%-44s %12s %12s\n' "path (user copies by the guest | the VMM)" "guest" "VMM"
row() { # label, key, bytes
    local h=${best[guest/$2]} k=${best[vmm/$2]}
    printf '%-44s %9s ms %9s ms   (%s | %s KB/s)\n' "$1" "$h" "$k" "$(rate "$3" "$h")" "$(rate "$3" "$k")"
}
row "dd 64 KiB blocks from /dev/zero to /dev/null" zero_null $((mib * 1048576))
row "the same to stdout (output window)" zero_window $((mib * 1048576))
row "dd 1 KiB blocks to /dev/ttyS2 (UART)" zero_uart $((kib * 1024))
row "seq to stdout (output window)" seq_window "$seq_bytes"
row "seq to /dev/ttyS2 (UART)" seq_uart "$seq_bytes"
w=${best[vmm/zero_window]} u=${best[vmm/zero_uart]} g=${best[guest/zero_window]}
awk -v wb=$((mib * 1048576)) -v w="$w" -v g="$g" -v ub=$((kib * 1024)) -v u="$u" \
    'BEGIN { printf "bulk output through the window, copies by the VMM / by the guest: %.1fx bytes per second; window / UART: %.0fx\n", g / w, (wb / w) / (ub / u) }'
