#!/usr/bin/env bash
# hvtrace's test command (README): sets up everything a fresh machine lacks,
# builds, prepares the guest kernels and image (cached by content hash under
# ~/.cache/hvtrace), boots each guest the tests use once (caching a
# snapshot), then runs every test in two lanes side by side:
# - the PVM lane: every test, on this machine's /dev/kvm (PVM KVM);
# - the hardware-KVM lane (scripts/hw-kvm/tests.sh): the guest tests that
#   matter, Debian's 6.1 and 6.12 kernels included, on real SVM KVM inside
#   QEMU's TCG (scripts/hw-kvm.sh).
# Guest tests need /dev/kvm and fail loudly without it; a lane that cannot
# run fails the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
t0=$(date +%s)
step() { hv_log "[$(( $(date +%s) - t0 ))s] $*"; }
# Whatever runs in the background (builds, guests, the hardware-KVM lane in
# its own process group with its QEMU) stops when this script does.
lane_pid=
cleanup() {
    [ -z "$lane_pid" ] || kill -TERM -- "-$lane_pid" 2>/dev/null || true
    # shellcheck disable=SC2046
    kill $(jobs -p) 2>/dev/null || true
}
trap cleanup EXIT

step "installing packages"
scripts/setup.sh
logs=$(mktemp -d)
# The hardware-KVM lane's QEMU (built from Debian's source with a fix;
# minutes, once per machine: the longest of the cold set-up) and its L1
# kernel, in the background from the start: the lane, the longer of the
# two, starts as soon as they and hvtrace are ready.
(scripts/hw-kvm/qemu.sh && scripts/hw-kvm/l1.sh) >/dev/null 2>"$logs/hw-kvm-build.log" &
hw_build_pid=$!
step "hardware-KVM lane: building QEMU and L1 in the background"
if [ ! -e /dev/kvm ]; then
    echo "***************************************************************" >&2
    echo "*** /dev/kvm is missing: every guest test below will FAIL.  ***" >&2
    echo "***************************************************************" >&2
fi
step "checking format and lints"
# rustfmt and clippy come with the toolchain's default profile; add them
# where a minimal profile left them out.
if command -v rustup >/dev/null; then
    rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -q -- -D warnings
step "building hvtrace"
cargo build --release --workspace --all-targets
step "guest image and Debian kernels"
images/build.sh >/dev/null
kernel-config/debian.sh 6.1 >/dev/null
kernel-config/debian.sh 6.12 >/dev/null

# A cold boot is minutes of emulated kernel code on PVM KVM. Each guest
# definition the PVM lane uses is booted once here, in the background, and
# every test afterwards restores its snapshot. A warm cache makes these
# boots quick restores. (Debian's kernels, most of an hour each on PVM KVM,
# boot in the hardware-KVM lane instead.)
pids=()
names=()
warm() { # name, hvtrace run arguments...
    local name=$1; shift
    target/release/hvtrace run "$@" -- true >"$logs/$name.log" 2>&1 &
    pids+=($!); names+=("$name")
    step "booting guest $name in the background"
}
step "minimal kernel"
kernel-config/build.sh >/dev/null
warm minimal
warm minimal-2cpu --cpus 2
if ! wait "$hw_build_pid"; then
    cat "$logs/hw-kvm-build.log" >&2
    hv_log "hardware-KVM lane: cannot build its QEMU or L1 (above)"
    exit 1
fi
step "hardware-KVM lane: QEMU and L1 ready"

step "running tests"
# The hardware-KVM lane runs in the background on the second core (its L1
# has one vCPU) while the PVM lane runs here; its progress lines show live
# (fd 3), its whole log is printed after. CI stops a run at 90 minutes and
# then shows nothing: the lane gets a deadline (HVTRACE_CI_BUDGET seconds
# after this script started, 80 minutes by default) and fails, saying
# what it cut off, rather than let the run be killed.
lane_log="$logs/hw-kvm-lane.log"
HVTRACE_LANE_DEADLINE=$(( t0 + ${HVTRACE_CI_BUDGET:-4800} )) \
    setsid scripts/hw-kvm/tests.sh 3>&2 >"$lane_log" 2>&1 &
lane_pid=$!
step "hardware-KVM lane started in the background"
fail=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        step "guest ${names[$i]} booted and cached"
    else
        hv_log "guest ${names[$i]} failed to boot:"; tail -n 40 "$logs/${names[$i]}.log" >&2; fail=1
    fi
done
[ $fail -eq 0 ] || exit 1
# PVM lane: one test at a time (each guest test occupies a CPU and the
# machine has two, one of them the other lane's).
# --lib --bins --tests: no doc-test binaries (the crates have no doc tests),
# so the run closes on a real test binary's summary.
# --no-fail-fast: one failing test binary does not hide the others' results.
pvm=0
cargo test --release --workspace --no-fail-fast --lib --bins --tests -- --test-threads=1 "$@" || pvm=$?
step "PVM lane done (status $pvm); waiting for the hardware-KVM lane"
lane=0
wait "$lane_pid" || lane=$?
lane_pid=
echo "================ hardware-KVM lane (scripts/hw-kvm/tests.sh) ================"
cat "$lane_log"
step "hardware-KVM lane done (status $lane)"
[ $pvm -eq 0 ] && [ $lane -eq 0 ] || exit 1
step "done"
