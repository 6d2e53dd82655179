# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the vmm scenarios that move a virtio-console between homes
# (test-vmm-snapshot.sh, test-vmm-livemig.sh): host input the guest reads
# only at the end, so that at every cut some of it sits in the device's own
# state.
#
# hvc_setup WORK FIRST_OUT: 2 MiB of numbered lines in WORK/hvc.in, a FIFO
#   WORK/hvc.fifo every console of the test reads (held open here for the
#   whole test: a reader never sees end of file between homes, the typist
#   never a broken pipe), and the typist, who writes the whole input into
#   the FIFO once the guest has the port open (FIRST_OUT shows
#   "VBK-HVC-OUT from=hvc0 ready"; before that the driver throws input
#   away). That is more than the guest's tty and receive buffers hold (256
#   of 4 KiB), so the device holds some of it at each cut. Sets hvc_in,
#   hvc_fifo, hvc_bytes, hvc_md5, typist.
# hvc_check PREFIX LAST_OUT LOGS...: the guest read every byte, in order
#   (the md5 of its VBK-HVC-READ line in LOGS), and its line reached
#   LAST_OUT. Prints "PREFIX sent=N received=N lost=N md5=match|mismatch
#   ..." (with $hvc_extra appended) and calls fail on a mismatch.

hvc_setup() {
    hvc_in=$1/hvc.in hvc_fifo=$1/hvc.fifo
    awk -v n="${VMM_HVC_LINES:-32768}" \
        'BEGIN { for (i = 0; i < n; i++) printf "%-63s\n", sprintf("VBK-HVCIN %07d", i) }' >"$hvc_in"
    hvc_bytes=$(wc -c <"$hvc_in"); hvc_md5=$(md5sum <"$hvc_in" | cut -d' ' -f1)
    rm -f "$hvc_fifo"; mkfifo "$hvc_fifo"
    exec 6<>"$hvc_fifo"
    ( n=0; while ! grep -q "VBK-HVC-OUT from=hvc0 ready" "$2" 2>/dev/null; do
          sleep 0.1; n=$((n + 1)); [ "$n" -gt 2400 ] && exit 0; done
      cat "$hvc_in" >"$hvc_fifo" ) &
    typist=$!
}

hvc_check() {
    local prefix=$1 last=$2 hvc got sum match echoed
    shift 2
    kill "$typist" 2>/dev/null; exec 6>&-
    hvc=$(grep -h "VBK-HVC-READ" "$@" | tail -n 1)
    got=$(echo "$hvc" | sed -n 's/.*bytes=\([0-9]*\).*/\1/p')
    sum=$(echo "$hvc" | sed -n 's/.*md5=\([0-9a-f]*\).*/\1/p')
    match=mismatch; [ "$sum" = "$hvc_md5" ] && match=match
    echoed=$(grep -c "VBK-HVC-OUT from=hvc0 bytes=$hvc_bytes" "$last" 2>/dev/null)
    echo "$prefix sent=$hvc_bytes received=${got:-0} lost=$((hvc_bytes - ${got:-0})) md5=$match ${hvc_extra:-}guest_line_at_end=${echoed:-0}"
    [ "${got:-0}" = "$hvc_bytes" ] && [ "$match" = match ] ||
        fail "console: the guest read ${got:-0} of $hvc_bytes bytes ($match)"
    [ "${echoed:-0}" -ge 1 ] || fail "console: the guest's line did not reach the host at the end"
}
