"""A deliberately crude TFTP client for protocol-level checks, run inside the client
namespace: `python tftp_raw_client.py SERVER_IP COMMAND JSON_ARGS`; prints JSON."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import sys


def rrq(name: bytes, mode: bytes = b"octet", options: dict[str, str] | None = None,
        opcode: int = 1) -> bytes:
    out = struct.pack("!H", opcode) + name + b"\0" + mode + b"\0"
    for k, v in (options or {}).items():
        out += k.encode() + b"\0" + v.encode() + b"\0"
    return out


def sock(timeout: float = 3.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    return s


def first_reply(server: str, packet: bytes, port: int = 69) -> dict[str, object]:
    s = sock()
    s.sendto(packet, (server, port))
    try:
        data, addr = s.recvfrom(70000)
    except TimeoutError:
        return {"opcode": None}
    op = struct.unpack_from("!H", data)[0]
    out: dict[str, object] = {"opcode": op, "port": addr[1], "len": len(data)}
    if op == 5:
        out["code"] = struct.unpack_from("!H", data, 2)[0]
        out["message"] = data[4:-1].decode("utf-8", "replace")
    elif op == 3:
        out["payload"] = data[4:].decode("latin-1")
    return out


def hostile(server: str, names: list[str]) -> list[dict[str, object]]:
    return [{"name": n, **first_reply(server, rrq(n.encode("utf-8", "surrogateescape")))}
            for n in names]


def raw_packets(server: str, packets: list[str]) -> list[dict[str, object]]:
    return [first_reply(server, bytes.fromhex(p)) for p in packets]


def wrong_tid(server: str, name: str) -> dict[str, object]:
    """Start a lock-step read, poke the transfer port from a stranger, then finish."""
    s = sock()
    s.sendto(rrq(name.encode()), (server, 69))
    data, tid = s.recvfrom(70000)
    stranger = sock()
    stranger.sendto(struct.pack("!HH", 4, 1), tid)
    err, _ = stranger.recvfrom(1000)
    got = bytearray(data[4:])
    block = 1
    s.sendto(struct.pack("!HH", 4, 1), tid)
    while len(data) - 4 == 512:
        data, addr = s.recvfrom(70000)
        if addr != tid or struct.unpack_from("!HH", data) != (3, (block + 1) & 0xFFFF):
            continue
        block += 1
        got += data[4:]
        s.sendto(struct.pack("!HH", 4, block & 0xFFFF), tid)
    return {"stranger_opcode": struct.unpack_from("!H", err)[0],
            "stranger_code": struct.unpack_from("!H", err, 2)[0],
            "sha256": hashlib.sha256(got).hexdigest(), "tid_port": tid[1]}


def refuse_oack(server: str, name: str) -> dict[str, object]:
    s = sock()
    s.sendto(rrq(name.encode(), options={"blksize": "1468"}), (server, 69))
    data, tid = s.recvfrom(70000)
    s.sendto(struct.pack("!HH", 5, 8) + b"no options please\0", tid)
    return {"opcode": struct.unpack_from("!H", data)[0]}


if __name__ == "__main__":
    server, command, raw_args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = {"hostile": hostile, "raw": raw_packets, "wrong_tid": wrong_tid,
              "refuse_oack": refuse_oack}[command](server, raw_args)
    print(json.dumps(result))
