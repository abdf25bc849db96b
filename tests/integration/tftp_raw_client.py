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


def never_ack(server: str, args: dict[str, object]) -> dict[str, object]:
    """A forged-source RRQ as the server sees it: `count` RRQs from as many ports, none
    ever ACKed; everything the server sends back within `listen` seconds is counted."""
    import select
    import time

    count, port = int(str(args["count"])), int(str(args.get("port", 69)))
    name, listen = str(args["name"]).encode(), float(str(args["listen"]))
    socks = [sock() for _ in range(count)]
    for s in socks:
        s.bind((str(args.get("source", "0.0.0.0")), 0))
    bytes_in = 0
    for s in socks:
        packet = rrq(name)
        s.sendto(packet, (server, port))
        bytes_in += len(packet)
    bytes_out, packets, data_packets, errors = 0, 0, 0, []
    last = started = time.monotonic()
    while time.monotonic() - started < listen:
        ready, _, _ = select.select(socks, [], [], 0.2)
        for s in ready:
            data, _ = s.recvfrom(70000)
            bytes_out += len(data) + 28  # and its IP and UDP headers, as the wire carries
            packets += 1
            last = time.monotonic()
            op = struct.unpack_from("!H", data)[0]
            data_packets += op == 3
            if op == 5:
                errors.append(data[4:-1].decode("utf-8", "replace"))
    return {"rrqs": count, "bytes_in": bytes_in + 28 * count, "bytes_out": bytes_out,
            "packets": packets, "data_packets": data_packets, "errors": errors,
            "last_packet_s": round(last - started, 2)}


def fetch_from(server: str, args: dict[str, object]) -> dict[str, object]:
    """A well-behaved lock-step read from a chosen source address."""
    s = sock()
    s.bind((str(args["source"]), 0))
    s.sendto(rrq(str(args["name"]).encode()), (server, 69))
    got, block = bytearray(), 0
    while True:
        data, tid = s.recvfrom(70000)
        op, number = struct.unpack_from("!HH", data)
        if op == 5:
            return {"error": data[4:-1].decode("utf-8", "replace")}
        if op == 3 and number == (block + 1) & 0xFFFF:
            block += 1
            got += data[4:]
            s.sendto(struct.pack("!HH", 4, number), tid)
            if len(data) - 4 < 512:
                return {"sha256": hashlib.sha256(got).hexdigest()}


if __name__ == "__main__":
    server, command, raw_args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = {"hostile": hostile, "raw": raw_packets, "wrong_tid": wrong_tid,
              "refuse_oack": refuse_oack, "never_ack": never_ack,
              "fetch_from": fetch_from}[command](server, raw_args)
    print(json.dumps(result))
