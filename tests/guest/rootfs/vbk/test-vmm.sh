#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# vmm test: boot an L2 guest with our vmm-example (runs inside the L1 guest
# of tests/guest/run-vmm.sh, or directly on a host whose KVM is real).
# Settings come from $VMM_PLAN (default /vmm/plan, a sourced file):
#   VMM_DEVICES   devices in guest order: disk disk-ro vhost-user-blk qsd-blk rng rng-vhost-user
#                 console console-vhost-user (host side: a file for the guest's
#                 output, a FIFO typed into once the guest has written)
#   VMM_VCPUS (2) VMM_MEM_MIB (256) VMM_DISK_MIB (64)
#   VMM_QSD_QUEUES (2: queues of a qsd-blk disk)
#   VMM_L2_VMM (vmm; qemu: QEMU runs the L2 guest, virtio-pci disks)
#   VMM_L2_TEST (blk,rng)  VMM_L2_APPEND (extra L2 kernel args)
#   VMM_DIR (/vmm: bin/, vmlinuz, initramfs.gz)  VMM_WORK (/tmp/vmm)
#   VMM_SCENARIO  boot (default), snapshot (test-vmm-snapshot.sh instead) or
#                 livemig (test-vmm-livemig.sh)
# The L2 console is echoed with an "L2| " prefix. Prints
#   VBK-RESULT vmm=ok|fail rc=N run_cs=N devices=...
plan=${VMM_PLAN:-/vmm/plan}
[ -f "$plan" ] && . "$plan"
case "${VMM_SCENARIO:-boot}" in
    snapshot) exec sh "$(dirname "$0")/test-vmm-snapshot.sh" ;;
    livemig) exec sh "$(dirname "$0")/test-vmm-livemig.sh" ;;
esac
dir=${VMM_DIR:-/vmm}; bin=$dir/bin; work=${VMM_WORK:-/tmp/vmm}
mib=${VMM_DISK_MIB:-64}
mkdir -p "$work"
cr=$(printf '\r')

now_cs() { local up f; read -r up _ </proc/uptime; f=${up#*.}; f=${f#0}; echo $((${up%.*} * 100 + f)); }
qsd=$bin/qemu-storage-daemon; [ -x "$qsd" ] || qsd=$(command -v qemu-storage-daemon)

args= qargs= socks= pids= holders= consoles= i=0
for d in ${VMM_DEVICES:-disk rng}; do
    img=$work/disk$i.img sock=$work/dev$i.sock
    case "$d" in
        disk|disk-ro|vhost-user-blk|qsd-blk) rm -f "$img"; truncate -s "${mib}M" "$img" ;;
    esac
    case "$d" in
        disk) args="$args --disk $img"
            qargs="$qargs -drive file=$img,format=raw,if=none,id=d$i -device virtio-blk-pci,drive=d$i,num-queues=2" ;;
        disk-ro) args="$args --disk $img,read-only" ;;
        vhost-user-blk)
            "$bin/vhost-user-blk" --socket "$sock" --image "$img" --queues 2 >"$work/dev$i.log" 2>&1 &
            pids="$pids $!"; args="$args --disk-vhost-user $sock"; socks="$socks $sock"
            qargs="$qargs -chardev socket,id=c$i,path=$sock -device vhost-user-blk-pci,chardev=c$i,num-queues=2" ;;
        qsd-blk)
            [ -n "$qsd" ] || { echo "vbk-vmm: qemu-storage-daemon missing"; exit 1; }
            "$qsd" --blockdev "driver=file,node-name=f$i,filename=$img" \
                --export "type=vhost-user-blk,id=e$i,node-name=f$i,addr.type=unix,addr.path=$sock,writable=on,num-queues=${VMM_QSD_QUEUES:-2}" \
                >"$work/dev$i.log" 2>&1 &
            pids="$pids $!"; args="$args --disk-vhost-user $sock"; socks="$socks $sock"
            qargs="$qargs -chardev socket,id=c$i,path=$sock -device vhost-user-blk-pci,chardev=c$i,num-queues=${VMM_QSD_QUEUES:-2}" ;;
        rng) args="$args --rng"; qargs="$qargs -device virtio-rng-pci" ;;
        rng-vhost-user)
            "$bin/vhost-user-rng" --socket "$sock" >"$work/dev$i.log" 2>&1 &
            pids="$pids $!"; args="$args --rng-vhost-user $sock" ;;
        console|console-vhost-user)
            fifo=$work/hvc$i.in out=$work/hvc$i.out
            rm -f "$fifo"; mkfifo "$fifo"; : >"$out"
            # Holds the FIFO open for writing, so its reader never sees EOF.
            sleep 100000 >"$fifo" & holders="$holders $!"
            consoles="$consoles $i"
            if [ "$d" = console ]; then
                args="$args --console $out,input=$fifo"
            else
                "$bin/vhost-user-console" --socket "$sock" <"$fifo" >"$out" 2>"$work/dev$i.log" &
                pids="$pids $!"; args="$args --console-vhost-user $sock"
            fi
            # Type a line once the guest has written to this console.
            ( n=0; while ! grep -q VBK-HVC-OUT "$out" 2>/dev/null; do
                  sleep 0.2; n=$((n + 1)); [ $n -gt 1500 ] && exit 0; done
              echo "VBK-HVC-IN console$i" >"$fifo" ) &
            holders="$holders $!" ;;
        *) echo "vbk-vmm: unknown device '$d'"; exit 1 ;;
    esac
    i=$((i + 1))
