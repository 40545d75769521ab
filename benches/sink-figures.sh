#!/usr/bin/env bash
# Prints what publishing a trace to NATS JetStream (`--sink`) costs, with
# a nats-server -js of its own on a free loopback port (store in a
# temporary directory, removed at the end):
#  - events per second of one traced VM running hv-getpid-loop N (one
#    event per call), without and with the sink, in alternating runs of
#    the same restored guest, each run's rate from the program's own
#    clock (its "ns per call" line). With the sink twice: the server as it
#    comes, and the server at nice 10, standing in for a server on another
#    machine (on this 2-core machine nats-server's own CPU time, ~50 us
#    per message, otherwise comes out of the vCPU's share);
#  - the cost the sink adds per event (median with-sink minus median
#    without), and that as a share of the traced call's cost (goal: under
#    5%); end to end this includes nats-server and the sink's threads
#    competing with the vCPU for the machine's cores, so the tracer's own
#    handler time per trap (the report's handler_us_per_trap, which covers
#    the engine handing the record to the sink on the vCPU thread) is shown
#    too, with and without the sink;
#  - that every event was acknowledged (the report's sink_published);
#  - spill and replay: the server stopped for the whole loop (events go
#    to the spill file), then started again; how fast the spilled events
#    are replayed into the stream (from the restart to hvtrace's exit,
#    which waits for the last acknowledgment).
# Figures only: nothing here passes or fails.
#
# Usage: benches/sink-figures.sh [rounds] [calls]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
rounds=${1:-3}
calls=${2:-20000}
scripts/setup.sh
cargo build --release -q -p hvtrace
exec python3 - "$rounds" "$calls" <<'PY'
import json, os, re, shutil, socket, statistics, subprocess, sys, tempfile, time

rounds, calls = int(sys.argv[1]), int(sys.argv[2])
hv = os.path.abspath("target/release/hvtrace")
tmp = tempfile.mkdtemp(prefix="hvtrace-sink-figures-")
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
url = f"nats://127.0.0.1:{port}"
s = socket.socket(); s.bind(("127.0.0.1", 0)); port2 = s.getsockname()[1]; s.close()
url2 = f"nats://127.0.0.1:{port2}"
server, server2 = None, None

def start_server(p=None, nice=0, store="store"):
    p = p or port
    log = open(os.path.join(tmp, f"server-{p}.log"), "a")
    proc = subprocess.Popen(["nice", "-n", str(nice), "nats-server", "-js", "-a", "127.0.0.1",
                             "-p", str(p), "-sd", os.path.join(tmp, store)],
                            stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(600):
        with socket.socket() as c:
            if c.connect_ex(("127.0.0.1", p)) == 0:
                return proc
        time.sleep(0.05)
    sys.exit("nats-server did not start")

def stop(proc):
    proc.terminate(); proc.wait()

def report(err):
    for l in err.splitlines():
        if l.startswith("hvtrace-report "):
            return json.loads(l[len("hvtrace-report "):])
    sys.exit(f"no report:\n{err}")

def traced(sink, vm):
    args = [hv, "trace", "-o", "/dev/null", "--report"]
    if sink:
        args += ["--sink", sink, "--vm-id", vm]
    out = subprocess.run(args + ["--", "hv-getpid-loop", str(calls)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"hvtrace trace failed:\n{out.stderr}")
    ns = int(re.search(r"(\d+) ns per call", out.stdout).group(1))
    return ns, report(out.stderr)

try:
    server = start_server()
    server2 = start_server(port2, nice=10, store="store2")
    traced(url, "warm-up")  # restores the cached snapshot, creates the streams
    traced(url2, "warm-up")
    runs = {"none": [], "sink": [], "sink2": []}
    handler = {"none": [], "sink": [], "sink2": []}
    published = []
    for i in range(rounds):
        for key, sink in (("none", None), ("sink", url), ("sink2", url2)):
            ns, r = traced(sink, f"bench-{i}")
            runs[key].append(ns)
            handler[key].append(r["handler_us_per_trap"])
            if sink:
                published.append((r["sink_published"], r["sink_dropped"], r["sink_resent"]))
    a = statistics.median(runs["none"])
    print(f"sink figures: hv-getpid-loop {calls}, {rounds} rounds of alternating runs (median; all runs)")
    for key, what in (("none", "no sink"), ("sink", "--sink, server at nice 0"),
                      ("sink2", "--sink, server at nice 10")):
        b = statistics.median(runs[key])
        extra = "" if key == "none" else f"   added {(b - a) / 1e3:+7.2f} us/event = {100 * (b - a) / a:+5.1f}%"
        print(f"  {what:<26} {b/1e3:7.1f} us/call = {1e9/b:6.0f} events/s{extra}   "
              f"{[round(x/1e3, 1) for x in runs[key]]}")
    ha = statistics.median(handler["none"])
    hb = statistics.median(handler["sink"] + handler["sink2"])
    print(f"  tracer handler per trap (vCPU thread): {ha:.2f} us without, {hb:.2f} us with the sink "
          f"({hb - ha:+.2f} us per trap, 2 traps per call: {100 * 2 * (hb - ha) * 1e3 / a:+.2f}% of the call)")
    print(f"  acknowledged per sink run (published, dropped, resent): {published}")
    stop(server2); server2 = None

    # Spill and replay: the server away for the whole loop.
    trace = os.path.join(tmp, "spill.txt")
    p = subprocess.Popen([hv, "trace", "-o", trace, "--report",
                          "--sink", f"{url}?queue=64&linger=600", "--vm-id", "spill",
                          "--", "hv-getpid-loop", str(calls)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (os.path.exists(trace) and open(trace).read().count("getpid()") >= 10):
        time.sleep(0.05)
    stop(server); server = None
    t_stop = time.monotonic()
    while open(trace).read().count("+++ exited") == 0:
        time.sleep(0.1)
    t_loop_end = time.monotonic()
    server = start_server()
    t_restart = time.monotonic()
    out, err = p.communicate()
    t_exit = time.monotonic()
    r = report(err)
    spilled = r["sink_spilled"]
    print(f"  spill: {spilled} events written to the spill file in {t_loop_end - t_stop:.1f} s of outage "
          f"({spilled / (t_loop_end - t_stop):.0f} events/s, the traced loop's own rate)")
    print(f"  replay: {r['sink_published']} events acknowledged {t_exit - t_restart:.2f} s after the restart "
          f"= {r['sink_published'] / (t_exit - t_restart):.0f} events/s (includes reconnecting; "
          f"resent {r['sink_resent']}, dropped {r['sink_dropped']}, undelivered {r['sink_undelivered']})")
finally:
    for proc in (server, server2):
        if proc and proc.poll() is None:
            stop(proc)
    shutil.rmtree(tmp, ignore_errors=True)
PY
