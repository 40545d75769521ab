#!/usr/bin/env bash
# Builds the QEMU of the hardware-KVM lane and prints its install prefix
# (PREFIX/bin/qemu-system-x86_64).
#
# The lane runs Linux with kvm_amd inside QEMU's TCG emulator, whose AMD CPU
# models expose SVM. Two QEMU facts shape this script (measured; see
# docs/kvm-kinds.md):
# - bookworm's QEMU 7.2 never fires a nested guest's hardware breakpoints;
#   bookworm-backports' QEMU (10.0.2 when written) does, so its source is
#   used;
# - TCG routes a nested guest's int3 to the wrong SVM intercept;
#   qemu-svm-int3-intercept.patch fixes that. A QEMU whose source already
#   carries the fix (the patch applies in reverse) is built unpatched; a
#   source the patch fits neither way stops the build with that reason.
#
# Only the orig tarball of Debian's source package is used (Debian's own
# patches are packaging matters), fetched through a private apt
# configuration under the cache so the system's apt sources are left as
# they are, and checked against the sha256 the signed Sources index gives.
# Cached under $(hv_cache_dir)/qemu/<hash of tarball, patch, options>/.
#
#   scripts/hw-kvm/qemu.sh          builds (once) and prints the prefix
#   scripts/hw-kvm/qemu.sh --deps   only installs the build's Debian packages
#                                   (scripts/setup.sh, so that a build in the
#                                   background never runs apt beside others)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"

# The build's Debian packages. QEMU 10's configure wants meson >= 1.5
# (bookworm has 1.0, bookworm-backports 1.7) and pycotap (bookworm-backports
# only).
install_build_deps() {
    hv_apt_install build-essential pkg-config ninja-build libglib2.0-dev \
        libpixman-1-dev libattr1-dev python3-venv qemu-system-data seabios
    hv_apt_backports
    if ! dpkg --compare-versions "$(dpkg-query -W -f='${Version}' meson 2>/dev/null || echo 0)" ge 1.5 ||
        ! dpkg-query -W -f='${Status}' python3-pycotap 2>/dev/null | grep -q 'install ok installed'; then
        hv_log "installing meson and pycotap from bookworm-backports"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports meson python3-pycotap >&2
    fi
}
if [ "${1:-}" = "--deps" ]; then
    install_build_deps
    exit 0
fi

patch_file="$here/qemu-svm-int3-intercept.patch"
# x86_64 system emulation with TCG and virtio-9p (the lane shares the host's
# file system with its L1 guest), nothing else: a few minutes of build.
options="--target-list=x86_64-softmmu --without-default-features --enable-tcg
--enable-virtfs --enable-attr --enable-pixman --disable-docs --disable-werror
--disable-install-blobs --disable-download"

cache=$(hv_cache_dir)
apt_dir="$cache/apt-src"

# The Sources index of bookworm-backports, in a private apt state directory.
apt_private() {
    apt-get -o Dir::Etc::SourceList="$apt_dir/sources.list" \
        -o Dir::Etc::SourceParts=/nonexistent \
        -o Dir::State::Lists="$apt_dir/lists" \
        -o Dir::Cache="$apt_dir/cache" -o APT::Sandbox::User=root "$@"
}
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
uri=$(awk '/^URIs:/ && /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
[ -n "$uri" ] || uri=http://deb.debian.org/debian
echo "deb-src $uri bookworm-backports main" > "$apt_dir/sources.list"

# "<version> <sha256> <size> <file> <directory>" of the orig tarball.
orig_entry() {
    local index
    local indexes=("$apt_dir"/lists/*bookworm-backports_main_source_Sources*)
    index=${indexes[0]}
    [ -f "$index" ] || return 0
    /usr/lib/apt/apt-helper cat-file "$index" | awk '
        /^Package: / { pkg = $2 }
        pkg == "qemu" && /^Version: / { ver = $2 }
        pkg == "qemu" && /^Directory: / { dir = $2 }
        pkg == "qemu" && /^Checksums-Sha256:/ { sums = 1; next }
        sums && /^ / { if ($3 ~ /orig\.tar/) { sha = $1; size = $2; file = $3 } next }
        { sums = 0 }
        /^$/ { if (pkg == "qemu" && sha != "" && !done) { print ver, sha, size, file, dir; done = 1 } pkg = "" }'
}
entry=$(orig_entry)
if [ -z "$entry" ]; then
    hv_log "fetching bookworm-backports' source index"
    apt_private update -qq >&2
    entry=$(orig_entry)
fi
[ -n "$entry" ] || { hv_log "QEMU's source is not in bookworm-backports' Sources index ($uri)"; exit 1; }
read -r version sha size file dir <<<"$entry"

key=$(hv_hash "$sha" "$options" "$(sha256sum <"$patch_file")" "$(sha256sum <"$here/qemu.sh")")
prefix="$cache/qemu/$key"
if [ -x "$prefix/bin/qemu-system-x86_64" ]; then
    echo "$prefix"
    exit 0
fi

install_build_deps

tarball="$apt_dir/$file"
if [ ! -f "$tarball" ] || ! echo "$sha  $tarball" | sha256sum -c --quiet >/dev/null 2>&1; then
    hv_log "downloading QEMU $version source ($((size / 1048576)) MiB)"
    /usr/lib/apt/apt-helper download-file "$uri/$dir/$file" "$tarball.part" "SHA256:$sha" >&2
    mv "$tarball.part" "$tarball"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-qemu.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xf "$tarball"
src=$(echo "$work"/qemu-*)
if patch -d "$src" -p1 --forward --dry-run -s <"$patch_file" >/dev/null 2>&1; then
    patch -d "$src" -p1 --forward -s <"$patch_file" >&2
    hv_log "QEMU $version: int3 intercept patch applied"
elif patch -d "$src" -p1 -R --dry-run -s <"$patch_file" >/dev/null 2>&1; then
    hv_log "QEMU $version already routes int3 through the exception intercept: built unpatched"
else
    hv_log "qemu-svm-int3-intercept.patch fits QEMU $version neither way: check target/i386/tcg/excp_helper.c and update the patch"
    exit 1
fi

# Debian's +ds tarball leaves out the prebuilt edk2 firmware, but QEMU's
# meson.build unpacks it whenever bzip2 is installed: tell it not to (the
# lane boots with SeaBIOS from Debian's seabios package).
sed -i 's/^    unpack_edk2_blobs = bzip2.found()$/    unpack_edk2_blobs = false/' "$src/meson.build"
grep -q '^    unpack_edk2_blobs = false$' "$src/meson.build" ||
    { hv_log "QEMU $version: cannot turn off the edk2 unpacking in meson.build"; exit 1; }

log="$cache/qemu/build-$key.log"
mkdir -p "$cache/qemu"
hv_log "building QEMU $version (x86_64, TCG only; a few minutes; log: $log)"
rm -rf "$prefix.tmp"
# --python: Debian's python3, which sees the meson package installed above
# (a pyenv or venv python first on PATH would not).
# shellcheck disable=SC2086
if ! (cd "$src" && mkdir build && cd build &&
    ../configure --prefix="$prefix.tmp" --python=/usr/bin/python3 $options &&
    make -j"$(nproc)" && make install) >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    hv_log "QEMU build failed; the whole log is $log"
    exit 1
fi
echo "$version $sha" > "$prefix.tmp/source"
rm -rf "$prefix"
mv "$prefix.tmp" "$prefix"
rm -f "$log"
echo "$prefix"
