#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk benchmark, for every writable virtio disk /dev/vd*, all O_DIRECT, one
# request in flight (dd):
#   seqread   VBK_BENCH_MIB MiB (16) in 1 MiB reads
#   seqwrite  the same in 1 MiB writes
#   read4k    VBK_BENCH_OPS (2048) sequential 4 KiB reads
# in a region at VBK_BENCH_OFF_MIB (40) MiB, clear of what test-blk.sh leaves
# for the host to check. One warm-up round first (not counted: the first
# disk touched would otherwise pay for faulting in the guest's buffers),
# then VBK_BENCH_ROUNDS rounds (3; kernel argument vbk.rounds=N), the disk order rotated each round so no
# disk always goes first. Prints per run
#   VBK-BENCH round=R disk=vda pattern=seqread value=N unit=kBps
# and per disk the medians over the rounds
#   VBK-BENCH-MEDIAN disk=vda seqread_kBps=N seqwrite_kBps=N read4k_iops=N
mib=${VBK_BENCH_MIB:-16}; ops=${VBK_BENCH_OPS:-2048}
off=${VBK_BENCH_OFF_MIB:-40}; rounds=${VBK_BENCH_ROUNDS:-3}

now_cs() { local up f; read -r up _ </proc/uptime; f=${up#*.}; f=${f#0}; echo $((${up%.*} * 100 + f)); }

# run DISK PATTERN: prints the value (kB/s or IOPS), or "fail".
run() {
    local dev=/dev/$1 t0 t1 cs ok=1
    t0=$(now_cs)
    case "$2" in
        seqread) dd if=$dev of=/dev/null bs=1M count=$mib skip=$off iflag=direct 2>/dev/null || ok=0 ;;
        seqwrite) dd if=/tmp/bench.src of=$dev bs=1M count=$mib seek=$off oflag=direct 2>/dev/null || ok=0 ;;
        read4k) dd if=$dev of=/dev/null bs=4096 count=$ops skip=$((off * 256)) iflag=direct 2>/dev/null || ok=0 ;;
    esac
    t1=$(now_cs); cs=$((t1 - t0)); [ "$cs" -gt 0 ] || cs=1
    [ "$ok" = 1 ] || { echo fail; return; }
    case "$2" in
        read4k) echo $((ops * 100 / cs)) ;;
        *) echo $((mib * 1024 * 100 / cs)) ;;
    esac
}

median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "fail" }'; }

disks=
for d in $(ls /sys/block | grep '^vd'); do
    size=$(($(cat /sys/block/$d/size) * 512))
    [ "$(cat /sys/block/$d/ro)" = 0 ] && [ "$size" -ge $(((off + mib) * 1048576)) ] && disks="$disks $d"
done
[ -n "$disks" ] || { echo "VBK-BENCH error=no-writable-disk-of-$((off + mib))MiB"; exit 1; }
dd if=/dev/urandom of=/tmp/bench.src bs=1M count=$mib 2>/dev/null
set -- $disks; n=$#
rc=0
for r in $(seq 0 "$rounds"); do
    # Rotate: round r starts with disk number r mod n.
    order=
    for d in $disks; do order="$order $d"; done
    k=$((r % n)); while [ $k -gt 0 ]; do set -- $order; first=$1; shift; order="$* $first"; k=$((k - 1)); done
    for d in $order; do
        for p in seqread seqwrite read4k; do
            v=$(run $d $p)
            [ "$v" = fail ] && rc=1
            [ "$r" = 0 ] && continue
            unit=kBps; [ $p = read4k ] && unit=iops
            echo "VBK-BENCH round=$r disk=$d pattern=$p value=$v unit=$unit"
            eval "res_${d}_$p=\"\$res_${d}_$p $v\""
        done
    done
done
for d in $disks; do
    sr=$(eval echo "\$res_${d}_seqread" | median)
    sw=$(eval echo "\$res_${d}_seqwrite" | median)
    rk=$(eval echo "\$res_${d}_read4k" | median)
    echo "VBK-BENCH-MEDIAN disk=$d rounds=$rounds seqread_kBps=$sr seqwrite_kBps=$sw read4k_iops=$rk"
done
rm -f /tmp/bench.src
exit $rc
