#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boot the test guest in QEMU with one vhost-user-blk-pci disk per socket.
#   tests/guest/run-qemu-blk.sh SOCK[,SOCK2...] [extra qemu args...]
# Prints the guest console; exits 0 only if the guest printed "VBK-DONE status=ok".
# Env: VBK_OUT (kernel+initramfs dir, default tests/guest/out), VBK_QUEUES (2; empty: QEMU's default),
#      VBK_SMP (2), VBK_MEM (512M), VBK_TIMEOUT seconds (240), VBK_TEST (blk),
#      VBK_APPEND (extra kernel args), VBK_ACCEL (auto|tcg|kvm), VBK_LOG (console copy).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 SOCK[,SOCK2...] [extra qemu args...]" >&2; exit 2; }
socks=$1; shift
out=${VBK_OUT:-$here/out}
for f in vmlinuz initramfs.gz; do
    [ -s "$out/$f" ] || { echo "run-qemu-blk: $out/$f missing: run tests/guest/build-image.sh" >&2; exit 2; }
done
command -v qemu-system-x86_64 >/dev/null ||
    { echo "run-qemu-blk: qemu-system-x86_64 missing: run tests/guest/install-deps.sh" >&2; exit 2; }

# /dev/kvm from kvm_pvm (or no VMX/SVM) cannot boot a stock kernel: use TCG.
accel=${VBK_ACCEL:-auto}
if [ "$accel" = auto ]; then
    if [ -e /sys/module/kvm_pvm ] || ! grep -qwE 'svm|vmx' /proc/cpuinfo || [ ! -w /dev/kvm ]; then
        accel=tcg; else accel=kvm; fi
fi
case "$accel" in
    tcg) accel_args=(-accel tcg,thread=multi -cpu max) ;;
    kvm) accel_args=(-accel kvm -cpu host) ;;
    *) echo "run-qemu-blk: bad VBK_ACCEL=$accel" >&2; exit 2 ;;
esac

# VBK_QUEUES unset: 2; set but empty: no num-queues (QEMU's default, one
# queue per vCPU).
queues=${VBK_QUEUES-2}
disks=(); i=0
for s in ${socks//,/ }; do
    disks+=(-chardev "socket,id=c$i,path=$s"
            -device "vhost-user-blk-pci,chardev=c$i${queues:+,num-queues=$queues}")
    i=$((i + 1))
done

log=${VBK_LOG:-$(mktemp)}
echo "run-qemu-blk: accel=$accel disks=$i timeout=${VBK_TIMEOUT:-240}s" >&2
set +e
# Memory is a shared memfd so the vhost-user backend can map it.
timeout -k 5 "${VBK_TIMEOUT:-240}" qemu-system-x86_64 \
    "${accel_args[@]}" -smp "${VBK_SMP:-2}" -m "${VBK_MEM:-512M}" \
    -object "memory-backend-memfd,id=mem,size=${VBK_MEM:-512M},share=on" \
    -machine q35,memory-backend=mem \
    -nodefaults -nographic -serial stdio -no-reboot \
    -kernel "$out/vmlinuz" -initrd "$out/initramfs.gz" \
    -append "console=ttyS0 quiet panic=-1 vbk.test=${VBK_TEST:-blk} ${VBK_APPEND:-}" \
    "${disks[@]}" "$@" </dev/null 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" = 124 ] && echo "run-qemu-blk: TIMEOUT after ${VBK_TIMEOUT:-240}s" >&2
grep -q 'VBK-DONE status=ok' "$log" && ok=1 || ok=0
[ -n "${VBK_LOG:-}" ] || rm -f "$log"
[ "$ok" = 1 ] || { echo "run-qemu-blk: guest did not report VBK-DONE status=ok (qemu rc=$rc)" >&2; exit 1; }
