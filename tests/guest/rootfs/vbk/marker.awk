# 4096-byte marker block written at byte offset 32 MiB of each disk:
# 64 lines "VBK-MARKER v1 disk=DDDD line=NN " padded with '.' to 63 chars + "\n".
# Usage: awk -v disk=vda -f marker.awk
BEGIN {
    for (i = 0; i < 64; i++) {
        s = sprintf("VBK-MARKER v1 disk=%-4s line=%02d ", disk, i)
        while (length(s) < 63) s = s "."
        print s
    }
}
