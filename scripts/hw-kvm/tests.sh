#!/usr/bin/env bash
# The hardware-KVM lane of scripts/test.sh: runs the guest integration tests
# that matter on real SVM KVM (scripts/hw-kvm.sh), the Debian-kernel tests
# (#[ignore]d on PVM KVM, where a Debian cold boot takes most of an hour)
# included.
#
#   scripts/hw-kvm/tests.sh [--full] [TEST-BINARY...] [-- TEST-ARGS...]
#
# With binary names, only those of the plan below run; TEST-ARGS go to
# every test binary.
#
# Each test binary runs in an L1 of its own, one test at a time; QEMU
# oracles inside L1 use KVM (HVTRACE_QEMU_ACCEL=kvm: TCG inside TCG is
# far too slow). Exits non-zero if any binary failed or could not run.
#
# Time budget: with HVTRACE_LANE_DEADLINE (seconds since the epoch; set by
# scripts/test.sh so that a CI run ends within its limit), every step runs
# under `timeout` for what is left; a step cut off, or not started because
# nothing is left, fails the lane and says so. Progress lines also go to
# file descriptor 3 when it is open (scripts/test.sh shows them live).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
. scripts/lib.sh

lane_t0=$(date +%s)
# say MESSAGE: a progress line, on stderr and, live, on fd 3.
say() {
    hv_log "hardware-KVM lane: $*"
    if { true >&3; } 2>/dev/null; then
        hv_log "[lane +$(( $(date +%s) - lane_t0 ))s] $*" 2>&3
    fi
}
# bounded WHAT CMD...: runs CMD within what is left of the time budget.
bounded() {
    local what=$1 status=0 left
    shift
    if [ -z "${HVTRACE_LANE_DEADLINE:-}" ]; then
        "$@" || status=$?
        return $status
    fi
    left=$(( HVTRACE_LANE_DEADLINE - $(date +%s) ))
    if [ $left -le 0 ]; then
        say "$what NOT RUN: the lane's time budget (HVTRACE_LANE_DEADLINE) is spent"
        return 124
    fi
    # hw-kvm.sh stops its QEMU on SIGTERM; KILL a minute later if not.
    timeout --kill-after=60 "$left" "$@" || status=$?
    [ $status -ne 124 ] || say "$what CUT OFF after ${left} s: the lane's time budget is spent"
    return $status
}

# What runs in the lane: each line is a test binary and the libtest name
# filters (substrings) of its tests to run there. In this lane every guest
# program runs under QEMU's TCG twice over: a test takes minutes (the
# Debian strace oracle about 13), so CI runs a plan that fits beside the
# PVM lane, and --full runs every Debian-kernel test (over an hour).
#
# CI: on Debian's kernels the strace oracle (6.1), ps against /proc (6.1
# and 6.12 with two vCPUs), two vCPUs seen and used (6.1 and 6.12) and ACPI
# power-off (6.1), REPORT
# (6.1), engines, attach/detach with a killed client (6.1), and QEMU-output
# equality (6.1, 6.12 and the minimal kernel). The minimal kernel's other
# tests run in the PVM lane.
ci_plan="
introspect debian_
smp debian_
boot_matches_qemu debian_ minimal_kernel_output_matches_qemu
report debian_6_1_
engines debian_
attach debian_
tracing debian_6_1_
"
# --full: every Debian-kernel test, STOP/INTERRUPT, signals, stepping and
# gdb among them.
full_plan="
tracing debian_
introspect debian_
smp debian_
boot_matches_qemu debian_ minimal_kernel_output_matches_qemu
report debian_
engines debian_
attach debian_
signal_vote debian_
control debian_
steps debian_
gdbserver debian_
"
plan=$ci_plan
if [ "${1:-}" = "--full" ]; then plan=$full_plan; shift; fi
only=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do only+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift

# name -> executable, from cargo's own build messages (builds if needed).
executables=$(cargo test --release -p hvtrace-tests --no-run --message-format=json 2>/dev/null |
    /usr/bin/python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])')

failed=()
# The lane's guests are booted (or restored) once before any test, each
# timed: a cold boot inside a test would count against its own timeouts.
# A cold boot that fails is tried once more, saying so: in this nested
# setting a guest kernel's int3 self-test (an int3 the VMM hands back to the
# guest) now and then fails during boot, a QEMU TCG nested-SVM defect as
# far as measured (docs/kvm-kinds.md); a second failure fails the lane.
# Their kernels and image are prepared on the host first, where it is
# quick.
images/build.sh >/dev/null
kernel-config/build.sh >/dev/null
for series in 6.1 6.12; do kernel-config/debian.sh "$series" >/dev/null; done
say "booting (or restoring) each guest once"
# shellcheck disable=SC2016
if ! bounded "booting the guests" scripts/hw-kvm.sh --exec sh -c '
    for guest in "minimal 1" "debian-6.1 1" "debian-6.12 1" "debian-6.1 2" "debian-6.12 2"; do
        set -- $guest
        start=$(date +%s)
        if ! "$0" run --kernel "$1" --cpus "$2" -- true; then
            echo "[hvtrace] hardware-KVM lane: $1 with $2 vCPU(s) FAILED to boot; booting it once more" >&2
            "$0" run --kernel "$1" --cpus "$2" -- true || exit 1
        fi
        echo "[hvtrace] hardware-KVM lane: $1 with $2 vCPU(s) ready in $(( $(date +%s) - start )) s" >&2
    done' "$root/target/release/hvtrace" </dev/null; then
    say "a guest failed to boot"
    failed+=(boot)
fi
while read -r name filters; do
    [ -n "$name" ] || continue
    if [ ${#only[@]} -gt 0 ] && ! printf '%s\n' "${only[@]}" | grep -qx "$name"; then
        continue
    fi
    exe=$(awk -v n="$name" '$1 == n {print $2}' <<<"$executables")
    if [ -z "$exe" ]; then
        say "no test binary named $name"
        failed+=("$name")
        continue
    fi
    t0=$(date +%s)
    say "$name ($filters)"
    status=0
    for attempt in 1 2; do
        status=0
        # shellcheck disable=SC2086
        bounded "$name" scripts/hw-kvm.sh --exec env HVTRACE_QEMU_ACCEL=kvm "$exe" \
            --include-ignored --test-threads=1 $filters "$@" </dev/null || status=$?
        # 86: L1 itself stalled (QEMU's TCG lost an interrupt, scripts/hw-kvm.sh);
        # the tests in it never ran to an end: once more, in a fresh L1.
        [ $status -eq 86 ] && [ $attempt -eq 1 ] || break
        say "$name: L1 stalled (QEMU TCG); running it once more in a fresh L1"
    done
    if [ $status -eq 0 ]; then
        say "$name passed in $(( $(date +%s) - t0 )) s"
    else
        say "$name FAILED after $(( $(date +%s) - t0 )) s"
        failed+=("$name")
    fi
done <<<"$plan"
if [ ${#failed[@]} -gt 0 ]; then
    say "failed: ${failed[*]}"
    exit 1
fi
say "all passed"
