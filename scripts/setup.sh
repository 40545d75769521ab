#!/usr/bin/env bash
# Installs every Debian package hvtrace's builds and tests need (idempotent).
# The kernel and image scripts install their own build dependencies too;
# this adds the test oracles (QEMU, strace, gdb, binutils, pahole, vmlinux-to-elf in a
# cached venv), the NATS JetStream server the event-sink tests start, and
# the host compressors the loader tests use.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
hv_apt_install \
    build-essential flex bison bc libelf-dev libssl-dev dwarves kmod cpio \
    linux-source-6.1 busybox-static libc6-dev \
    qemu-system-x86 strace gdb binutils nats-server \
    gzip bzip2 xz-utils lzop lz4 zstd
"$here/python-tools.sh" >/dev/null
# The hardware-KVM lane's QEMU build (scripts/test.sh starts it in the
# background; its packages are installed here, before anything runs beside).
"$here/hw-kvm/qemu.sh" --deps
