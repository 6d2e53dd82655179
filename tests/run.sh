#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The whole test suite, from a fresh machine: installs what the guest tests
# need, builds the guest image and the release binaries, then runs every
# test of the workspace. This is the command the README and .ci/run use.
set -euo pipefail
cd "$(dirname "$0")/.."

tests/guest/install-deps.sh
tests/guest/build-image.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace --features virtio-backend-kit/versionize -- --nocapture 2>&1 | tee target/test-output.log
grep -h "^VBK-\|^test result:" target/test-output.log | sort | uniq -c | sed "s/^/summary: /" || true
