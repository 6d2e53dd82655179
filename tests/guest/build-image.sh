#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Build the guest kernel + initramfs for the QEMU/VMM guest tests.
#   tests/guest/build-image.sh [OUTDIR]     (default: tests/guest/out)
# Produces OUTDIR/vmlinuz and OUTDIR/initramfs.gz (busybox + rootfs/ + the
# virtio and kvm modules of the Debian bookworm 6.1 cloud kernel).
# Cached: does nothing when OUTDIR/stamp matches the inputs.
# Env: VBK_KERNEL_PKG (e.g. linux-image-6.1.0-56-cloud-amd64) pins the kernel;
#      VBK_EXTRA_MODULES adds module names (e.g. "virtio_net virtio_console").
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
mkdir -p "$out"; out=$(cd "$out" && pwd)
die() { echo "build-image: ERROR: $*" >&2; exit 1; }

modules="virtio_pci virtio_mmio virtio_blk virtio-rng virtio_console irqbypass kvm kvm-amd ${VBK_EXTRA_MODULES:-}"
busybox=/bin/busybox
[ -x "$busybox" ] || die "$busybox missing: run tests/guest/install-deps.sh"
command -v cpio >/dev/null || die "cpio missing: run tests/guest/install-deps.sh"

# Cache key: this script, the rootfs overlay, busybox, module list, kernel pin.
key=$( { cat "$0"; find "$here/rootfs" -type f | sort | xargs cat; sha256sum "$busybox";
         echo "$modules ${VBK_KERNEL_PKG:-}"; } | sha256sum | cut -d' ' -f1)
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$key" ] &&
   [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ]; then
    echo "build-image: $out is up to date"; exit 0
fi

# 1. The kernel package (downloaded once, kept in OUTDIR/kernel).
kdir=$out/kernel
if [ ! -f "$kdir/.pkg" ] || { [ -n "${VBK_KERNEL_PKG:-}" ] && [ "$(cat "$kdir/.pkg")" != "$VBK_KERNEL_PKG" ]; }; then
    resolve() { # what bookworm's linux-image-cloud-amd64 points to
        [ -n "${VBK_KERNEL_PKG:-}" ] && { echo "$VBK_KERNEL_PKG"; return; }
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-6\.1\./ {print $2; exit}'
    }
    download() { rm -rf "$out/dl"; mkdir -p "$out/dl"; chmod 777 "$out/dl" # 777: for apt's _apt user
                 [ -n "$pkg" ] && (cd "$out/dl" && apt-get download -q "$pkg"); }
    pkg=$(resolve)
    if ! download; then # stale or missing apt lists: refresh once and retry
        echo "build-image: retrying after apt-get update" >&2
        apt-get update -q >/dev/null || true
        pkg=$(resolve); download ||
            die "cannot download the kernel package '${pkg:-linux-image-6.1.0-*-cloud-amd64}'"
    fi
    echo "build-image: downloaded $pkg"
    rm -rf "$kdir"
    dpkg -x "$out"/dl/"$pkg"_*.deb "$kdir" || die "dpkg -x failed"
    rm -rf "$out/dl"
    echo "$pkg" >"$kdir/.pkg"
fi
kver=$(ls "$kdir/lib/modules" | head -n1)
[ -n "$kver" ] && [ -f "$kdir/boot/vmlinuz-$kver" ] || die "unexpected kernel package layout in $kdir"
# The .deb has no modules.dep (depmod runs at install time): make one.
[ -s "$kdir/lib/modules/$kver/modules.dep" ] || "$busybox" depmod -b "$kdir" "$kver" ||
    die "depmod failed"
dep=$kdir/lib/modules/$kver/modules.dep

# 2. The root file system.
root=$out/rootfs.tmp
rm -rf "$root"; mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,lib/modules/$kver}
cp "$busybox" "$root/bin/busybox"
for a in $("$busybox" --list); do [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"; done
cp -a "$here/rootfs/." "$root/"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true # init also reopens it
# Modules: the requested ones plus their dependencies (closure over modules.dep).
want=(); for m in $modules; do
    line=$(grep -m1 "/$m\.ko:" "$dep") || die "module $m not in $kver"
    want+=("${line%%:*}"); for d in ${line#*:}; do want+=("$d"); done
done
printf '%s\n' "${want[@]}" | sort -u | while read -r p; do
    mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
    cp "$kdir/lib/modules/$kver/$p" "$root/lib/modules/$kver/$p"
    grep -m1 "^$p:" "$dep" >>"$root/lib/modules/$kver/modules.dep"
done

# 3. Pack it.
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 >"$out/initramfs.gz.tmp"
cp "$kdir/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"; mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "$kver" >"$out/kernel-version"
rm -rf "$root"
echo "$key" >"$out/stamp"
echo "build-image: built $out/vmlinuz ($kver) and $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1))"
