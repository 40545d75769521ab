#!/usr/bin/env bash
# hvtrace's test command (README): sets up everything a fresh machine lacks,
# (usage: scripts/test.sh [--debian]; --debian adds the Debian-kernel boot
# tests, which take most of an hour of emulated boot on PVM KVM)
# builds, prepares the guest kernels and image (cached by content hash under
# ~/.cache/hvtrace), boots each guest the tests use once (caching a
# snapshot), then runs every test. Guest tests need /dev/kvm and fail
# loudly without it.
set -euo pipefail
debian=0
if [ "${1:-}" = "--debian" ]; then debian=1; shift; fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/lib.sh
t0=$(date +%s)
step() { hv_log "[$(( $(date +%s) - t0 ))s] $*"; }

step "installing packages"
scripts/setup.sh
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

# A cold boot is minutes of emulated kernel code on PVM KVM (most of an hour
# for Debian's kernels). Each guest definition the tests use is booted once
# here, in the background (the Debian ones side by side with the minimal
# kernel's build), and every test afterwards restores its snapshot. A warm
# cache makes these boots quick restores.
logs=$(mktemp -d)
pids=()
names=()
warm() { # name, hvtrace run arguments...
    local name=$1; shift
    target/release/hvtrace run "$@" -- true >"$logs/$name.log" 2>&1 &
    pids+=($!); names+=("$name")
    step "booting guest $name in the background"
}
if [ $debian -eq 1 ]; then
    warm debian-6.1 --kernel debian-6.1
    warm debian-6.12 --kernel debian-6.12
fi
step "minimal kernel"
kernel-config/build.sh >/dev/null
warm minimal
warm minimal-2cpu --cpus 2
fail=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        step "guest ${names[$i]} booted and cached"
    else
        hv_log "guest ${names[$i]} failed to boot:"; tail -n 40 "$logs/${names[$i]}.log" >&2; fail=1
    fi
done
[ $fail -eq 0 ] || exit 1

step "running tests"
# One test at a time: each guest test occupies a CPU and the machine has two.
# --lib --bins --tests: no doc-test binaries (the crates have no doc tests),
# so the run closes on a real test binary's summary.
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --release --workspace --no-fail-fast --lib --bins --tests -- --test-threads=1 "$@"
if [ $debian -eq 1 ]; then
    step "Debian kernel tests"
    cargo test --release -p hvtrace-tests --test boot_matches_qemu --test tracing --test introspect --test report --test engines --test attach --test signal_vote --test control --test steps --test gdbserver -- --ignored --test-threads=1
fi
step "done"
