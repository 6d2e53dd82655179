#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# writeloop test: numbered, self-describing 4 KiB records written to /dev/vda
# with O_DIRECT and read back (O_DIRECT) at once, until the host asks to stop.
# Used by tests/qemu_restart.rs (backend killed mid-I/O) and
# tests/qemu_migration.rs (live migration mid-I/O).
#
# Kernel command line knobs:
#   vbk.wl.tag=T      7-character tag written into every record (default writelp)
#   vbk.wl.workers=N  parallel writers, each pinned to CPU (i % ncpu) (default 2)
#   vbk.wl.per=N      record slots per writer (default 4096)
#   vbk.wl.ctl=B      4 KiB block the host writes "VBK-STOP" into (default 12288 = 48 MiB)
#   vbk.wl.secs=N     give up after N seconds even without a stop (default 150)
#   vbk.wl.stall=CS   report completion gaps >= CS centiseconds (default 50)
#   vbk.wl.devs=L     comma-separated disks; writer w writes to disk w mod n
#                     (default vda; the stop block is always read from the first)
#   vbk.wl.hvc=N      open /dev/hvc0 at the start (raw) and write
#                     "VBK-HVC-OUT from=hvc0 ready" on it, but read nothing
#                     until the loop is over: what the host types meanwhile
#                     waits in the tty, the guest's receive buffers and the
#                     device. Then read N bytes and write one line back
#                     (default 0: no console). Open, because the driver
#                     throws input away while nobody has the port open.
# Record slot of writer w, record k: w*per + k (4 KiB each, from offset 0),
# on writer w's disk.
# Each record is 64 identical 64-byte lines:
#   "VBK-WREC v1 tag=T w=W k=KKKKKK slot=SSSSSS " padded with '.' to 63, '\n'.
# Output:
#   VBK-WL start tag=T workers=N per=N ctl=B
#   VBK-WL progress w=W k=K t_cs=N            (every 8 records)
#   VBK-STALL tag=T w=W k=K at_cs=N gap_ms=N  (a completion gap >= stall)
#   VBK-HVC-READ bytes=N md5=M                (with vbk.wl.hvc; on hvc0 too, as VBK-HVC-OUT)
#   VBK-RESULT T records=N errors=N counts=K0,K1 maxgap_ms=N stalls=N stop=marker|deadline|full
if [ "$1" = worker ]; then
    w=$2 tag=$3 per=$4 ctl=$5 deadline=$6 stall=$7 dev=/dev/$8 ctldev=/dev/$9
    nl='
