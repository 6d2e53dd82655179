# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Sourced by the vmm scenarios (test-vmm-snapshot.sh, test-vmm-livemig.sh):
# what they share. Each script defines its own fail().
#
# now_cs: uptime in centiseconds.
# wait_for FILE PATTERN SECONDS: 0 once PATTERN is in FILE (polled every
#   50 ms, which bounds the precision of the downtime figures).
# show FILE: FILE with the L2 console prefix.
#
# check_records TAG PER IMAGE_OF LOGS...: reads the guest's last
#   "VBK-RESULT TAG ..." line in LOGS; IMAGE_OF is a function printing the
#   image writer W wrote to. Sets records, errors, verified, lost and res
#   (the result line), and calls fail on an error or a missing record.
now_cs() { local up f; read -r up _ </proc/uptime; f=${up#*.}; f=${f#0}; echo $((${up%.*} * 100 + f)); }
wait_for() {
    local n=$(($3 * 20))
    while [ "$n" -gt 0 ]; do
        grep -q "$2" "$1" 2>/dev/null && return 0
        sleep 0.05; n=$((n - 1))
    done
    return 1
}
show() { sed "s/^/L2| /" "$1"; }

# After the guest's writeloop (test-writeloop.sh): every record it
# reported is in its slot.
check_records() {
    local tag=$1 per=$2 image_of=$3 counts w k k_end slot k6 s6 want got image
    shift 3
    res=$(grep -h "VBK-RESULT $tag " "$@" | tail -n 1)
    records=$(echo "$res" | sed -n 's/.* records=\([0-9]*\).*/\1/p')
    errors=$(echo "$res" | sed -n 's/.* errors=\([0-9]*\).*/\1/p')
    counts=$(echo "$res" | sed -n 's/.* counts=\([0-9,]*\).*/\1/p')
    [ -n "$records" ] || { fail "no result line from the guest"; records=0 errors=1; }
    [ "$errors" = 0 ] || fail "the guest saw $errors error(s)"
    verified=0 lost=0 w=0
    for k_end in $(echo "$counts" | tr , ' '); do
        image=$($image_of "$w")
        k=0
        while [ "$k" -lt "$k_end" ]; do
            slot=$((w * per + k)); k6=$((1000000 + k)); s6=$((1000000 + slot))
            want="VBK-WREC v1 tag=$tag w=$w k=${k6#1} slot=${s6#1} "
            got=$(dd if="$image" bs=4096 skip=$slot count=1 2>/dev/null | head -c ${#want})
            if [ "$got" = "$want" ]; then verified=$((verified + 1)); else lost=$((lost + 1)); fi
            k=$((k + 1))
        done
        w=$((w + 1))
    done
    [ "$lost" = 0 ] || fail "$lost record(s) missing from the image(s)"
    [ "$verified" -gt 0 ] || fail "no record verified"
}
