#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Instructions per request of our vhost-user-blk and of the peer (the same
# device on rust-vmm's vhost-user-backend), side by side, under callgrind:
#   vmm-example/benches/callgrind-per-request.sh [DEPTH (32)] [QUEUES (1)]
# Each backend (--null, 1 GiB) serves blk_load (4 KiB random reads, libblkio)
# twice under valgrind, for 1 s and for 6 s; per request is
#   (Ir of the long run - Ir of the short run) / (requests long - short),
# which leaves out start-up, connection set-up and shutdown. Callgrind counts
# instructions, so the figure does not depend on what else the machine runs.
# Needs valgrind; builds the release binaries and examples first.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
depth=${1:-32} queues=${2:-1}
command -v valgrind >/dev/null || { echo "needs valgrind" >&2; exit 2; }
cargo build --quiet --release -p vmm-example --bins --examples
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
rel=$target/release
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# One run: backend under callgrind, blk_load for $2 s; prints "requests Ir".
run() {
    local name=$1 secs=$2 sock=$dir/$1-$2.sock out=$dir/$1-$2.cg
    local backend
    case $name in
        # Ours exits when its frontend leaves; the peer serves for ever.
        ours) backend=("$rel/vhost-user-blk" --no-seccomp --once) ;;
        peer) backend=("$rel/examples/peer_vub_blk") ;;
    esac
    RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
        "${backend[@]}" --socket "$sock" --queues "$queues" \
        --null --size 1073741824 >"$dir/$name-$secs.log" 2>&1 &
    local vg=$!
    for _ in $(seq 1 300); do [ -S "$sock" ] && break; sleep 0.1; done
    local requests
    requests=$("$rel/examples/blk_load" --socket "$sock" --queues "$queues" \
        --depth "$depth" --secs "$secs" | awk '{print $1}')
    # Give it 10 s to exit on its own, then SIGTERM (callgrind still
    # writes its counts when the program dies of a signal).
    for _ in $(seq 1 100); do kill -0 "$vg" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$vg" 2>/dev/null || true
    wait "$vg" || true
    local ir
    ir=$(grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}')
    echo "$requests $ir"
}

declare -A per
for name in ours peer; do
    read -r r1 i1 < <(run "$name" 1)
    read -r r2 i2 < <(run "$name" 6)
    per[$name]=$(awk -v r1="$r1" -v i1="$i1" -v r2="$r2" -v i2="$i2" \
        'BEGIN { printf "%.1f", (i2 - i1) / (r2 - r1) }')
    echo "VBK-CALLGRIND backend=$name depth=$depth queues=$queues short=$r1/$i1 long=$r2/$i2 ir_per_request=${per[$name]}"
done
awk -v o="${per[ours]}" -v p="${per[peer]}" \
    'BEGIN { printf "VBK-CALLGRIND ours/peer instructions per request: %.2fx\n", o / p }'
