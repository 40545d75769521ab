#!/usr/bin/env bash
# hvtrace's test command (README): sets up everything a fresh machine lacks,
# builds, prepares the guest kernels and image (cached by content hash under
# ~/.cache/hvtrace), then runs every test. Guest tests need /dev/kvm and fail
# loudly without it.
set -euo pipefail
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
step "building hvtrace"
cargo build --release --workspace --all-targets
step "guest kernels and image"
kernel-config/build.sh >/dev/null
kernel-config/debian.sh 6.1 >/dev/null
kernel-config/debian.sh 6.12 >/dev/null
images/build.sh >/dev/null
step "running tests"
# One test at a time: each guest test occupies a CPU, the machine has two,
# and the first test of each kernel boots it once for the others to restore.
cargo test --release --workspace -- --test-threads=1 "$@"
step "done"
