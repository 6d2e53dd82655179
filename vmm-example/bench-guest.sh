#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# In-guest disk benchmark of the three disk homes side by side in one guest:
# vda in process, vdb from the vhost-user-blk daemon, vdc from
# qemu-storage-daemon (the peer), all through vmm-example's virtio-mmio.
#   vmm-example/bench-guest.sh [BOOTS]     (what `demo.sh --bench` runs)
# Each boot runs tests/guest/rootfs/vbk/test-blkbench.sh (a warm-up round,
# then VBK_BENCH_ROUNDS rounds, 3, the disk order rotated each round); the
# medians over every round of every boot are printed with the ratios of the
# in-process disk to the other two. Nested figures (PVM /dev/kvm: our VMM
# runs inside a TCG guest) compare the homes; they are not absolute speeds.
# Expects built release binaries (VBK_BIN_DIR, as tests/guest/run-vmm.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
boots=${1:-3} rounds=${VBK_BENCH_ROUNDS:-3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
for b in $(seq 1 "$boots"); do
    if ! VBK_TEST=blkbench VBK_APPEND="vbk.rounds=$rounds" VBK_LOG="$dir/boot-$b.log" \
        "$root/tests/guest/run-vmm.sh" disk vhost-user-blk qsd-blk rng >/dev/null 2>&1; then
        echo "bench: boot $b failed; its console:" >&2
        tail -n 40 "$dir/boot-$b.log" >&2
        exit 1
    fi
    grep -a -h 'VBK-BENCH-MEDIAN' "$dir/boot-$b.log" | sed "s/^L2| /  boot $b: /"
done
grep -a -h '^L2| VBK-BENCH round=' "$dir"/boot-*.log | sed 's/^L2| //' | awk -v boots="$boots" -v rounds="$rounds" '
    { for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      k = f["disk"] SUBSEP f["pattern"]; n[k]++; v[k, n[k]] = f["value"] }
    function median(k,   m, i, j, t, a) {
        m = n[k]; for (i = 1; i <= m; i++) a[i] = v[k, i]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
        return m ? a[int((m + 1) / 2)] : 0
    }
    END {
        split("vda vdb vdc", disks, " ")
        name["vda"] = "in process"; name["vdb"] = "vhost-user-blk"; name["vdc"] = "qemu-storage-daemon"
        split("seqread seqwrite read4k", pats, " ")
        unit["seqread"] = "kB/s"; unit["seqwrite"] = "kB/s"; unit["read4k"] = "IOPS"
        printf "VBK-GUEST-BENCH boots=%d rounds=%d (medians of %d runs each)\n", boots, rounds, boots * rounds
        printf "%-10s %-5s %14s %16s %21s %10s %10s\n", "pattern", "unit", "vda in process", "vdb vhost-user-blk", "vdc qemu-storage-daemon", "vda/vdb", "vda/vdc"
        for (p = 1; p <= 3; p++) {
            P = pats[p]; a = median("vda" SUBSEP P); b = median("vdb" SUBSEP P); c = median("vdc" SUBSEP P)
            printf "%-10s %-5s %14d %16d %21d %9.2fx %9.2fx\n", P, unit[P], a, b, c, b ? a / b : 0, c ? a / c : 0
        }
    }'
