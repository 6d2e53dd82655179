#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Seed inputs for the `vhost_user_session` fuzz target: the message
sequences a real frontend sends (QEMU-like start-up, traffic set-up,
in-flight area, device state save and load, dirty log, memory hotplug,
postcopy), in the target's record format: u16 fd mask, u16 length, bytes.

Run from fuzz/: python3 seeds/vhost_user_session.py corpus/vhost_user_session
"""
import os
import struct
import sys

RAM, SMALL, KICK, CALL, ERR, EMPTY, LOAD, SAVE, SOCK = (1 << i for i in range(9))
V1, NEED_REPLY = 0x1, 0x8
GPA, RAM_SIZE, VVA = 0x0, 1 << 20, 0x7F00_0000_0000
PROTOCOL = 0x1 | 0x2 | 0x8 | 0x20 | 0x100 | 0x200 | 0x1000 | 0x2000 | 0x8000 | 0x10000 | 0x80000
FEATURES = (1 << 32) | (1 << 29) | (1 << 28) | (1 << 30)


def rec(mask, request, payload=b"", flags=V1 | NEED_REPLY):
    msg = struct.pack("<III", request, flags, len(payload)) + payload
    return struct.pack("<HH", mask, len(msg)) + msg


def u64(v):
    return struct.pack("<Q", v)


def state(index, num):
    return struct.pack("<II", index, num)


def region(gpa, size, vva, off):
    return struct.pack("<QQQQ", gpa, size, vva, off)


def handshake():
    return (rec(0, 1) + rec(0, 15) + rec(0, 16, u64(PROTOCOL)) + rec(0, 2, u64(FEATURES))
            + rec(0, 3) + rec(0, 17) + rec(0, 36))


def mem_table():
    return rec(RAM, 5, struct.pack("<II", 1, 0) + region(GPA, RAM_SIZE, VVA, 0))


def queue(i, size=64, base=0):
    ring = 0x1_0000 * (i + 1)
    addr = struct.pack("<IIQQQQ", i, 0, VVA + ring, VVA + ring + 0x2000, VVA + ring + 0x1000, 0)
    return (rec(0, 8, state(i, size)) + rec(0, 9, addr) + rec(0, 10, state(i, base))
            + rec(CALL, 13, u64(i)) + rec(ERR, 14, u64(i)) + rec(KICK, 12, u64(i))
            + rec(0, 18, state(i, 1)))


SEEDS = {
    "startup": handshake() + mem_table() + queue(0) + queue(1) + rec(0, 11, state(0, 0))
    + rec(0, 11, state(1, 0)),
    "config": handshake() + rec(0, 24, struct.pack("<III", 0, 16, 0) + bytes(16))
    + rec(0, 25, struct.pack("<III", 4, 4, 0) + b"abcd")
    + rec(0, 24, struct.pack("<III", 8, 8, 0) + bytes(8)),
    "inflight": handshake() + rec(0, 31, struct.pack("<QQHH", 0, 0, 2, 64)) + mem_table()
    + rec(SMALL, 32, struct.pack("<QQHH", 64 << 10, 0, 2, 64)) + queue(0),
    "device_state_save": handshake() + mem_table() + queue(0) + rec(0, 11, state(0, 0))
    + rec(SAVE, 42, struct.pack("<II", 0, 0)) + rec(0, 43),
    "device_state_load": handshake() + rec(LOAD, 42, struct.pack("<II", 1, 0)) + rec(0, 43)
    + mem_table() + queue(0, base=7),
    "dirty_log": handshake() + mem_table() + rec(SMALL, 6, struct.pack("<QQ", 4096, 0))
    + rec(0, 2, u64(FEATURES | (1 << 26))) + queue(0) + rec(0, 2, u64(FEATURES)),
    "hotplug": handshake() + rec(RAM, 37, u64(0) + region(GPA, RAM_SIZE, VVA, 0))
    + rec(SMALL, 37, u64(0) + region(1 << 30, 64 << 10, VVA + (1 << 30), 0))
    + rec(0, 38, u64(0) + region(1 << 30, 64 << 10, VVA + (1 << 30), 0)) + queue(1),
    "backend_channel": handshake() + rec(SOCK, 21) + rec(0, 39, u64(0xF)) + rec(0, 40)
    + rec(0, 34) + rec(0, 4),
    "postcopy": handshake() + rec(0, 28) + rec(0, 29) + mem_table() + rec(0, 30),
    "bad_fds": handshake() + rec(EMPTY, 5, struct.pack("<II", 1, 0) + region(GPA, RAM_SIZE, VVA, 0))
    + rec(RAM | SMALL, 12, u64(0)) + rec(0, 5, struct.pack("<II", 1, 0)),
}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "corpus/vhost_user_session"
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, "seed-" + name), "wb") as f:
            f.write(data)
