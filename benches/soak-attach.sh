#!/usr/bin/env bash
# Soak: N cycles (default 1000) of `hvtrace attach` + detach on a guest
# process that forks and execs in a loop, while the guest's own `strace -f`
# traces another such process and a second in-guest strace records the
# attached process itself (the oracle). Prints figures and exits non-zero
# on any failure:
#  - no hang: every attach returns (each cycle is bounded by `timeout`);
#  - no guest oops (hvtrace run would end with status 123) and the
#    command's own exit status is 0;
#  - no event lost: every call hvtrace reports in a window, in order, is a
#    contiguous run of the calls the in-guest strace logged for the process
#    (compared by name and return value);
#  - the kernel text hash is the same before the first attach and after
#    the last detach, with no trap left.
# Usage: benches/soak-attach.sh [cycles] [window-seconds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release -q -p hvtrace
hv=$root/target/release/hvtrace
cycles=${1:-1000}
window=${2:-0.4}
work=$(mktemp -d)
# Kept on failure, for a look at the windows and the attach clients' errors.
trap 'if [ "${ok:-0}" = 1 ]; then rm -rf "$work"; else echo "soak: files kept in $work" >&2; fi' EXIT
sock=$work/vm.sock

# One fork+exec iteration takes ~1.5-2 s of emulated kernel time here; the
# attached process runs long enough for every cycle, then prints the log.
iters=$(python3 -c "import math; print(math.ceil($cycles * ($window + 0.2) / 1.5) + 10)")
# The other in-guest strace follows a shell's fork/exec loop: a different
# comm, so the attached process is found without doubt.
script="strace -f -o /tmp/other.txt /bin/sh -c 'while :; do /bin/true; done' >/dev/null 2>&1 &
strace -o /tmp/target.txt hv-forkexec-loop $iters >/dev/null
echo target-exit=\$?
gzip -c /tmp/target.txt | base64"
"$hv" run -- true >/dev/null 2>&1   # the cached snapshot
"$hv" run --api-sock "$sock" -- /bin/sh -c "$script" >"$work/guest.out" 2>"$work/guest.err" &
vm=$!

call() { # op json -> reply json
    python3 - "$sock" "$1" <<'EOF'
import socket, sys, json
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((json.dumps(dict(v=1, **json.loads(sys.argv[2]))) + "\n").encode())
f = s.makefile()
for line in f:
    v = json.loads(line)
    if "event" not in v:
        print(json.dumps(v)); break
EOF
}

pid=""
for _ in $(seq 600); do
    [ -S "$sock" ] && pid=$(call '{"op":"ps"}' 2>/dev/null | python3 -c '
import json, sys
ts = json.load(sys.stdin).get("tasks", [])
for t in ts:
    if t["comm"] == "hv-forkexec-loo" and t["tid"] == t["pid"]:
        print(t["pid"])' 2>/dev/null | tail -1 || true)
    [ -n "$pid" ] && break
    sleep 1
done
[ -n "$pid" ] || { echo "soak: the target process never showed up" >&2; cat "$work/guest.err" >&2; exit 1; }
hash0=$(call '{"op":"text_hash"}')

t0=$(date +%s.%N)
hung=0
for i in $(seq "$cycles"); do
    # SIGINT detaches like Ctrl-C; KILL after 20 s more counts as a hang.
    rc=0
    c0=$(date +%s%N)
    timeout -s INT -k 20 "$window" "$hv" attach --api-sock "$sock" -p "$pid" --json \
        -o "$work/win-$i.json" 2>>"$work/attach.err" || rc=$?
    [ $rc -eq 137 ] && hung=$((hung + 1))
    echo "$i $rc $(( ($(date +%s%N) - c0) / 1000000 ))" >>"$work/cycles.txt"
    # A killed client (every tenth cycle): no detach, only a closed socket.
    if [ $((i % 10)) -eq 0 ]; then
        (timeout -s KILL "$window" "$hv" attach --api-sock "$sock" -p "$pid" --json >/dev/null 2>&1 || true) 2>/dev/null
    fi
done
t1=$(date +%s.%N)
sleep 2   # the VM notices the last closed client
hash1=$(call '{"op":"text_hash"}')
wait $vm || { echo "soak: hvtrace run failed (status $?)" >&2; tail -30 "$work/guest.err" >&2; exit 1; }

python3 - "$work" "$cycles" "$hash0" "$hash1" "$hung" "$t0" "$t1" <<'EOF'
import json, os, re, sys
work, cycles, hash0, hash1, hung, t0, t1 = sys.argv[1:]
cycles, hung = int(cycles), int(hung)
h0, h1 = json.loads(hash0), json.loads(hash1)
import base64, gzip
raw = open(os.path.join(work, "guest.out")).read().splitlines()
assert raw and raw[0] == "target-exit=0", raw[:3]
# The in-guest strace log comes gzipped and base64-encoded (the guest's
# serial output is slow).
out = [raw[0]] + gzip.decompress(base64.b64decode("".join(raw[1:]))).decode().splitlines()
# The in-guest strace's calls of the target: (name, return value).
call = re.compile(r"^(?:<\.\.\. )?([a-z0-9_]+)(?:\(| resumed>).*\) += (-?\w+|\?)")
oracle = []
for line in out[1:]:
    m = call.match(line)
    if m and "<unfinished" not in line:
        oracle.append((m.group(1), m.group(2)))
def window(i):
    path = os.path.join(work, f"win-{i}.json")
    calls = []
    if not os.path.exists(path):
        return calls
    for line in open(path):
        try:
            e = json.loads(line)
        except ValueError:
            continue
        e = e.get("event", e)
        m = call.match(e.get("line", "")) if isinstance(e, dict) and "syscall" in e else None
        if m:
            calls.append((m.group(1), m.group(2)))
    return calls
def contiguous(part, whole):
    n = len(part)
    return n == 0 or any(whole[i:i + n] == part for i in range(len(whole) - n + 1))
events = lost = 0
for i in range(1, cycles + 1):
    w = window(i)
    events += len(w)
    if not contiguous(w, oracle):
        lost += 1
        if lost <= 3:
            print(f"window {i} is not a run of the guest strace's calls: {w[:8]}", file=sys.stderr)
secs = float(t1) - float(t0)
print(f"cycles                      {cycles}")
print(f"soak time                   {secs:.0f} s ({secs / cycles * 1000:.0f} ms per cycle)")
print(f"events seen by hvtrace      {events} (in-guest strace of the target: {len(oracle)} calls)")
print(f"windows with a lost event   {lost}")
print(f"hung attaches               {hung}")
print(f"kernel text hash            {'unchanged' if h0['sha256'] == h1['sha256'] else 'CHANGED'}; traps after: {h1['traps']}")
ok = lost == 0 and hung == 0 and h0["sha256"] == h1["sha256"] and h1["traps"] == h0["traps"]
print("soak", "passed" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
ok=1
