#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Boot the nested VMM again and again and count the boots that fail.
#   tests/guest/boot-loop.sh [-n BOOTS] [-l L1_VCPUS] [-- DEVICE...]
# With VBK_L2_VMM=qemu, QEMU runs the same L2 guest and disks instead of
# vmm-example: the environment's own failure rate, for comparison.
# Devices default to the three disk homes and an rng:
#   disk vhost-user-blk qsd-blk rng
# Each boot is one tests/guest/run-vmm.sh; the console of every failed boot
# is kept in $VBK_LOOP_DIR (tests/guest/out/loop-<time>/) with its stall
# report (VBK-STALL-REPORT lines), and one line per boot is printed:
#   VBK-LOOP boot=3 l1_vcpus=1 result=ok|fail secs=41 stalled=vdc,... reason=...
# and at the end
#   VBK-LOOP-SUMMARY boots=30 ok=30 failed=0 l1_vcpus=1 devices=...
# Not part of the suite (30 boots take about half an hour nested); the
# README's "Stall hunting" paragraph says how it is used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
boots=30 l1=1
while [ $# -gt 0 ]; do
    case "$1" in
        -n) boots=$2; shift 2 ;;
        -l) l1=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "usage: $0 [-n BOOTS] [-l L1_VCPUS] [-- DEVICE...]" >&2; exit 2 ;;
    esac
done
devices=${*:-disk vhost-user-blk qsd-blk rng}
dir=${VBK_LOOP_DIR:-$here/out/loop-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
ok=0 failed=0
for i in $(seq 1 "$boots"); do
    log=$dir/boot-$i.log
    t0=$(date +%s)
    set +e
    VBK_L1_VCPUS=$l1 VBK_LOG=$log "$here/run-vmm.sh" $devices >/dev/null 2>"$dir/boot-$i.err"
    rc=$?
    set -e
    secs=$(( $(date +%s) - t0 ))
    if [ "$rc" = 0 ]; then
        ok=$((ok + 1)); result=ok; rm -f "$log" "$dir/boot-$i.err"; stalled=-; reason=-
    else
        failed=$((failed + 1)); result=fail
        # Disks with no result line are the ones that stalled.
        stalled=
        n=0
        for d in $devices; do
            case "$d" in rng|rng-vhost-user) continue ;; esac
            name=vd$(printf "\\x$(printf %x $((97 + n)))"); n=$((n + 1))
            grep -q "VBK-RESULT disk=$name " "$log" 2>/dev/null || stalled="$stalled${stalled:+,}$name"
        done
        stalled=${stalled:--}
        if grep -q 'guest stopped (Reset)' "$log" 2>/dev/null; then reason=guest-reset
        elif grep -q 'WATCHDOG' "$log" 2>/dev/null; then reason=watchdog
        elif grep -q 'TIMEOUT' "$dir/boot-$i.err" 2>/dev/null; then reason=timeout
        else reason=other; fi
    fi
    echo "VBK-LOOP boot=$i l1_vcpus=$l1 l2_vmm=${VBK_L2_VMM:-vmm} result=$result secs=$secs stalled=$stalled reason=$reason"
done
echo "VBK-LOOP-SUMMARY boots=$boots ok=$ok failed=$failed l1_vcpus=$l1 l2_vmm=${VBK_L2_VMM:-vmm} devices=$(echo $devices | tr ' ' ,) logs=$dir"
