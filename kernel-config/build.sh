#!/usr/bin/env bash
# Builds hvtrace's minimal guest kernel from Debian's linux-source-6.1 and
# prints the directory holding vmlinux, bzImage, System.map and .config.
#
# The result is cached under $(hv_cache_dir)/kernels/minimal-6.1-<hash>, where
# <hash> covers the source package version, the config fragment and this
# script; a second call with the same inputs prints the cached directory.
# Build dependencies are installed with apt the first time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../scripts/lib.sh"

hv_apt_install linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev dwarves xz-utils cpio kmod

src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
# Relative names: the key must not depend on where the checkout is (CI
# clones into a new folder each run; an absolute path in the hash made every
# CI run rebuild the kernel and cold-boot its guests).
key=$(cd "$here" && hv_hash "$src_version" minimal.config build.sh)
out="$(hv_cache_dir)/kernels/minimal-6.1-$key"
if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ] && [ -f "$out/System.map" ]; then
    echo "$out"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-kbuild.XXXXXX")
trap 'rm -rf "$work"' EXIT
hv_log "building minimal kernel (linux-source-6.1 $src_version) in $work; takes a few minutes"
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
cd "$work"/linux-source-6.1
make -s ARCH=x86_64 tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$here/minimal.config" >&2
make -s ARCH=x86_64 olddefconfig >&2

# Every option the fragment sets must have survived olddefconfig.
fail=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=n) opt=${line%%=*}; grep -q "^$opt=" .config && { hv_log "config: $opt should be off"; fail=1; } ;;
        CONFIG_*=*) grep -qx "$line" .config || { hv_log "config: '$line' did not take effect"; fail=1; } ;;
    esac
done < "$here/minimal.config"
[ $fail -eq 0 ] || { hv_log "kernel config fragment does not apply to $src_version"; exit 1; }

# Reproducible: no build time, user or host in the image, so the same
# inputs give the same bytes (and the same guest snapshot key) anywhere.
export KBUILD_BUILD_TIMESTAMP="Thu Jan  1 00:00:00 UTC 1970" KBUILD_BUILD_USER=hvtrace KBUILD_BUILD_HOST=hvtrace
make -s ARCH=x86_64 -j"$(nproc)" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp vmlinux System.map .config "$out.tmp/"
cp arch/x86/boot/bzImage "$out.tmp/"
rm -rf "$out"
mv "$out.tmp" "$out"
hv_log "kernel ready: $out"
echo "$out"
