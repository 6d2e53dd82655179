#!/bin/sh
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# console test: on every virtio-console (/dev/hvc*), write a line the host
# checks, then read the line the host types in reply (within 20 s).
#   VBK-RESULT console dev=/dev/hvcN read=<line>
n=0 st=0
for dev in /dev/hvc*; do
    # hvc0..7 always have nodes; only those with a device open.
    [ -c "$dev" ] && (exec 3<>"$dev") 2>/dev/null || continue
    n=$((n + 1))
    exec 3<>"$dev"
    stty raw -echo <&3 2>/dev/null
    echo "VBK-HVC-OUT from=${dev#/dev/}" >&3
    line=
    read -t 20 -r line <&3
    exec 3>&-
    echo "VBK-RESULT console dev=$dev read=${line:-nothing}"
    case "$line" in VBK-HVC-IN*) ;; *) st=1 ;; esac
done
[ "$n" -gt 0 ] || { echo "VBK-RESULT console=missing"; exit 1; }
exit "$st"
