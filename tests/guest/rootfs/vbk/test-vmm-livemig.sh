#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# vmm live-migration test (run by test-vmm.sh when VMM_SCENARIO=livemig): an
# L2 guest writing numbered records to two disks (test-writeloop.sh, writer 0
# on vda, writer 1 on vdb) is migrated live twice between vmm-example
# processes, its disks and its console changing homes:
#   vm1: vda in process (a.img), vdb from vhost-user-blk B (b.img), console
#        in process
#     --SIGUSR1--> vm2: vda from vhost-user-blk A (a.img), vdb from B kept,
#        console from vhost-user-console
#        cases: inproc-to-vhost-user (vda), vhost-user-kept (vdb),
#        console-inproc-to-vhost-user
#   on vm2, two migrations that must not happen, the guest writing on:
#     destination-gone: the destination is stopped, then killed mid-stream
#     refused-after-stop: the destination (given one device, not two)
#       refuses after the whole stream, when vm2 has already stopped
#   vm2 --SIGUSR1--> vm3: vda and the console in process again, vdb from B
#        kept; cases: vhost-user-to-inproc (vda), vhost-user-kept (vdb),
#        console-vhost-user-to-inproc
# The console carries host input the guest reads only at the end
# (hvc-feed.sh): at every cut some of it is the device's own state, which
# crosses in the migration stream (through DEVICE_STATE from and to
# vhost-user-console); the guest must read every byte, in order.
# then the host's stop block ends the guest's loop, and every record the
# guest reported is checked in the images.
# Prints the consoles ("L2| "), per migration
#   VBK-LIVEMIG case=... rounds=N ram_mib=N transferred_mib=N downtime_ms=N
#     (source: stop to accepted, plus destination: accepted to running)
#     total_s=N records=N lost=N
# per cancel "VBK-LIVEMIG-CANCEL kind=... resumed=yes|no", then
#   VBK-LIVEMIG-CONSOLE sent=N received=N lost=N md5=match|mismatch state_at_cuts=...
#   VBK-LIVEMIG-SUMMARY records=N verified=N lost=N errors=N guest_maxgap_ms=N
#   VBK-RESULT vmm=ok|fail scenario=livemig
plan=${VMM_PLAN:-/vmm/plan}
[ -f "$plan" ] && . "$plan"
dir=${VMM_DIR:-/vmm}; bin=$dir/bin; work=${VMM_WORK:-/tmp/vmm}
mkdir -p "$work"
imga=$work/a.img imgb=$work/b.img socka=$work/blk-a.sock sockb=$work/blk-b.sock
per=1024 ctl=12288 tag=livemig
rm -f "$imga" "$imgb" "$work"/mig*.sock "$work/runs" "$work"/hvc[123].out; : >"$work/runs"
csock=$work/console.sock
. "$(dirname "$0")/hvc-feed.sh"
hvc_setup "$work" "$work/hvc1.out"
truncate -s "${VMM_DISK_MIB:-64}M" "$imga" "$imgb"

. "$(dirname "$0")/scenario.sh"
fail() { echo "vbk-livemig: FAIL: $*"; result=fail; }
progress() { cat "$work"/vm*.log 2>/dev/null | grep -c "VBK-WL progress w=0 "; }
# more_progress N SECONDS: 0 once writer 0 has reported more than N times.
more_progress() {
    local n=$(($2 * 20))
    while [ "$n" -gt 0 ]; do
        [ "$(progress)" -gt "$1" ] && return 0
        sleep 0.05; n=$((n - 1))
    done
    return 1
}
field() { echo "$1" | sed -n "s/.* $2=\([0-9.]*\).*/\1/p"; }
result=ok

"$bin/vhost-user-blk" --socket "$sockb" --image "$imgb" --queues 2 >"$work/blk-b.log" 2>&1 &
bpid=$!
"$bin/vhost-user-blk" --socket "$socka" --image "$imga" --queues 2 --once >"$work/blk-a.log" 2>&1 &
apid=$!
i=0; while { [ ! -S "$socka" ] || [ ! -S "$sockb" ]; } && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done

append="console=ttyS0 quiet panic=-1 vbk.test=writeloop vbk.wl.tag=$tag vbk.wl.workers=2 vbk.wl.per=$per vbk.wl.ctl=$ctl vbk.wl.secs=500 vbk.wl.devs=vda,vdb vbk.wl.hvc=$hvc_bytes"
t0=$(now_cs)
echo "vbk-livemig: vm1: boot, vda in process, vdb from vhost-user-blk B"
"$bin/vmm-example" --kernel "$dir/vmlinuz" --initrd "$dir/initramfs.gz" --cmdline "$append" \
    --vcpus "${VMM_VCPUS:-2}" --mem-mib "${VMM_MEM_MIB:-256}" \
    --disk "$imga" --disk-vhost-user "$sockb" --console "$work/hvc1.out,input=$hvc_fifo" \
    --migrate-to "unix:$work/mig1.sock" >"$work/vm1.log" 2>&1 &
