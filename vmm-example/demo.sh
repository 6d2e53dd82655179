#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The main job: boot a stock Debian kernel on vmm-example with one virtio-blk
# disk served in-process (/dev/vda), one served by the vhost-user-blk daemon
# in another process (/dev/vdb) and a virtio-rng; the guest writes, reads
# back and verifies data on both disks, reads the rng, prints results and
# throughput, and powers off, which ends vmm-example.
#   vmm-example/demo.sh          (on a fresh Debian bookworm with Rust)
#   vmm-example/demo.sh --bench [BOOTS]
#                                benchmark mode: BOOTS boots (3), each running
#                                tests/guest/rootfs/vbk/test-blkbench.sh over
#                                vda in process, vdb from vhost-user-blk and
#                                vdc from qemu-storage-daemon (3 rounds a boot,
#                                disk order rotated); prints the medians over
#                                all rounds and the ratios to the in-process disk
# Installs QEMU/busybox/cpio if missing (tests/guest/install-deps.sh; QEMU
# is needed where /dev/kvm is PVM: the demo then runs nested, see
# tests/guest/run-vmm.sh), builds, fetches the guest kernel, runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tests/guest/install-deps.sh
mode=demo boots=3
case "${1:-}" in
    "") ;;
    --bench) mode=bench; boots=${2:-3} ;;
    *) echo "usage: $0 [--bench [BOOTS]]" >&2; exit 2 ;;
esac
cargo build --release --workspace
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if [ "$mode" = bench ]; then
    exec vmm-example/bench-guest.sh "$boots"
fi
VBK_LOG=$log tests/guest/run-vmm.sh disk vhost-user-blk rng >/dev/null 2>&1 || status=$?
echo "== results (guest-measured; nested runs are for function, not performance) =="
grep -E 'VBK-(BOOT|RESULT|DONE)|guest stopped' "$log" | sed 's/^L2| /  L2 guest: /'
for pair in "vda:in-process" "vdb:vhost-user-blk (separate process)"; do
    d=${pair%%:*}
    grep -oE "L2\| VBK-RESULT disk=$d .*" "$log" |
        sed -E "s/.*verify=([a-z/]+).*write_kBps=([0-9]+) read_kBps=([0-9]+).*/  \/dev\/$d ${pair#*:}: verify=\1 write \2 kB\/s read \3 kB\/s/"
done
[ "${status:-0}" = 0 ] && echo "demo: OK" || { echo "demo: FAILED (console: rerun with VBK_LOG=FILE tests/guest/run-vmm.sh)"; exit 1; }
