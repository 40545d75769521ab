#!/usr/bin/env bash
# Fetches Debian's cloud kernel image for a series (6.1 or 6.12) with apt and
# prints the path of its vmlinuz, unchanged (KASLR stays on: the VMM
# randomizes the placement itself when it decompresses the image).
#
# The package is the one Debian's meta-package currently depends on
# (linux-image-cloud-amd64 for 6.1, linux-image-6.12-cloud-amd64 for 6.12,
# from bookworm-backports). Cached under $(hv_cache_dir)/kernels/<package>_<version>/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../scripts/lib.sh"

series=${1:?usage: debian.sh 6.1|6.12}
case "$series" in
    6.1) meta=linux-image-cloud-amd64 ;;
    6.12) meta=linux-image-6.12-cloud-amd64 ;;
    *) hv_log "unknown Debian kernel series '$series' (want 6.1 or 6.12)"; exit 2 ;;
esac

# 6.12 comes from bookworm-backports, which a fresh machine's apt lacks.
[ "$series" = 6.12 ] && hv_apt_backports

read -r pkg version < <(hv_debian_kernel_package "$meta") ||
    { hv_log "cannot resolve $meta to a kernel package (is the Debian archive reachable?)"; exit 1; }
out="$(hv_cache_dir)/kernels/${pkg}_${version}"
if [ -f "$out/vmlinuz" ]; then
    echo "$out/vmlinuz"
    exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
hv_log "downloading $pkg $version"
hv_deb_unpack "$pkg" "$version" "$work/root"
mkdir -p "$out.tmp"
cp "$work"/root/boot/vmlinuz-* "$out.tmp/vmlinuz"
cp "$work"/root/boot/config-* "$out.tmp/config" 2>/dev/null || true
echo "$pkg $version" > "$out.tmp/package"
rm -rf "$out"
mv "$out.tmp" "$out"
hv_log "kernel ready: $out/vmlinuz"
echo "$out/vmlinuz"
