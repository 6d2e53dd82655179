#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boot a Linux guest on our vmm-example and run the guest tests in it.
#   tests/guest/run-vmm.sh [DEVICE...]     (default: disk vhost-user-blk rng)
# DEVICE: disk | disk-ro | vhost-user-blk | qsd-blk | rng | rng-vhost-user,
# in guest order (/dev/vda, /dev/vdb, ...).
#
# Where /dev/kvm is real (VMX/SVM), vmm-example runs here. Where it is PVM
# (/sys/module/kvm_pvm, or no vmx/svm flag), a stock kernel cannot boot
# under it, so this boots an L1 Linux under QEMU TCG (which emulates AMD
# SVM), loads kvm-amd in L1 and runs vmm-example there: the L1 initramfs is
# the guest image plus an uncompressed cpio with vmm-example, the daemons,
# their shared libraries, the L2 kernel and the L2 initramfs.
# Either way rootfs/vbk/test-vmm.sh starts the backends and vmm-example.
#
# Prints the console (L2 lines prefixed "L2| "); exits 0 only on
# "VBK-RESULT vmm=ok". Env: VBK_MODE (auto|nested|direct), VBK_BIN_DIR
# (target/release), VBK_OUT (tests/guest/out), VBK_VCPUS (2), VBK_L2_MEM
# (256, MiB), VBK_DISK_MIB (64), VBK_TEST (blk,rng), VBK_APPEND,
# VBK_TIMEOUT (400 s), VBK_L1_VCPUS (1: with 2, TCG's nested SVM itself
# loses L2 guests now and then, see tests/guest/README.md), VBK_WATCHDOG
# (240 s: the L1 watchdog asks the VMM for a stall report), VBK_QSD_QUEUES
# (2: queues of a qsd-blk disk), VBK_L2_VMM (vmm: our vmm-example; qemu:
# QEMU runs the same L2 guest with the same disks on virtio-pci, the
# environment's baseline for stall rates), VBK_LOG (keep the console here), VBK_SCENARIO (boot,
# or snapshot: save and resume the VM twice while its disk changes homes,
# see rootfs/vbk/test-vmm-snapshot.sh; or livemig: live-migrate the running VM
# between vmm-example processes while its disks change homes, see
# rootfs/vbk/test-vmm-livemig.sh; DEVICEs are then ignored).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${VBK_OUT:-$here/out}
bindir=${VBK_BIN_DIR:-$root/target/release}
die() { echo "run-vmm: ERROR: $*" >&2; exit 2; }
devices=${*:-disk vhost-user-blk rng}

[ -e /dev/kvm ] || die "/dev/kvm is absent: cannot run vmm-example"
for b in vmm-example vhost-user-blk vhost-user-rng vhost-user-console; do
    [ -x "$bindir/$b" ] || die "$bindir/$b missing: cargo build --release --workspace"
done
"$here/build-image.sh" "$out" >&2

mode=${VBK_MODE:-auto}
if [ "$mode" = auto ]; then
    if [ -e /sys/module/kvm_pvm ] || ! grep -qwE 'svm|vmx' /proc/cpuinfo; then
        mode=nested; else mode=direct; fi
fi

stage=$(mktemp -d /tmp/vbk-vmm.XXXXXX)
log=${VBK_LOG:-$stage/console.log}
cleanup() { rm -rf "$stage"; }
trap cleanup EXIT
mkdir -p "$stage/vmm/bin"
cat >"$stage/vmm/plan" <<PLAN
VMM_DEVICES="$devices"
VMM_VCPUS=${VBK_VCPUS:-2}
VMM_MEM_MIB=${VBK_L2_MEM:-256}
VMM_DISK_MIB=${VBK_DISK_MIB:-64}
VMM_L2_TEST=${VBK_TEST:-blk,rng}
VMM_L2_APPEND="${VBK_APPEND:-}"
VMM_SCENARIO=${VBK_SCENARIO:-boot}
VMM_WATCHDOG_S=${VBK_WATCHDOG:-240}
VMM_QSD_QUEUES=${VBK_QSD_QUEUES:-2}
VMM_L2_VMM=${VBK_L2_VMM:-vmm}
PLAN
echo "run-vmm: mode=$mode devices='$devices'" >&2

