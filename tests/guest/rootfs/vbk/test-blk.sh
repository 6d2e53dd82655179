#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# blk test, for every virtio disk /dev/vd*:
#  1. write VBK_MIB MiB of /vbk/pattern.awk output at offset 0 with O_DIRECT,
#     split over one dd per CPU (pinned with taskset, so several queues see I/O),
#     each dd ending with fsync (a virtio-blk FLUSH);
#  2. BLKFLSBUF + drop caches, read it back with O_DIRECT, compare md5sums;
#  3. write the 4 KiB /vbk/marker.awk block at byte offset 32 MiB (if the disk
#     is big enough) and read it back.  The pattern and marker stay on the disk
#     so the host can check the backing file afterwards.
# Read-only disks: checks that writes are refused and reads work.
# Prints one line per disk:
#  VBK-RESULT disk=vda write=ok read=ok verify=ok bytes=N write_kBps=N read_kBps=N flush=ok marker=ok ...
MARKER_OFF=$((32 * 1048576))
mib=${VBK_MIB:-8}; seed=${VBK_SEED:-1}

now_cs() { # uptime in centiseconds
    local up f; read -r up _ </proc/uptime; f=${up#*.}; f=${f#0}
    echo $((${up%.*} * 100 + f))
}
kbps() { # bytes centiseconds -> kB/s
    local cs=$2; [ "$cs" -gt 0 ] || cs=1; echo $(($1 / 1024 * 100 / cs))
}

test_disk() {
    local d=$1 dev=/dev/$1 size ro q n bytes direct iflag oflag c per cnt pids pid t0 t1
    local w=fail fl=fail r=fail v=fail mk=skipped wk=0 rk=0 exp got
    size=$(($(cat /sys/block/$d/size) * 512)); ro=$(cat /sys/block/$d/ro)
    q=$(ls /sys/block/$d/mq 2>/dev/null | wc -l)
    n=$mib; [ $((n * 1048576)) -le "$size" ] || n=$((size / 1048576))
    bytes=$((n * 1048576))
    # O_DIRECT if the device takes it, otherwise rely on fsync + drop_caches.
    if dd if=$dev of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
        direct=1 iflag=iflag=direct oflag=oflag=direct
    else
        direct=0 iflag= oflag=
    fi
    local info="size=$size queues=$q ro=$ro direct=$direct"
    if [ "$n" -lt 1 ]; then
        echo "VBK-RESULT disk=$d write=fail read=fail verify=fail bytes=0 error=disk-too-small $info"; return 1
    fi

    if [ "$ro" = 1 ]; then
        # Writes must be refused; reads must work.
        if dd if=/dev/zero of=$dev bs=4096 count=1 $oflag 2>/dev/null; then w=accepted; else w=refused; fi
        t0=$(now_cs)
        dd if=$dev of=/tmp/rd.$d bs=1M count=$n $iflag 2>/dev/null && r=ok
        t1=$(now_cs); rk=$(kbps $bytes $((t1 - t0))); rm -f /tmp/rd.$d
        echo "VBK-RESULT disk=$d write=$w read=$r verify=n/a bytes=$bytes write_kBps=0 read_kBps=$rk $info"
        [ "$w" = refused ] && [ "$r" = ok ]; return
    fi

    t0=$(now_cs)
    awk -v seed=$seed -v disk=$d -v bytes=$bytes -f /vbk/pattern.awk >/tmp/pat.$d
    t1=$(now_cs)
    exp=$(md5sum </tmp/pat.$d); exp=${exp%% *}
    echo "VBK-TIMING gen_cs=$((t1 - t0)) md5_cs=$(($(now_cs) - t1))"

    # 1. parallel O_DIRECT writes, one contiguous chunk per CPU, each fsync'ed.
    c=$(nproc); [ "$c" -le "$n" ] || c=$n
    per=$((n / c)); pids=
    t0=$(now_cs)
    for i in $(seq 0 $((c - 1))); do
        cnt=$per; [ "$i" = $((c - 1)) ] && cnt=$((n - per * i))
        taskset -c $i dd if=/tmp/pat.$d of=$dev bs=1M skip=$((per * i)) seek=$((per * i)) \
            count=$cnt $oflag conv=fsync 2>/dev/null &
        pids="$pids $!"
    done
    w=ok; for pid in $pids; do wait $pid || w=fail; done
    t1=$(now_cs); wk=$(kbps $bytes $((t1 - t0)))
    # 2. flush again (sync + BLKFLSBUF), drop caches, read back and compare.
    sync && blockdev --flushbufs $dev && fl=ok
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(now_cs)
    dd if=$dev of=/tmp/rd.$d bs=1M count=$n $iflag 2>/dev/null && r=ok
    t1=$(now_cs); rk=$(kbps $bytes $((t1 - t0)))
    got=$(md5sum </tmp/rd.$d); got=${got%% *}
    if [ "$r" = ok ] && [ "$got" = "$exp" ]; then v=ok; else
        echo "vbk-blk: $d mismatch: $(cmp /tmp/pat.$d /tmp/rd.$d 2>&1 | head -n1)"
    fi
    rm -f /tmp/pat.$d /tmp/rd.$d
    # 3. the marker block the host checks afterwards.
    if [ "$size" -ge $((MARKER_OFF + 4096)) ]; then
        awk -v disk=$d -f /vbk/marker.awk >/tmp/mk.$d
        mk=fail
        dd if=/tmp/mk.$d of=$dev bs=4096 seek=$((MARKER_OFF / 4096)) count=1 $oflag conv=fsync 2>/dev/null &&
            dd if=$dev of=/tmp/mkr.$d bs=4096 skip=$((MARKER_OFF / 4096)) count=1 $iflag 2>/dev/null &&
            cmp -s /tmp/mk.$d /tmp/mkr.$d && mk=ok
        rm -f /tmp/mk.$d /tmp/mkr.$d
    fi
    echo "VBK-RESULT disk=$d write=$w read=$r verify=$v bytes=$bytes write_kBps=$wk read_kBps=$rk flush=$fl marker=$mk md5=$exp $info"
    [ "$w$r$v$fl" = okokokok ] && [ "$mk" != fail ]
}

disks=$(ls /sys/block | grep '^vd')
if [ -z "$disks" ]; then echo "VBK-RESULT disk=none error=no-virtio-disks"; exit 1; fi
rc=0
for d in $disks; do test_disk $d || rc=1; done
exit $rc