pid1=$!

# migrate N SRC_PID SRC_LOG DEST_LOG CASES: SIGUSR1 the source, check it
# ended after "migrated to", and that the destination runs the VM.
migrate() {
    local t rc line dest_ms src_ms
    t=$(now_cs)
    kill -USR1 "$2"; wait "$2"; rc=$?
    # What may only start once the source has let go of the VM.
    [ -n "$on_release" ] && $on_release
    on_release=
    line=$(grep -m1 'migrated to' "$3")
    if [ "$rc" != 0 ] || [ -z "$line" ]; then
        fail "migration $1: the source exited $rc without migrating"; show "$3"; return 1
    fi
    if ! wait_for "$4" 'restored from migration' 60; then
        fail "migration $1: the destination did not take over"; show "$4"; return 1
    fi
    dest_ms=$(grep -m1 'restored from migration' "$4" | sed -n 's/.* in \([0-9.]*\) ms.*/\1/p')
    src_ms=$(field "$line" downtime_ms)
    echo "VBK-LIVEMIG-RUN n=$1 cases=$5 rounds=$(field "$line" rounds) ram_mib=$(field "$line" ram_mib) transferred_mib=$(field "$line" transferred_mib) downtime_ms=$(( ${src_ms%.*} + ${dest_ms%.*} )) source_stop_to_accepted_ms=$src_ms destination_accepted_to_running_ms=$dest_ms precopy_ms=$(field "$line" precopy_ms) last_pages=$(field "$line" last_pages) total_s=$(( ($(now_cs) - t) / 100 ))" >>"$work/runs"
    echo "VBK-LIVEMIG-RUN n=$1 cases=$5 rounds=$(field "$line" rounds) ram_mib=$(field "$line" ram_mib) transferred_mib=$(field "$line" transferred_mib) downtime_ms=$(( ${src_ms%.*} + ${dest_ms%.*} )) source_stop_to_accepted_ms=$src_ms destination_accepted_to_running_ms=$dest_ms precopy_ms=$(field "$line" precopy_ms) last_pages=$(field "$line" last_pages) total_s=$(( ($(now_cs) - t) / 100 )) in_flight_at_cut=$(echo "$line" | sed -n 's/.*; \([0-9]*\) request(s) in flight.*/\1/p')"
}

if ! wait_for "$work/vm1.log" "VBK-WL progress w=0 k=8 " 300; then
    fail "vm1: the guest did not reach record 8"; kill "$pid1"
fi

if [ "$result" = ok ]; then
    echo "vbk-livemig: vm1 -> vm2: vda to vhost-user-blk A, vdb's daemon kept, console to vhost-user-console"
    "$bin/vmm-example" --migrate-from "unix:$work/mig1.sock" \
        --disk-vhost-user "$socka" --disk-vhost-user "$sockb" --console-vhost-user "$csock" \
        --migrate-to "unix:$work/mig2.sock" >"$work/vm2.log" 2>&1 &
    pid2=$!
    wait_for "$work/vm2.log" "waiting for a migration" 30 || fail "vm2 did not listen"
    # The console daemon reads the FIFO: it starts when vm1's console has
    # stopped reading it (vm2 retries its connection meanwhile).
    start_console() {
        "$bin/vhost-user-console" --socket "$csock" --once <"$hvc_fifo" >"$work/hvc2.out" 2>"$work/console.log" &
        cpid=$!
    }
    on_release=start_console
    [ "$result" = ok ] && migrate 1 "$pid1" "$work/vm1.log" "$work/vm2.log" "inproc-to-vhost-user,vhost-user-kept,console-inproc-to-vhost-user"
    show "$work/vm1.log"
fi

