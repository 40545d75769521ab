#!/bin/bash
# Build hvtrace's default guest initramfs (busybox + static test programs +
# the control-protocol /init) and print the path of the uncompressed newc
# cpio archive on stdout. Progress goes to stderr. See images/README.md.
#
# The result is cached by content: a second run with the same inputs prints
# the same path at once. The archive is byte-for-byte reproducible.
#
# Environment:
#   HVTRACE_CACHE                  cache root (see scripts/lib.sh)
#   HVTRACE_IMAGE_SEPARATE_PROGS=1 link each test program into its own static
#                                  binary instead of one multi-call binary
#                                  (about 0.7 MB more per program)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../scripts/lib.sh
. "$here/../scripts/lib.sh"

hv_apt_install busybox-static gcc libc6-dev cpio strace

separate=${HVTRACE_IMAGE_SEPARATE_PROGS:-0}
case $separate in 0 | 1) ;; *) hv_log "HVTRACE_IMAGE_SEPARATE_PROGS must be 0 or 1"; exit 2 ;; esac

# ---- cache key --------------------------------------------------------------
# Inputs: the busybox binary (its package version), the toolchain and C
# library that the static programs are linked from, and every file under
# images/ except documentation and host-side tests (*.md, test-*). Paths are relative to images/ so that the key
# does not depend on where the repository is checked out.
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)
strace_version=$(dpkg-query -W -f='${Version}' strace)
libc_version=$(dpkg-query -W -f='${Version}' libc6-dev)
gcc_version=$(gcc --version | sed -n 1p)
cd "$here"
mapfile -t inputs < <(find . -type f ! -name '*.md' ! -name 'test-*' | LC_ALL=C sort)
key=$(hv_hash "busybox-static $bb_version" "libc6-dev $libc_version" "gcc $gcc_version" \
    "strace $strace_version" \
    "separate-progs $separate" "${inputs[@]}")

images_dir="$(hv_cache_dir)/images"
out_dir="$images_dir/default-$key"
out="$out_dir/initramfs.cpio"
if [ -f "$out" ]; then
    hv_log "guest image up to date: $out"
    echo "$out"
    exit 0
fi

# ---- staging ----------------------------------------------------------------
hv_log "building guest image default-$key"
mkdir -p "$images_dir"
# Same file system as the result, so the final mv is an atomic rename.
tmp=$(mktemp -d "$images_dir/.tmp-default-$key.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
umask 022
root="$tmp/root"
obj="$tmp/obj"
mkdir -p "$root" "$obj" "$tmp/result"
chmod 755 "$root"

for d in bin sbin usr/bin usr/sbin proc sys dev tmp etc root run; do
    mkdir -p "$root/$d"
done
chmod 1777 "$root/tmp"
chmod 700 "$root/root"

# busybox, with a symlink for every applet (made here, not by --install in
# the guest: every process the guest starts costs emulated time).
bb=/bin/busybox
if readelf -lW "$bb" | grep -q 'INTERP'; then
    hv_log "$bb is not statically linked (is busybox-static installed?)"
    exit 1
fi
install -m 755 "$bb" "$root/bin/busybox"
napplets=0
while IFS= read -r p; do
    [ -n "$p" ] && [ "$p" != bin/busybox ] || continue
    case $p in /* | *..*) hv_log "odd applet path: $p"; exit 1 ;; esac
    mkdir -p "$root/$(dirname "$p")"
    [ -e "$root/$p" ] || [ -L "$root/$p" ] || ln -s /bin/busybox "$root/$p"
    napplets=$((napplets + 1))
done < <("$bb" --list-full)
hv_log "busybox $bb_version: $napplets applet links"

install -m 644 etc/* "$root/etc/"
install -m 755 init "$root/init"

# ---- test programs ----------------------------------------------------------
# Compiled from inside images/ with relative source names, so no absolute
# path of this checkout ends up in a binary.
cflags=(-O2 -Wall -Werror -pthread)
progs=()
for src in programs/hv-*.c; do
    progs+=("$(basename "$src" .c)")
done
if [ "$separate" = 1 ]; then
    for p in "${progs[@]}"; do
        gcc -static "${cflags[@]}" -o "$root/usr/bin/$p" "programs/$p.c"
    done
else
    # One multi-call binary, /usr/bin/hv-tests, with a symlink per program:
    # glibc static binaries are ~0.7 MB each, nearly all of it the same libc
    # code, and every MB of initramfs costs seconds of emulated boot.
    table=""
    objs=()
    for p in "${progs[@]}"; do
        fn="hv_main_${p//-/_}"
        gcc "${cflags[@]}" -Dmain="$fn" -c -o "$obj/$p.o" "programs/$p.c"
        table+="X(\"$p\", $fn) "
        objs+=("$obj/$p.o")
    done
    gcc "${cflags[@]}" "-DHV_PROGRAMS(X)=$table" -c -o "$obj/multicall.o" programs/multicall.c
    gcc -static "${cflags[@]}" -o "$root/usr/bin/hv-tests" "$obj/multicall.o" "${objs[@]}"
    for p in "${progs[@]}"; do
        ln -s hv-tests "$root/usr/bin/$p"
    done
fi
# Stepping targets: assembly with no C library, so every instruction they
# run is in their source; each its own tiny static binary.
for src in programs/hv-step-*.S; do
    p=$(basename "$src" .S)
    gcc -nostdlib -static -no-pie -o "$root/usr/bin/$p" "$src"
    progs+=("$p")
done
# Debugging targets (hvtrace gdbserver's tests): with debug information
# and no optimisation, as a developer builds what they debug; each its own
# static binary. The debug information names sources relative to images/.
for src in programs/debug/*.c; do
    p=$(basename "$src" .c)
    gcc -static -g -O0 -Wall -Werror -pthread "-fdebug-prefix-map=$PWD=." \
        -o "$root/usr/bin/$p" "$src"
    progs+=("$p")
done
hv_log "test programs: ${progs[*]}"

# ---- strace -----------------------------------------------------------------
# Debian's own strace, the oracle the tracing tests compare hvtrace with,
# with the shared libraries it links (as ldd resolves them) and the dynamic
# loader, at the same paths as on the host.
install -D -m 755 /usr/bin/strace "$root/usr/bin/strace"
while read -r lib; do
    case $lib in /*) ;; *) continue ;; esac
    install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
done < <(ldd /usr/bin/strace | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }')
hv_log "strace $strace_version with $(ldd /usr/bin/strace | grep -c '/') libraries"

# ---- archive ----------------------------------------------------------------
# Fixed order, owner and mtimes (and renumbered inodes, no device numbers) so
# that the same inputs give the same bytes.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --ignore-devno --renumber-inodes --quiet) >"$tmp/result/initramfs.cpio"
{
    echo "key $key"
    echo "busybox-static $bb_version"
    echo "libc6-dev $libc_version"
    echo "gcc $gcc_version"
    echo "strace $strace_version"
    echo "separate-progs $separate"
    (cd "$here" && sha256sum "${inputs[@]}")
} >"$tmp/result/inputs.txt"

size=$(stat -c %s "$tmp/result/initramfs.cpio")
if ! mv -T "$tmp/result" "$out_dir" 2>/dev/null; then
    # Another build of the same key finished first: use its result.
    [ -f "$out" ] || { hv_log "cannot move the image into $out_dir"; exit 1; }
fi
hv_log "guest image: $out ($size bytes)"
echo "$out"
