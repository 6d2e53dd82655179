#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# vmm snapshot test (run by test-vmm.sh when VMM_SCENARIO=snapshot): an L2
# guest writing numbered records (test-writeloop.sh) is saved and resumed
# twice by vmm-example, its disk and its console changing homes each time:
#   run 1: --disk --console (in process)               ... SIGUSR1 -> vm1.snap
#   run 2: --restore-from vm1.snap --disk-vhost-user --console-vhost-user
#          (vhost-user-blk and vhost-user-console processes) ... SIGUSR1 -> vm2.snap
#   run 3: --restore-from vm2.snap --disk --console (in process again)
# then the stop block ends the guest's loop; the guest reads each record back
# as it goes, and this script checks every record in the image at the end.
# The console: once the guest has opened /dev/hvc0, the host types 2 MiB
# into a FIFO every run's console reads, and the guest reads them only after
# its loop (vbk.wl.hvc; see hvc-feed.sh): at each cut the device holds some
# of it, its own state, which crosses the cut (through DEVICE_STATE over
# vhost-user); the rest waits in the FIFO. The guest must read every byte,
# in order (md5).
# Prints the runs' consoles ("L2| "), per cut "VBK-VMSNAP-CUT ..." and
#   VBK-VMSNAP cuts=2 in_flight_at_cuts=a,b queued_at_cuts=a,b lost=N ...
#   VBK-VMSNAP-CONSOLE sent=N received=N md5=match|mismatch state_at_cuts=a,b ...
#   VBK-RESULT vmm=ok|fail scenario=snapshot ...
plan=${VMM_PLAN:-/vmm/plan}
[ -f "$plan" ] && . "$plan"
dir=${VMM_DIR:-/vmm}; bin=$dir/bin; work=${VMM_WORK:-/tmp/vmm}
mkdir -p "$work"
img=$work/disk.img sock=$work/blk.sock
per=64 ctl=12288 tag=vmsnap
rm -f "$img"; truncate -s "${VMM_DISK_MIB:-64}M" "$img"
csock=$work/console.sock
rm -f "$work"/hvc[123].out
. "$(dirname "$0")/hvc-feed.sh"
hvc_setup "$work" "$work/hvc1.out"

. "$(dirname "$0")/scenario.sh"
fail() { echo "vbk-vmsnap: FAIL: $*"; result=fail; }
vmm() { "$bin/vmm-example" "$@" >>"$log" 2>&1 & pid=$!; }
result=ok

# cut_vm N RECORDS HOME: wait until writer 0 has done RECORDS records, then SIGUSR1
# the VMM and check that it saved the VM.
cut_vm() {
    if ! wait_for "$log" "VBK-WL progress w=0 k=$2 " 240; then
        fail "run $1: the guest did not reach record $2"; kill "$pid"; wait "$pid"; return 1
    fi
    t_cut=$(now_cs)
    kill -USR1 "$pid"; wait "$pid"; rc=$?
    t_saved=$(now_cs)
    line=$(grep -m1 ' saved to ' "$log")
    [ "$rc" = 0 ] && [ -n "$line" ] || { fail "run $1: save failed (rc=$rc)"; return 1; }
    inflight=$(echo "$line" | sed -n 's/.*, \([0-9]*\) request(s) in flight.*/\1/p')
    queued=$(echo "$line" | sed -n 's/.* and \([0-9]*\) queued at the cut.*/\1/p')
    state=$(echo "$line" | sed -n 's/.*state \([0-9]*\) bytes.*/\1/p')
    save_ms=$(echo "$line" | sed -n 's/.*; \([0-9.]*\) ms in all.*/\1/p')
    snap_kib=$(du -k "$work/vm$1.snap" | cut -f1)
    cstate=$(grep -m1 'device 1 (console' "$log" | sed -n 's/.*: \([0-9]*\) bytes of its own state.*/\1/p')
    echo "VBK-VMSNAP-CUT n=$1 home=$3 in_flight=$inflight queued=$queued state_bytes=$state console_state=${cstate:-none} file_kib=$snap_kib save_ms=$save_ms signal_to_exit_ms=$(((t_saved - t_cut) * 10))"
    cuts_cstate="$cuts_cstate${cuts_cstate:+,}${cstate:-0}"
    [ "${cstate:-0}" -gt 0 ] || fail "cut $1: the console had no state of its own to carry (nothing crossed)"
    cuts_inflight="$cuts_inflight${cuts_inflight:+,}$inflight"
    cuts_queued="$cuts_queued${cuts_queued:+,}$queued"
    cuts_kib="$cuts_kib${cuts_kib:+,}$snap_kib"
}

