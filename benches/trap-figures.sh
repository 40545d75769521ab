#!/usr/bin/env bash
# Prints what one traced system call costs on the trap path, for this
# checkout and, side by side in the same run, for a baseline build:
#  - the guest's own time per getpid (CLOCK_MONOTONIC in the guest, as
#    hv-getpid-loop prints it), untraced and traced by `hvtrace trace`,
#    and the added cost per traced call;
#  - traps taken per traced call, VM exits per trap and the trap
#    handler's host time per trap (from `hvtrace trace --report`).
# Runs are interleaved (baseline, current, baseline, ...) so that drift of
# a noisy machine hits both alike; the best of the rounds is kept.
#
# Usage: benches/trap-figures.sh [--baseline PATH-TO-HVTRACE] [calls] [rounds]
# A baseline without `trace --report` shows "n/a" for the trap figures.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
baseline=
if [ "${1:-}" = --baseline ]; then baseline=$2; shift 2; fi
n=${1:-3000}
rounds=${2:-3}
cargo build --release -q -p hvtrace
current=target/release/hvtrace
"$current" run -- true >/dev/null 2>&1   # make sure the snapshot is cached

declare -A best
keep() { # key value: the smallest value seen
    if [ -z "${best[$1]:-}" ] || awk -v a="$2" -v b="${best[$1]}" 'BEGIN { exit !(a < b) }'; then
        best[$1]=$2
    fi
}
ns_per_call() { sed -n 's/.* \([0-9]*\) ns per call/\1/p' | tail -1; }
field() { # name, report line
    sed -n 's/^hvtrace-report //p' <<<"$2" | python3 -c "import json,sys; v=json.load(sys.stdin).get('$1'); print('' if v is None else v)"
}

measure() { # label, binary
    local label=$1 bin=$2 out err v
    v=$("$bin" run -- hv-getpid-loop "$n" 2>/dev/null | ns_per_call)
    [ -n "$v" ] || { echo "no figure from $bin run" >&2; exit 1; }
    keep "$label.plain" "$v"
    err=$(mktemp)
    if out=$("$bin" trace --report -o /dev/null -- hv-getpid-loop "$n" 2>"$err"); then
        local report; report=$(grep '^hvtrace-report ' "$err" || true)
        keep "$label.traced" "$(ns_per_call <<<"$out")"
        if [ -n "$report" ]; then
            local traps exits handler
            traps=$(field tracer_traps "$report")
            exits=$(field vm_exits_per_trap "$report")
            handler=$(field handler_us_per_trap "$report")
            keep "$label.traps_per_call" "$(awk -v t="$traps" -v n="$n" 'BEGIN { printf "%.3f", t / n }')"
            keep "$label.exits_per_trap" "$(printf '%.3f' "$exits")"
            keep "$label.handler_us" "$(printf '%.2f' "$handler")"
        fi
    else
        # A build without `trace --report`: the time figures only.
        out=$("$bin" trace -o /dev/null -- hv-getpid-loop "$n" 2>/dev/null)
        keep "$label.traced" "$(ns_per_call <<<"$out")"
    fi
    rm -f "$err"
    echo "  $label: untraced ${best[$label.plain]} ns, traced ${best[$label.traced]} ns" >&2
}

for _ in $(seq "$rounds"); do
    [ -n "$baseline" ] && measure baseline "$baseline"
    measure current "$current"
done

show() { local v=${best[$1]:-}; echo "${v:-n/a}"; }
added() { # label: added microseconds per traced call
    local p=${best[$1.plain]} t=${best[$1.traced]}
    awk -v p="$p" -v t="$t" 'BEGIN { printf "%.1f", (t - p) / 1000 }'
}
echo "best of $rounds rounds; $n getpid calls per run (guest clock)"
labels=(current)
[ -n "$baseline" ] && labels=(baseline current)
printf '%-36s' figure; for l in "${labels[@]}"; do printf ' %12s' "$l"; done; echo
row() { # title, key suffix or function
    printf '%-36s' "$1"
    for l in "${labels[@]}"; do
        if [ "$2" = added ]; then printf ' %12s' "$(added "$l")"; else printf ' %12s' "$(show "$l.$2")"; fi
    done
    echo
}
row "getpid untraced (ns/call)" plain
row "getpid traced (ns/call)" traced
row "added per traced getpid (us)" added
row "traps per traced getpid" traps_per_call
row "VM exits per trap" exits_per_trap
row "handler host time per trap (us)" handler_us
