#!/usr/bin/env bash
# Prepares the L1 guest of the hardware-KVM lane and prints its directory,
# which holds `vmlinuz` and `initrd.cpio.gz`.
#
# L1 is Debian's generic 6.1 kernel (linux-image-amd64), booted by QEMU's
# TCG with an AMD CPU model, so that its kvm_amd module gives real SVM KVM.
# The generic kernel, not the cloud one the tests boot as a guest: the
# cloud kernel has no 9p file system, and L1 reaches the host's files over
# virtio-9p. The initramfs holds busybox, the modules L1 loads (kvm_amd and
# the 9p stack, with their dependencies as depmod resolves them) and
# scripts/hw-kvm/init. Cached under $(hv_cache_dir)/hw-kvm/l1-<hash>/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/../lib.sh"

hv_apt_install busybox-static kmod cpio gzip

meta=linux-image-amd64
read -r pkg version < <(hv_debian_kernel_package "$meta") ||
    { hv_log "cannot resolve $meta to a kernel package (is the Debian archive reachable?)"; exit 1; }

key=$(hv_hash "$pkg $version" "$(sha256sum <"$here/init")" "$(sha256sum <"$here/l1.sh")" "$(sha256sum </bin/busybox)")
out="$(hv_cache_dir)/hw-kvm/l1-$key"
if [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/vmlinuz" ]; then
    echo "$out"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/hvtrace-l1.XXXXXX")
trap 'rm -rf "$work"' EXIT
hv_log "downloading $pkg $version (the hardware-KVM lane's L1 kernel)"
hv_deb_unpack "$pkg" "$version" "$work/deb"
release=$(ls "$work/deb/lib/modules")
depmod -b "$work/deb" "$release"

initrd="$work/initrd"
mkdir -p "$initrd"/{bin,dev,proc,sys,host,lib/modules}
cp /bin/busybox "$initrd/bin/busybox"
for tool in sh mount umount mkdir cat echo sed insmod poweroff sleep chroot stty grep tr ln; do
    ln -s busybox "$initrd/bin/$tool"
done
cp "$here/init" "$initrd/init"
chmod +x "$initrd/init"
# The modules in load order, dependencies first (as modprobe would load
# them); the init loads /lib/modules/order line by line.
: >"$initrd/lib/modules/order"
for module in kvm_amd virtio_pci 9pnet_virtio 9p; do
    modprobe -d "$work/deb" -S "$release" --show-depends "$module" |
        awk '$1 == "insmod" {print $2}' | while read -r ko; do
        name=$(basename "$ko")
        if ! grep -qx "$name" "$initrd/lib/modules/order"; then
            cp "$ko" "$initrd/lib/modules/$name"
            echo "$name" >>"$initrd/lib/modules/order"
        fi
    done
done
grep -qx kvm-amd.ko "$initrd/lib/modules/order" ||
    { hv_log "$pkg has no kvm-amd module"; exit 1; }

mkdir -p "$out.tmp"
cp "$work"/deb/boot/vmlinuz-* "$out.tmp/vmlinuz"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$out.tmp/initrd.cpio.gz"
echo "$pkg $version" >"$out.tmp/package"
rm -rf "$out"
mv "$out.tmp" "$out"
hv_log "L1 ready: $out"
echo "$out"
