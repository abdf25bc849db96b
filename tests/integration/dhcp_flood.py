"""DHCP load for the flood test, run inside the client namespace:

    python dhcp_flood.py flood IFACE SECONDS        -> {"sent": N, "rate": N/s}
    python dhcp_flood.py burst IFACE COUNT          -> {"sent": COUNT}
    python dhcp_flood.py dora IFACE MAC SECONDS     -> {"attempts", "completed", ...}

`flood` sends DISCOVERs from random MACs as fast as one Python process can (no
broadcast flag, so answers go to those MACs and not to us); `dora` plays a client with a
reserved MAC doing whole DISCOVER-OFFER-REQUEST-ACK exchanges back to back, each step
allowed 1 s, and counts how many complete."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time

MAGIC = b"\x63\x82\x53\x63"


def packet(mac: bytes, xid: int, msg_type: int, broadcast: bool,
           extra: bytes = b"") -> bytes:
    head = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0,
                       0x8000 if broadcast else 0, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                       b"\0" * 4, mac.ljust(16, b"\0"), b"", b"")
    return head + MAGIC + bytes((53, 1, msg_type)) + extra + b"\xff"


def sock_on(iface: str, port: int = 68) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", port))
    return s


def flood(iface: str, seconds: float) -> dict[str, float]:
    s = sock_on(iface, 0)
    template = bytearray(packet(b"\x02\xee\0\0\0\0", 0, 1, broadcast=False))
    dest = ("255.255.255.255", 67)
    sent, started = 0, time.monotonic()
    randoms = os.urandom(4 << 20)
    while True:
        for _ in range(1000):
            off = (sent * 4) % (len(randoms) - 8)
            template[30:34] = randoms[off:off + 4]  # chaddr 02:ee:xx:xx:xx:xx
            template[4:8] = randoms[off + 4:off + 8]  # xid
            try:
                s.sendto(template, dest)
                sent += 1
            except BlockingIOError:
                pass
        elapsed = time.monotonic() - started
        if elapsed >= seconds:
            return {"sent": sent, "rate": round(sent / elapsed)}


def burst(iface: str, count: int) -> dict[str, float]:
    """`count` DISCOVERs from as many random MACs, at once."""
    s = sock_on(iface, 0)
    for _ in range(count):
        s.sendto(packet(b"\x02\xdd" + os.urandom(4), struct.unpack("!I", os.urandom(4))[0],
                        1, broadcast=False), ("255.255.255.255", 67))
    return {"sent": count}


def options(data: bytes) -> dict[int, bytes]:
    out, i = {}, 240
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        out[data[i]] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return out


def wait_reply(s: socket.socket, xid: int, want: int, deadline: float) -> bytes | None:
    while time.monotonic() < deadline:
        ready, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        data = s.recv(4096)
        if len(data) < 244 or struct.unpack_from("!I", data, 4)[0] != xid:
            continue  # someone else's answer
        if options(data).get(53) == bytes((want,)):
            return data
    return None


def dora(iface: str, mac_text: str, seconds: float) -> dict[str, object]:
    mac = bytes.fromhex(mac_text.replace(":", ""))
    s = sock_on(iface)
    attempts = completed = 0
    took: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        attempts += 1
        xid = struct.unpack("!I", os.urandom(4))[0]
        t0 = time.monotonic()
        s.sendto(packet(mac, xid, 1, broadcast=True), ("255.255.255.255", 67))
        offer = wait_reply(s, xid, 2, t0 + 1.0)
        if offer is None:
            continue
        opts = options(offer)
        yiaddr, server = offer[16:20], opts.get(54, b"")
        s.sendto(packet(mac, xid, 3, broadcast=True,
                        extra=bytes((50, 4)) + yiaddr + bytes((54, 4)) + server),
                 ("255.255.255.255", 67))
        if wait_reply(s, xid, 5, time.monotonic() + 1.0) is not None:
            completed += 1
            took.append(time.monotonic() - t0)
        time.sleep(0.05)
    took.sort()
    return {"attempts": attempts, "completed": completed,
            "p50_ms": round(took[len(took) // 2] * 1000, 1) if took else None,
            "max_ms": round(took[-1] * 1000, 1) if took else None}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "flood":
        result: object = flood(sys.argv[2], float(sys.argv[3]))
    elif command == "burst":
        result = burst(sys.argv[2], int(sys.argv[3]))
    else:
        result = dora(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    print(json.dumps(result))