'
    tick() { read -r up _ </proc/uptime; f=${up#*.}; f=${f#0}; T=$((${up%.*} * 100 + f)); }
    k=0 err=0 maxgap=0 stalls=0 stop=full
    tick; last=$T
    while [ "$k" -lt "$per" ]; do
        slot=$((w * per + k))
        k6=$((1000000 + k)); s6=$((1000000 + slot))
        s="VBK-WREC v1 tag=$tag w=$w k=${k6#1} slot=${s6#1} "
        if [ -z "$pad" ]; then # all records have the same length: pad once
            pad=; n=${#s}; while [ "$n" -lt 63 ]; do pad="$pad."; n=$((n + 1)); done
        fi
        b="$s$pad$nl"; b=$b$b; b=$b$b; b=$b$b; b=$b$b; b=$b$b; b=$b$b
        printf '%s' "$b" >/tmp/rec.$w
        if ! dd if=/tmp/rec.$w of=$dev bs=4096 seek=$slot count=1 oflag=direct conv=notrunc 2>/tmp/err.$w; then
            err=$((err + 1)); echo "VBK-WL-ERR w=$w k=$k write: $(cat /tmp/err.$w)"
        elif ! dd if=$dev of=/tmp/rd.$w bs=4096 skip=$slot count=1 iflag=direct 2>/tmp/err.$w; then
            err=$((err + 1)); echo "VBK-WL-ERR w=$w k=$k read: $(cat /tmp/err.$w)"
        elif ! cmp -s /tmp/rec.$w /tmp/rd.$w; then
            err=$((err + 1)); echo "VBK-WL-ERR w=$w k=$k verify: $(cmp /tmp/rec.$w /tmp/rd.$w 2>&1 | head -n1)"
        fi
        k=$((k + 1))
        tick; gap=$((T - last)); last=$T
        [ "$gap" -gt "$maxgap" ] && maxgap=$gap
        if [ "$gap" -ge "$stall" ]; then
            stalls=$((stalls + 1)); echo "VBK-STALL tag=$tag w=$w k=$k at_cs=$T gap_ms=$((gap * 10))"
        fi
        if [ $((k % 8)) = 0 ]; then
            echo "VBK-WL progress w=$w k=$k t_cs=$T"
            if dd if=$ctldev of=/tmp/ctl.$w bs=4096 skip=$ctl count=1 iflag=direct 2>/dev/null; then
                read -r c _ </tmp/ctl.$w
                [ "$c" = VBK-STOP ] && { stop=marker; break; }
            fi
            [ "$T" -ge "$deadline" ] && { stop=deadline; break; }
        fi
    done
    echo "$k $err $maxgap $stalls $stop" >/tmp/res.$w
    exit 0
fi

tag=writelp workers=2 per=4096 ctl=12288 secs=150 stall=50 hvc=0 devs=vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vbk.wl.tag=*) tag=${arg#*=} ;;
        vbk.wl.workers=*) workers=${arg#*=} ;;
        vbk.wl.per=*) per=${arg#*=} ;;
        vbk.wl.ctl=*) ctl=${arg#*=} ;;
        vbk.wl.secs=*) secs=${arg#*=} ;;
        vbk.wl.stall=*) stall=${arg#*=} ;;
        vbk.wl.hvc=*) hvc=${arg#*=} ;;
        vbk.wl.devs=*) devs=${arg#*=} ;;
    esac
done
devs=$(echo "$devs" | tr , ' '); ndevs=0
for d in $devs; do
    [ -b "/dev/$d" ] || { echo "VBK-RESULT $tag records=0 errors=1 error=no-$d"; exit 1; }
    ndevs=$((ndevs + 1))
done
ctldev=${devs%% *}
hvc_open=0
if [ "$hvc" -gt 0 ] && [ -c /dev/hvc0 ] && (exec 3<>/dev/hvc0) 2>/dev/null; then
    # Raw, so the tty passes every byte and echoes none back to the host.
    exec 3<>/dev/hvc0
    stty raw -echo <&3 2>/dev/null
    echo "VBK-HVC-OUT from=hvc0 ready" >&3
    hvc_open=1
fi
read -r up _ </proc/uptime
deadline=$(((${up%.*} + secs) * 100))
ncpu=$(nproc)
echo "VBK-WL start tag=$tag workers=$workers per=$per ctl=$ctl secs=$secs devs=$(echo $devs | tr ' ' ,)"
pids=
for w in $(seq 0 $((workers - 1))); do
    rm -f /tmp/res.$w
    set -- $devs; shift $((w % ndevs)); dev=$1
    taskset -c $((w % ncpu)) "$0" worker $w "$tag" "$per" "$ctl" "$deadline" "$stall" "$dev" "$ctldev" &
    pids="$pids $!"
done
for p in $pids; do wait "$p"; done
total=0 errs=0 maxgap=0 stalls=0 counts= stop=
for w in $(seq 0 $((workers - 1))); do
    if [ -f /tmp/res.$w ]; then read -r k e g s st </tmp/res.$w; else k=0 e=1 g=0 s=0 st=lost; fi
    total=$((total + k)); errs=$((errs + e)); stalls=$((stalls + s))
    [ "$g" -gt "$maxgap" ] && maxgap=$g
    counts="$counts${counts:+,}$k"; stop="$stop${stop:+,}$st"
done
sync
if [ "$hvc" -gt 0 ]; then
    if [ "$hvc_open" = 1 ]; then
        timeout 120 head -c "$hvc" <&3 >/tmp/hvc.in
        got=$(wc -c </tmp/hvc.in); sum=$(md5sum </tmp/hvc.in | cut -d' ' -f1)
        echo "VBK-HVC-OUT from=hvc0 bytes=$got md5=$sum" >&3
        exec 3>&-
        echo "VBK-HVC-READ bytes=$got md5=$sum"
    else
        echo "VBK-HVC-READ bytes=0 md5=none error=no-hvc0"
    fi
fi
echo "VBK-RESULT $tag records=$total errors=$errs counts=$counts maxgap_ms=$((maxgap * 10)) stalls=$stalls stop=$stop"
[ "$errs" = 0 ] && [ "$total" -gt 0 ]
