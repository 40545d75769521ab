#!/usr/bin/env bash
# Runs hvtrace on hardware-style KVM (AMD SVM) on a machine that has none.
#
#   scripts/hw-kvm.sh ARGS...           runs `hvtrace ARGS...`
#   scripts/hw-kvm.sh --exec CMD ARGS   runs any host command (a test binary)
#
# The command runs inside L1: Debian's Linux with kvm_amd, booted by a QEMU
# TCG built with the int3-intercept fix (scripts/hw-kvm/qemu.sh), its /dev/kvm
# real SVM KVM as on an AMD host. L1 sees the host's root file system
# (virtio-9p), so paths, the build tree and ~/.cache/hvtrace mean the same
# in L1; L1 has its own /proc, /dev, /run and TMPDIR (/run/tmp). The
# command's stdout and stderr come out on this script's, and its exit status
# is this script's. A lane that cannot run (QEMU build, L1 boot, kvm_amd)
# exits 125 with the reason: it never passes by skipping.
#
# Environment: HVTRACE_HW_KVM_CPUS (L1 vCPUs, default 1),
# HVTRACE_HW_KVM_MEMORY (L1 memory, default 4G), HVTRACE_HW_KVM_STALL_SECS
# (how long L1's vCPU may make no progress before the watchdog acts,
# default 180).
#
# Exit status 86: L1 stalled and was stopped (below); the caller may run
# the command once more.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib.sh"

lane_fail() {
    hv_log "hardware-KVM lane: $*"
    exit 125
}

