#!/usr/bin/env bash
# Installs the Python tools hvtrace's tests use as oracles (vmlinux-to-elf,
# whose kallsyms-finder recovers kernel symbols independently of hvtrace)
# into a virtualenv under the cache directory, and prints its bin directory.
# Idempotent: a second call with the same pinned versions does nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

hv_apt_install python3 python3-venv
requirements="vmlinux-to-elf==1.4.0"
key=$(hv_hash "$requirements" "$(python3 --version 2>&1)")
venv="$(hv_cache_dir)/tools/python-$key"
if [ ! -x "$venv/bin/kallsyms-finder" ]; then
    hv_log "installing $requirements into $venv"
    rm -rf "$venv.tmp"
    python3 -m venv "$venv.tmp" >&2
    "$venv.tmp/bin/pip" install -q $requirements >&2
    rm -rf "$venv"
    mv "$venv.tmp" "$venv"
    # venv scripts name their interpreter by absolute path: rewrite it.
    sed -i "1s|$venv.tmp|$venv|" "$venv"/bin/*
fi
echo "$venv/bin"
