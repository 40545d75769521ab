#!/usr/bin/env bash
# Figures for `hvtrace gdbserver`, side by side in one run with the same gdb
# script debugging the same static binary natively on the host (ptrace):
#   connect  `target remote` until gdb's prompt (symbols read through vFile)
#   next     `next` over a line that calls a function (scale())
#   stepi    one `stepi`, averaged over N
# Best of ROUNDS rounds. The native column is a reference point, not the
# in-guest gdbserver the issue names (the guest has no byte stream for gdb
# to reach one: docs/limitations.md).
#
# Usage: benches/gdb-figures.sh [ROUNDS] [STEPS]   (defaults 3, 50)
set -euo pipefail
rounds=${1:-3}
steps=${2:-50}
root=$(cd "$(dirname "$0")/.." && pwd)
hv="$root/target/release/hvtrace"
[ -x "$hv" ] || cargo build --release -p hvtrace --manifest-path "$root/Cargo.toml" >&2
image=$("$root/images/build.sh" 2>/dev/null)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && cpio -i --quiet --to-stdout usr/bin/hv-gdb-demo <"$image" >demo && chmod +x demo)
# The cached snapshot, before anything is timed.
"$hv" run -- true >/dev/null 2>&1

# The timed part of the script, after the session's start ($1).
script() {
    cat <<EOF
set pagination off
set confirm off
set remotetimeout 30
python import time
python t = time.monotonic()
$1
python print("connect_ms %.1f" % ((time.monotonic() - t) * 1e3))
break accumulate
continue
python t = time.monotonic(); gdb.execute("next", to_string=True); print("next_ms %.2f" % ((time.monotonic() - t) * 1e3))
python t = time.monotonic(); [gdb.execute("stepi", to_string=True) for _ in range($steps)]; print("stepi_ms %.3f" % ((time.monotonic() - t) * 1e3 / $steps))
kill
EOF
}

best() { sort -n | head -1; }
for r in $(seq "$rounds"); do
    sock="$tmp/g$r.sock"
    "$hv" gdbserver --listen "$sock" -- /usr/bin/hv-gdb-demo >/dev/null 2>"$tmp/server$r.err" &
    server=$!
    for _ in $(seq 600); do grep -q '^Listening' "$tmp/server$r.err" 2>/dev/null && break; sleep 0.1; done
    script "target remote $sock" >"$tmp/remote.gdb"
    (cd "$root/images" && gdb -nx -batch -x "$tmp/remote.gdb") >"$tmp/remote$r.out" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    script "starti" >"$tmp/native.gdb"
    (cd "$root/images" && gdb -nx -batch -x "$tmp/native.gdb" "$tmp/demo") >"$tmp/native$r.out" 2>/dev/null || true
done
printf '%-10s %12s %12s %8s\n' figure hvtrace native ratio
for f in connect_ms next_ms stepi_ms; do
    h=$(cat "$tmp"/remote*.out | sed -n "s/^$f //p" | best)
    n=$(cat "$tmp"/native*.out | sed -n "s/^$f //p" | best)
    ratio=$(awk -v h="$h" -v n="$n" 'BEGIN { if (n > 0) printf "%.1fx", h / n; else print "-" }')
    printf '%-10s %12s %12s %8s\n' "$f" "${h:--}" "${n:--}" "$ratio"
done
echo "(best of $rounds rounds; stepi averaged over $steps; native: gdb with ptrace on the host, starti for connect)"
