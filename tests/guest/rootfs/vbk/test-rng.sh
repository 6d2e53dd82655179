#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# rng test: read 64 bytes from /dev/hwrng (virtio-rng), with a timeout.
if [ ! -c /dev/hwrng ]; then echo "VBK-RESULT rng=missing"; exit 1; fi
n=$(timeout 20 dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)
cur=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
if [ "$n" = 64 ]; then echo "VBK-RESULT rng=ok bytes=$n source=$cur"; exit 0; fi
echo "VBK-RESULT rng=fail bytes=$n source=$cur"; exit 1