done

echo "vbk-vmm: vmm-example --vcpus ${VMM_VCPUS:-2} --mem-mib ${VMM_MEM_MIB:-256}$args"
t0=$(now_cs)
# Watchdog: a guest that stops making progress is reported with what the
# backends last logged, then ended, instead of running into the outer
# timeout with nothing to show.
rm -f "$work/vmm-done"
( sleep "${VMM_WATCHDOG_S:-240}"
  [ -e "$work/vmm-done" ] && exit 0
  echo "vbk-vmm: WATCHDOG: vmm-example still running after ${VMM_WATCHDOG_S:-240}s"
  # The VMM logs a stall report (VBK-STALL-REPORT lines, per device and
  # queue) on SIGUSR2; give it a moment before it is ended.
  kill -USR2 $(pidof vmm-example) 2>/dev/null; sleep 3
  kill $(pidof qemu-system-x86_64) 2>/dev/null
  echo "vbk-vmm: WATCHDOG: last L2 console lines:"; tail -n 15 "$work/l2.log" | sed 's/^/watchdog l2: /'
  for f in "$work"/dev*.log; do [ -s "$f" ] && sed "s|^|watchdog ${f##*/}: |" "$f" | tail -n 20; done
  kill $(pidof vmm-example) 2>/dev/null ) &
watchdog=$!
# shellcheck disable=SC2086 # $args is a list of words on purpose
l2_cmdline="console=ttyS0 quiet panic=-1 vbk.test=${VMM_L2_TEST:-blk,rng} ${VMM_L2_APPEND:-}"
if [ "${VMM_L2_VMM:-vmm}" = qemu ]; then
    # The environment's baseline: QEMU runs the same guest, same disks.
    # QEMU does not retry a chardev that is not listening yet: wait (up to
    # 10 s each) for the backends' sockets.
    for s in $socks; do n=0; while [ ! -S "$s" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done; done
    { "$bin/qemu-system-x86_64" -enable-kvm -cpu host -smp "${VMM_VCPUS:-2}" -m "${VMM_MEM_MIB:-256}" \
        -object "memory-backend-memfd,id=mem,size=${VMM_MEM_MIB:-256}M,share=on" \
        -machine q35,memory-backend=mem -L "$dir/qemu-share" \
        -nodefaults -nographic -serial stdio -no-reboot \
        -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.gz" -append "$l2_cmdline" $qargs </dev/null 2>&1
      echo $? >"$work/rc"; } |
    while IFS= read -r line; do line=${line%"$cr"}; echo "L2| $line"; echo "$line" >>"$work/l2.log"; done
else
{ "$bin/vmm-example" --kernel "$dir/vmlinuz" --initrd "$dir/initramfs.gz" \
    --cmdline "$l2_cmdline" \
    --vcpus "${VMM_VCPUS:-2}" --mem-mib "${VMM_MEM_MIB:-256}" $args 2>&1
  echo $? >"$work/rc"; } |
    while IFS= read -r line; do line=${line%"$cr"}; echo "L2| $line"; echo "$line" >>"$work/l2.log"; done
fi
t1=$(now_cs)
touch "$work/vmm-done"; kill "$watchdog" 2>/dev/null
rc=$(cat "$work/rc" 2>/dev/null || echo 255)
for p in $pids $holders; do kill "$p" 2>/dev/null; done
for p in $pids; do wait "$p" 2>/dev/null; done
for c in $consoles; do
    # What the guest wrote on that console, as the host got it.
    got=$(grep -o 'VBK-HVC-OUT [^ ]*' "$work/hvc$c.out" 2>/dev/null | head -n1)
    echo "VBK-RESULT console-host dev=$c got=${got:-nothing}"
done
for f in "$work"/dev*.log; do [ -s "$f" ] && sed "s|^|backend ${f##*/}: |" "$f" | tail -n 5; done
status=fail
[ "$rc" = 0 ] && grep -q 'VBK-DONE status=ok' "$work/l2.log" 2>/dev/null && status=ok
echo "VBK-RESULT vmm=$status rc=$rc run_cs=$((t1 - t0)) devices=$(echo ${VMM_DEVICES:-disk rng} | tr ' ' ,)"
[ "$status" = ok ]