exec_mode=0
if [ "${1:-}" = "--exec" ]; then
    exec_mode=1
    shift
    [ $# -gt 0 ] || lane_fail "--exec needs a command"
fi

qemu_prefix=$("$root/scripts/hw-kvm/qemu.sh") || lane_fail "cannot build the lane's QEMU (see above)"
l1=$("$root/scripts/hw-kvm/l1.sh") || lane_fail "cannot prepare the L1 kernel and initramfs (see above)"
if [ $exec_mode -eq 0 ]; then
    hvtrace="$root/target/release/hvtrace"
    if [ ! -x "$hvtrace" ]; then
        hv_log "building hvtrace"
        (cd "$root" && cargo build --release -q -p hvtrace) || lane_fail "cannot build hvtrace"
    fi
    # Build or fetch the default guest on the host, where it is quick;
    # inside L1 hvtrace then finds it cached.
    "$root/images/build.sh" >/dev/null || lane_fail "cannot build the guest image"
    "$root/kernel-config/build.sh" >/dev/null || lane_fail "cannot build the minimal kernel"
    set -- "$hvtrace" "$@"
fi

run=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-hw-kvm.XXXXXX")
trap 'rm -rf "$run"' EXIT
{
    echo "# written by scripts/hw-kvm.sh; run by L1's /init in a chroot of the host"
    export -p | grep -v -E '^declare -x (TMPDIR|OLDPWD|SHLVL|_)(=|$)'
    echo "export TMPDIR=/run/tmp"
    printf 'cd -- %q || exit 125\n' "$PWD"
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$run/command"

cpus=${HVTRACE_HW_KVM_CPUS:-1}
memory=${HVTRACE_HW_KVM_MEMORY:-4G}
# -cpu EPYC: an AMD model whose SVM has nested paging (qemu64,+svm lacks
# it). thread=multi: one host thread per L1 vCPU. Firmware (SeaBIOS and
# QEMU's option ROMs) from Debian's packages: the lane's QEMU installs none.
# ttyS0 is L1's console (a file here), ttyS1/ttyS2 the command's stdout and
# stderr (this script's own, appended to, never truncated).
# The EPYC features TCG cannot give are turned off here rather than warned
# about at every start (nrip-save among them: KVM then decodes the next RIP
# itself).
cpu=EPYC,fxsr-opt=off,misalignsse=off,osvw=off,topoext=off,nrip-save=off,xsavec=off
# QEMU runs in the background so that a signal to this script (a test
# runner's timeout, ^C) stops it too instead of leaving L1 running.
status=0
qemu_pid=
watchdog_pid=
stop_qemu() {
    [ -n "$watchdog_pid" ] && kill "$watchdog_pid" 2>/dev/null
    [ -n "$qemu_pid" ] && kill "$qemu_pid" 2>/dev/null
    wait "$qemu_pid" 2>/dev/null
    exit 125
}

# The L1 stall watchdog. QEMU's TCG (10.0.2) now and then loses an
# interrupt of L1's: seen twice in CI-length runs, L1 idle for good, its
# vCPU thread asleep in QEMU's halt wait with the APIC timer's vector
# pending in the IRR and no interrupt request raised (gdb on QEMU,
# 2026-12-05; docs/kvm-kinds.md, "L1 stalls"). Nothing in L1 runs again,
# not even its timeouts. An idle L1 still wakes for its timers (its vCPU
# thread gains a tick or two every 10 s; measured with `sleep 150`), so a
# vCPU thread that gains no CPU time at all for
# HVTRACE_HW_KVM_STALL_SECS is that stall: the watchdog injects an NMI
# (QMP) to wake it, and if L1 still makes no progress within a minute it
# stops QEMU and this script exits 86.
stall_secs=${HVTRACE_HW_KVM_STALL_SECS:-180}
vcpu_ticks() { # the CPU ticks of QEMU's busiest thread: its vCPU's
    local max=0 v t
    for t in /proc/"$1"/task/*/stat; do
        v=$(awk '{ print $14 + $15 }' "$t" 2>/dev/null) || continue
        if [ "${v:-0}" -gt "$max" ]; then max=$v; fi
    done
    echo "$max"
}
inject_nmi() { # QMP socket
    /usr/bin/python3 - "$1" <<'PY' || true
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
for cmd in ("qmp_capabilities", "inject-nmi"):
    f.write(json.dumps({"execute": cmd}) + "\n")
    f.flush()
    print("[hvtrace] hardware-KVM lane: QMP " + cmd + ": " + f.readline().strip(), file=sys.stderr)
PY
}
watch_l1() { # QEMU's pid
    local last now ticks since nudged=0
    last=$(vcpu_ticks "$1")
    since=$(date +%s)
    while kill -0 "$1" 2>/dev/null; do
        sleep 10
        ticks=$(vcpu_ticks "$1")
        now=$(date +%s)
        if [ "$ticks" -gt "$last" ]; then
            [ $nudged -eq 0 ] || hv_log "hardware-KVM lane: L1 runs again after the NMI"
            last=$ticks since=$now nudged=0
            continue
        fi
        if [ $nudged -eq 0 ] && [ $((now - since)) -ge "$stall_secs" ]; then
            hv_log "hardware-KVM lane: L1's vCPU made no progress for $((now - since)) s (a lost interrupt in QEMU's TCG): injecting an NMI"
            inject_nmi "$run/qmp.sock"
            nudged=1 since=$now
        elif [ $nudged -eq 1 ] && [ $((now - since)) -ge 60 ]; then
            hv_log "hardware-KVM lane: L1 still stalled after the NMI: stopping it"
            touch "$run/stalled"
            kill "$1" 2>/dev/null
            return
        fi
    done
}
trap stop_qemu INT TERM HUP
"$qemu_prefix/bin/qemu-system-x86_64" \
    -L /usr/share/seabios -L /usr/share/qemu \
    -accel tcg,thread=multi -cpu "$cpu" -smp "$cpus" -m "$memory" \
    -nodefaults -nographic -no-reboot -monitor none \
    -qmp "unix:$run/qmp.sock,server=on,wait=off" \
    -kernel "$l1/vmlinuz" -initrd "$l1/initrd.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 mitigations=off hvtrace.run=$run" \
    -serial "file:$run/console" \
    -chardev file,id=stdout,path=/proc/self/fd/1,append=on -serial chardev:stdout \
    -chardev file,id=stderr,path=/proc/self/fd/2,append=on -serial chardev:stderr \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,multidevs=remap \
    </dev/null &
qemu_pid=$!
watch_l1 "$qemu_pid" &
watchdog_pid=$!
wait "$qemu_pid" || status=$?
kill "$watchdog_pid" 2>/dev/null || true
wait "$watchdog_pid" 2>/dev/null || true
trap - INT TERM HUP
if [ -f "$run/stalled" ]; then
    hv_log "hardware-KVM lane: L1 stalled and was stopped; its console:"
    tail -n 20 "$run/console" >&2 || true
    exit 86
fi
if [ ! -f "$run/status" ]; then
    hv_log "hardware-KVM lane: L1 reported no exit status (QEMU exit $status); its console:"
    tail -n 40 "$run/console" >&2 || true
    exit 125
fi
exit "$(cat "$run/status")"