set +e
if [ "$mode" = direct ]; then
    for b in vmm-example vhost-user-blk vhost-user-rng vhost-user-console; do ln -s "$bindir/$b" "$stage/vmm/bin/$b"; done
    ln -s "$out/vmlinuz" "$stage/vmm/vmlinuz"; ln -s "$out/initramfs.gz" "$stage/vmm/initramfs.gz"
    VMM_PLAN=$stage/vmm/plan VMM_DIR=$stage/vmm VMM_WORK=$stage/work \
        timeout -k 5 "${VBK_TIMEOUT:-400}" sh "$here/rootfs/vbk/test-vmm.sh" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
else
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run tests/guest/install-deps.sh"
    progs=("$bindir/vmm-example" "$bindir/vhost-user-blk" "$bindir/vhost-user-rng" "$bindir/vhost-user-console")
    case " $devices " in *" qsd-blk "*)
        q=$(command -v qemu-storage-daemon) || die "qemu-storage-daemon missing (qsd-blk)"
        progs+=("$q") ;;
    esac
    if [ "${VBK_L2_VMM:-vmm}" = qemu ]; then
        # QEMU as the L2 VMM: the binary, its libraries and the firmware
        # a q35 machine with -kernel needs.
        progs+=("$(command -v qemu-system-x86_64)")
        mkdir -p "$stage/vmm/qemu-share"
        for f in /usr/share/seabios/bios-256k.bin /usr/share/qemu/kvmvapic.bin \
                 /usr/share/qemu/linuxboot_dma.bin /usr/share/qemu/linuxboot.bin; do
            cp -L "$f" "$stage/vmm/qemu-share/"
        done
    fi
    for p in "${progs[@]}"; do
        cp "$p" "$stage/vmm/bin/"
        # The shared libraries and the ELF loader, at their host paths.
        for lib in $(ldd "$p" | grep -oE '/[^ ]+'); do
            mkdir -p "$stage/$(dirname "$lib")"; cp -L "$lib" "$stage/$lib"
        done
    done
    cp "$out/vmlinuz" "$stage/vmm/vmlinuz"; cp "$out/initramfs.gz" "$stage/vmm/initramfs.gz"
    # L1 initramfs: the gzip'ed guest image, then our files uncompressed
    # (the kernel unpacks concatenated archives; no gzip saves L1 time).
    (cd "$stage" && find vmm lib lib64 usr -print 2>/dev/null | LC_ALL=C sort |
        cpio -o -H newc --quiet -R 0:0) >"$stage/extra.cpio"
    # The kernel looks for the next archive at a 4-byte boundary: pad the
    # gzip'ed part with zeroes (which it skips) before appending.
    cp "$out/initramfs.gz" "$stage/l1.img"
    size=$(stat -c %s "$stage/l1.img")
    truncate -s $(( (size + 3) / 4 * 4 )) "$stage/l1.img"
    cat "$stage/extra.cpio" >>"$stage/l1.img"
    timeout -k 5 "${VBK_TIMEOUT:-400}" qemu-system-x86_64 \
        -accel tcg,thread=multi -cpu max -m 2G -smp "${VBK_L1_VCPUS:-1}" \
        -nodefaults -nographic -serial stdio -no-reboot \
        -kernel "$out/vmlinuz" -initrd "$stage/l1.img" \
        -append "console=ttyS0 quiet panic=-1 vbk.kvm=1 vbk.test=vmm" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
fi
set -e
[ "$rc" = 124 ] && echo "run-vmm: TIMEOUT after ${VBK_TIMEOUT:-400}s" >&2
grep -q 'VBK-RESULT vmm=ok' "$log" || { echo "run-vmm: FAILED (rc=$rc)" >&2; exit 1; }
echo "run-vmm: ok" >&2
