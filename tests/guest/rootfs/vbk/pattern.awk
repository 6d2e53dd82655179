# Deterministic test pattern, one 512-byte record per disk sector k:
#   header, 64 bytes: "vbk seed=SSSSSSSS disk=DDDD off=OOOOOOOOOOOO XXXXXXXXXX-KKKKKKK\n"
#     OOO.. = byte offset (512*k), KKK.. = k mod 10^7, XXX.. = MINSTD sequence
#     x_0 = seed, x_{k+1} = x_k * 48271 mod (2^31 - 1)  (exact in awk doubles)
#   filler, 7 lines of 64 bytes: line i (0..6) is 63 times the letter
#     "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[(j*7 + i) mod 26], then "\n", with j = x_k mod 16.
# The host side (tests/qemu_guest.rs) regenerates it to check the image file.
# Usage: awk -v seed=N -v disk=vda -v bytes=N -f pattern.awk
BEGIN {
    az = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for (j = 0; j < 16; j++) {
        f[j] = ""
        for (i = 0; i < 7; i++) {
            l = ""; c = substr(az, (j * 7 + i) % 26 + 1, 1)
            while (length(l) < 63) l = l c
            f[j] = f[j] l "\n"
        }
    }
    x = seed; n = int(bytes / 512)
    for (k = 0; k < n; k++) {
        printf "vbk seed=%08d disk=%-4s off=%012d %010d-%07d\n%s", seed, disk, k * 512, x, k % 10000000, f[x % 16]
        x = (x * 48271) % 2147483647
    }
}