# restored N: the restore time the VMM logged, and the downtime: from the
# SIGUSR1 of the previous cut until this VMM has restored the VM (saving,
# starting the next process and any backend, restoring).
restored() {
    if ! wait_for "$log" 'restored from' 60; then fail "run $1: restore failed"; return 1; fi
    t_up=$(now_cs)
    ms=$(grep -m1 'restored from' "$log" | sed -n 's/.* in \([0-9.]*\) ms.*/\1/p')
    restore_ms="$restore_ms${restore_ms:+,}$ms"
    downtime_ms="$downtime_ms${downtime_ms:+,}$(((t_up - t_cut) * 10))"
}

append="console=ttyS0 quiet panic=-1 vbk.test=writeloop vbk.wl.tag=$tag vbk.wl.workers=2 vbk.wl.per=$per vbk.wl.ctl=$ctl vbk.wl.secs=400 vbk.wl.hvc=$hvc_bytes"
common="--snapshot-to"
t0=$(now_cs)

log=$work/run1.log
echo "vbk-vmsnap: run 1: boot, disk in process"
vmm --kernel "$dir/vmlinuz" --initrd "$dir/initramfs.gz" --cmdline "$append" \
    --vcpus "${VMM_VCPUS:-2}" --mem-mib "${VMM_MEM_MIB:-256}" --disk "$img" \
    --console "$work/hvc1.out,input=$hvc_fifo" $common "$work/vm1.snap"
cut_vm 1 16 in-process
show "$log"

if [ "$result" = ok ]; then
    log=$work/run2.log
    echo "vbk-vmsnap: run 2: restore, disk and console served by vhost-user-blk and vhost-user-console"
    "$bin/vhost-user-blk" --socket "$sock" --image "$img" --queues 2 >"$work/daemon.log" 2>&1 &
    dpid=$!
    "$bin/vhost-user-console" --socket "$csock" <"$hvc_fifo" >"$work/hvc2.out" 2>"$work/console.log" &
    cpid=$!
    i=0; while { [ ! -S "$sock" ] || [ ! -S "$csock" ]; } && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    vmm --restore-from "$work/vm1.snap" --disk-vhost-user "$sock" --console-vhost-user "$csock" \
        $common "$work/vm2.snap"
    restored 2 && cut_vm 2 32 vhost-user
    show "$log"
    kill "$dpid" "$cpid" 2>/dev/null; wait "$dpid" 2>/dev/null; wait "$cpid" 2>/dev/null
    sed 's|^|backend: |' "$work/daemon.log" | tail -n 5
    sed 's|^|console backend: |' "$work/console.log" | tail -n 5
fi

if [ "$result" = ok ]; then
    log=$work/run3.log
    echo "vbk-vmsnap: run 3: restore, disk in process again"
    vmm --restore-from "$work/vm2.snap" --disk "$img" --console "$work/hvc3.out,input=$hvc_fifo"
    restored 3
    if wait_for "$log" "VBK-WL progress w=0 k=48 " 240; then
        printf 'VBK-STOP\n' | dd of="$img" bs=4096 seek=$ctl conv=notrunc 2>/dev/null
    else
        fail "run 3: the guest did not reach record 48"; kill "$pid"
    fi
    wait "$pid"; rc=$?
    show "$log"
    [ "$rc" = 0 ] || fail "run 3: vmm-example exited with $rc"
fi

# Every record the guest reported must be in the image, in its slot.
image_of() { echo "$img"; }
check_records "$tag" "$per" image_of "$work"/run*.log
# The console: every byte the host typed, read by the guest in run 3.
hvc_extra="state_at_cuts=$cuts_cstate " hvc_check VBK-VMSNAP-CONSOLE "$work/hvc3.out" "$work"/run*.log
maxgap=$(echo "$res" | sed -n 's/.* maxgap_ms=\([0-9]*\).*/\1/p')
echo "VBK-VMSNAP cuts=2 in_flight_at_cuts=$cuts_inflight queued_at_cuts=$cuts_queued lost=$lost records=$records verified=$verified errors=$errors snapshot_kib=$cuts_kib restore_ms=$restore_ms downtime_ms=$downtime_ms guest_maxgap_ms=$maxgap total_cs=$(($(now_cs) - t0))"
echo "VBK-RESULT vmm=$result scenario=snapshot"
[ "$result" = ok ]
