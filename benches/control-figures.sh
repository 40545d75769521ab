#!/usr/bin/env bash
# Prints what utrace's control half costs and how fast it acts, on one
# restored guest (1 vCPU) running hv-counters (two threads counting in user
# mode, a main thread printing their counts every 200 ms from nanosleep)
# and hv-sleeper (asleep in nanosleep):
#  - STOP latency: `hvtrace stop` to the thread parked, for a thread running
#    in user mode (the worker) and for one blocked in a call that returns
#    within 200 ms (hv-counters' main thread);
#  - RESUME latency: `hvtrace cont` to the thread out of its sleep;
#  - INTERRUPT latency: `hvtrace interrupt` of hv-sleeper to its report;
#  - the cost of a held thread to the rest of the guest: hv-counters'
#    counting rate while hv-sleeper is held stopped (`stop --interrupt`:
#    parked in the kernel, woken once a second by its backstop), side by
#    side with the rate while it just sleeps in nanosleep, in interleaved
#    windows of the same run (goal: no measurable difference).
# Each latency is printed as min / median / max over the rounds.
#
# Usage: benches/control-figures.sh [rounds] [window-seconds]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-10}
window=${2:-3}
cargo build --release -q -p hvtrace
exec python3 - "$rounds" "$window" <<'PY'
import json, os, statistics, subprocess, sys, tempfile, threading, time

rounds, window = int(sys.argv[1]), float(sys.argv[2])
hv = os.path.abspath("target/release/hvtrace")
sock = os.path.join(tempfile.mkdtemp(), "api.sock")
vm = subprocess.Popen(
    [hv, "run", "--api-sock", sock, "--", "/bin/sh", "-c",
     "hv-counters 3600 & hv-sleeper 3600 & wait"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
lines, lock = [], threading.Lock()
def reader():
    for l in vm.stdout:
        with lock:
            lines.append((time.monotonic(), l.strip()))
threading.Thread(target=reader, daemon=True).start()

def wait_line(prefix, limit=300):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with lock:
            for _, l in lines:
                if l.startswith(prefix):
                    return l
        time.sleep(0.05)
    sys.exit(f"no line starting {prefix!r}")

def ctl(*args):
    out = subprocess.run([hv, *args, "--api-sock", sock, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"hvtrace {' '.join(args)}: {out.stdout}{out.stderr}")
    return json.loads(out.stdout)

try:
    w = wait_line("hv-counters:").split()
    pid, worker = w[2], w[4]
    sleeper = wait_line("hv-sleeper: pid").split()[2].rstrip(",")
    time.sleep(1)
    stop_run, stop_blocked, stop_intr, cont, intr = [], [], [], [], []
    for _ in range(rounds):
        stop_intr.append(ctl("stop", "--interrupt", "-p", sleeper)["ms"])
        cont.append(ctl("cont", "-p", sleeper)["ms"])
        stop_run.append(ctl("stop", "-t", worker)["ms"])
        cont.append(ctl("cont", "-t", worker)["ms"])
        stop_blocked.append(ctl("stop", "-t", pid)["ms"])
        cont.append(ctl("cont", "-t", pid)["ms"])
        intr.append(ctl("interrupt", "-p", sleeper)["reported"][0][1])

    def rate(seconds):
        """hv-counters' counts per ms over the next `seconds`."""
        start = time.monotonic()
        time.sleep(seconds)
        with lock:
            ticks = [l.split() for t, l in lines if t >= start and l.startswith("tick ")]
        if len(ticks) < 2:
            sys.exit("no ticks")
        total = lambda t: int(t[5]) + int(t[7])
        return (total(ticks[-1]) - total(ticks[0])) / (int(ticks[-1][3]) - int(ticks[0][3]))
    free, held = [], []
    for _ in range(3):
        free.append(rate(window))
        ctl("stop", "--interrupt", "-p", sleeper)
        held.append(rate(window))
        ctl("cont", "-p", sleeper)
    def show(name, xs):
        print(f"{name:<48} {min(xs):8.2f} / {statistics.median(xs):8.2f} / {max(xs):8.2f} ms")
    print(f"control figures, {rounds} rounds (min / median / max)")
    show("stop, thread running in user mode", stop_run)
    show("stop, thread in nanosleep (<= 200 ms left)", stop_blocked)
    show("stop --interrupt, thread in nanosleep(3600 s)", stop_intr)
    show("cont, until the thread left its sleep", cont)
    show("interrupt of nanosleep, until its report", intr)
    f, h = statistics.median(free), statistics.median(held)
    print(f"counting rate, nothing held (counts/ms, median of 3 windows of {window:g} s): {f:.0f}")
    print(f"counting rate, another process held stopped:                       {h:.0f}")
    print(f"ratio held/free: {h / f:.3f} (windows: free {[round(x) for x in free]}, held {[round(x) for x in held]})")
finally:
    try:
        import socket
        s = socket.socket(socket.AF_UNIX); s.connect(sock)
        s.sendall(b'{"v":1,"op":"shutdown"}\n'); s.recv(100)
    except OSError:
        pass
    vm.wait(timeout=60)
PY