# cancel KIND DEST_ARGS...: a migration of vm2 that must not happen.
cancel() {
    local kind=$1 before dpid failures
    shift
    before=$(progress)
    failures=$(grep -c "the VM runs on here" "$work/vm2.log")
    "$bin/vmm-example" --migrate-from "unix:$work/mig2.sock" "$@" >"$work/x-$kind.log" 2>&1 &
    dpid=$!
    wait_for "$work/x-$kind.log" "waiting for a migration" 30 || fail "$kind: the destination did not listen"
    [ "$kind" = destination-gone ] && kill -STOP "$dpid"
    kill -USR1 "$pid2"
    if [ "$kind" = destination-gone ]; then
        sleep 1; kill -KILL "$dpid"; rm -f "$work/mig2.sock"
    fi
    wait "$dpid" 2>/dev/null
    n=1200
    while [ "$(grep -c "the VM runs on here" "$work/vm2.log")" -le "$failures" ] && [ "$n" -gt 0 ]; do
        sleep 0.05; n=$((n - 1))
    done
    resumed=no
    if kill -0 "$pid2" 2>/dev/null && more_progress "$before" 120; then resumed=yes; fi
    echo "VBK-LIVEMIG-CANCEL kind=$kind resumed=$resumed source_log=\"$(grep "the VM runs on here" "$work/vm2.log" | tail -n 1 | sed 's/.*failed; //')\""
    [ "$kind" = refused-after-stop ] && sed 's/^/refusing destination: /' "$work/x-$kind.log" | grep -i "refus" | head -n 2
    [ "$resumed" = yes ] || fail "$kind: the source did not go on writing"
}

if [ "$result" = ok ]; then
    cancel destination-gone --disk "$imga" --disk-vhost-user "$sockb" --console "$work/hvcx.out"
fi
if [ "$result" = ok ]; then
    cancel refused-after-stop --disk "$imga"
fi

if [ "$result" = ok ]; then
    echo "vbk-livemig: vm2 -> vm3: vda and the console in process again, vdb's daemon kept"
    "$bin/vmm-example" --migrate-from "unix:$work/mig2.sock" --disk "$imga" --disk-vhost-user "$sockb" \
        --console "$work/hvc3.out,input=$hvc_fifo" >"$work/vm3.log" 2>&1 &
    pid3=$!
    wait_for "$work/vm3.log" "waiting for a migration" 30 || fail "vm3 did not listen"
    [ "$result" = ok ] && migrate 2 "$pid2" "$work/vm2.log" "$work/vm3.log" "vhost-user-to-inproc,vhost-user-kept,console-vhost-user-to-inproc"
    show "$work/vm2.log"
    if [ "$result" = ok ]; then
        before=$(progress)
        more_progress $((before + 1)) 300 || fail "vm3: the guest did not go on writing"
        printf 'VBK-STOP\n' | dd of="$imga" bs=4096 seek=$ctl conv=notrunc 2>/dev/null
    else
        kill "$pid3" 2>/dev/null
    fi
    wait "$pid3"; rc=$?
    show "$work/vm3.log"
    [ "$rc" = 0 ] || fail "vm3: vmm-example exited with $rc"
fi
kill "$bpid" "$apid" "$cpid" 2>/dev/null; wait "$bpid" 2>/dev/null; wait "$apid" 2>/dev/null
wait "$cpid" 2>/dev/null
sed 's|^|console backend: |' "$work/console.log" 2>/dev/null | tail -n 4
sed 's|^|backend B: |' "$work/blk-b.log" | tail -n 4
sed 's|^|backend A: |' "$work/blk-a.log" | tail -n 4

# Every record the guest reported, in its slot on its writer's disk.
image_of() { if [ $(($1 % 2)) = 1 ]; then echo "$imgb"; else echo "$imga"; fi; }
check_records "$tag" "$per" image_of "$work"/vm*.log
# The console's own state at every cut (the two migrations and the refused
# one), and every byte the host typed read by the guest in vm3.
states=$(grep -h 'device 2 (console' "$work"/vm1.log "$work"/vm2.log | sed -n 's/.*: \([0-9]*\) bytes of its own state.*/\1/p' | tr '\n' ',')
states=${states%,}
for st in $(echo "$states" | tr , ' '); do
    [ "$st" -gt 0 ] || fail "console: a cut found no state of its own to carry (nothing crossed)"
done
[ -n "$states" ] || fail "console: no cut reported its state"
hvc_extra="state_at_cuts=$states " hvc_check VBK-LIVEMIG-CONSOLE "$work/hvc3.out" "$work"/vm*.log
maxgap=$(echo "$res" | sed -n 's/.* maxgap_ms=\([0-9]*\).*/\1/p')
total_s=$(( ($(now_cs) - t0) / 100 ))
# One line per case: the figures of its migration and the records of the
# whole run (every record crossed both migrations or was written between).
while read -r _ n cases rest; do
    for c in $(echo "${cases#cases=}" | tr , ' '); do
        echo "VBK-LIVEMIG case=$c run=${n#n=} $rest records=$records lost=$lost"
    done
done <"$work/runs"
echo "VBK-LIVEMIG-SUMMARY records=$records verified=$verified lost=$lost errors=$errors guest_maxgap_ms=$maxgap total_s=$total_s"
echo "VBK-RESULT vmm=$result scenario=livemig"
[ "$result" = ok ]
