"""Sans-I/O TFTP, read side (RFC 1350, 2347 options, 2348 blksize, 2349 timeout/tsize,
7440 windowsize).

Shaped like aioquic's QuicConnection: `receive_datagram(data, now)`,
`datagrams_to_send()`, `get_timer()`, `handle_timer(now)`, `next_event()`. No sockets, no
clock reads: retransmission and timeouts are unit-tested by passing `now`. Our own rather
than tftpy's because tftpy has no windowsize (RFC 7440) and is thread-based.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol


class Opcode(IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


class TftpError(Exception):
    """Something to tell the peer in an ERROR packet (and then stop)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def packet(self) -> bytes:
        return encode_error(self.code, self.message)


MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535  # RFC 7440
MAX_REQUEST = 2048  # longest RRQ we parse


# ---------------------------------------------------------------------------- codec


@dataclass(frozen=True)
class Request:
    opcode: Opcode  # RRQ or WRQ
    filename: str
    mode: str  # "octet" or "netascii"
    options: dict[str, str]  # lower-case names, in the client's order


def parse_request(data: bytes) -> Request:
    """RRQ/WRQ bytes -> Request, or TftpError naming what is wrong."""
    if len(data) < 4 or len(data) > MAX_REQUEST:
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "malformed request")
    (opcode,) = struct.unpack_from("!H", data)
    if opcode not in (Opcode.RRQ, Opcode.WRQ):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"unexpected opcode {opcode}")
    fields = data[2:].split(b"\0")
    if len(fields) < 3 or fields[-1] != b"":
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, "request fields are not NUL-terminated")
    fields = fields[:-1]
    try:
        name = fields[0].decode("utf-8")
    except UnicodeDecodeError:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "file name is not valid UTF-8") from None
    mode = fields[1].decode("ascii", "replace").lower()
    if mode not in ("octet", "netascii"):
        raise TftpError(ErrorCode.ILLEGAL_OPERATION, f"unsupported transfer mode {mode!r}")
    rest = fields[2:]
    options: dict[str, str] = {}
    # RFC 2347: option/value pairs; a trailing odd field is ignored, as clients vary
    for i in range(0, len(rest) - 1, 2):
        try:
            key, value = rest[i].decode("ascii").lower(), rest[i + 1].decode("ascii")
        except UnicodeDecodeError:
            continue
        options.setdefault(key, value)
    return Request(Opcode(opcode), name, mode, options)


def encode_request(opcode: Opcode, filename: str, mode: str = "octet",
                   options: dict[str, str] | None = None) -> bytes:
    out = struct.pack("!H", opcode) + filename.encode() + b"\0" + mode.encode() + b"\0"
    for key, value in (options or {}).items():
        out += key.encode() + b"\0" + value.encode() + b"\0"
    return out


def encode_data(block: int, payload: bytes) -> bytes:
    return struct.pack("!HH", Opcode.DATA, block & 0xFFFF) + payload


def encode_ack(block: int) -> bytes:
    return struct.pack("!HH", Opcode.ACK, block & 0xFFFF)


def encode_error(code: ErrorCode, message: str) -> bytes:
    return struct.pack("!HH", Opcode.ERROR, code) + message.encode("utf-8", "replace")[:400] + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    out = struct.pack("!H", Opcode.OACK)
    for key, value in options.items():
        out += key.encode() + b"\0" + value.encode() + b"\0"
    return out


def parse_error(data: bytes) -> tuple[int, str]:
    code = struct.unpack_from("!H", data, 2)[0] if len(data) >= 4 else 0
    return code, data[4:].split(b"\0", 1)[0].decode("utf-8", "replace")


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Limits:
    max_blksize: int = 1468  # what fits a 1500-byte MTU
    max_windowsize: int = 64
    initial_timeout: float = 1.0
    max_timeout: float = 8.0
    max_retries: int = 6
    # Until the client's first ACK proves it asked (its address could be forged), the
    # first packet goes out at most 1 + this many times: a 44-byte RRQ no longer buys
    # seven 516-byte blocks (issue 16, finding 4). A real client that lost it resends
    # its RRQ anyway.
    unconfirmed_retries: int = 2


@dataclass(frozen=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    # The client's RFC 2349 timeout. We retransmit sooner when we can (1s, doubling), never
    # later: waiting out a client's 5s on every lost packet made lossy links crawl.
    timeout: float | None = None
    oack: dict[str, str] = field(default_factory=dict)  # empty: no OACK, DATA 1 first


def negotiate(options: dict[str, str], size: int, limits: Limits) -> Negotiated:
    """Accept what we can of the client's options; an OACK lists only those."""
    oack: dict[str, str] = {}
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    for key, value in options.items():
        try:
            n = int(value)
        except ValueError:
            continue  # a malformed option is ignored, not fatal (RFC 2347)
        if key == "blksize" and n >= MIN_BLKSIZE:
            blksize = min(n, MAX_BLKSIZE, limits.max_blksize)
            oack[key] = str(blksize)
        elif key == "windowsize" and 1 <= n <= MAX_WINDOWSIZE:
            windowsize = min(n, limits.max_windowsize)
            oack[key] = str(windowsize)
        elif key == "timeout" and 1 <= n <= 255:
            timeout = float(n)
            oack[key] = str(n)
        elif key == "tsize" and n >= 0:
            oack[key] = str(size)
    return Negotiated(blksize, windowsize, timeout, oack)


# ---------------------------------------------------------------------------- transfer


class Source(Protocol):
    """Where a transfer's bytes come from: read on demand, never copied whole; closed by
    whoever opened it once the transfer has ended."""

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


def netascii(data: bytes) -> bytes:
    """RFC 764 netascii: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


@dataclass(frozen=True)
class TransferDone:
    bytes_sent: int
    blocks: int
    retransmits: int


@dataclass(frozen=True)
class TransferFailed:
    reason: str
    bytes_sent: int
    retransmits: int
    client_refused_options: bool = False  # ERROR 8 after our OACK: a clean end
    # Every block went out and all but the last were ACKed: a client that got the file
    # but whose final ACK was lost looks exactly like this (it does not retransmit it).
    final_ack_missing: bool = False


Event = TransferDone | TransferFailed


class ReadTransfer:
    """One client reading one file: OACK, DATA windows, ACKs, retransmission, rollover."""

    def __init__(self, source: Source, negotiated: Negotiated, limits: Limits,
                 now: float) -> None:
        self.source = source
        self.blksize = negotiated.blksize
        self.windowsize = negotiated.windowsize
        self.limits = limits
        self.total_blocks = source.size // self.blksize + 1  # last one is short (maybe empty)
        self._max_timeout = min(limits.max_timeout, negotiated.timeout or limits.max_timeout)
        self._initial_timeout = min(limits.initial_timeout, self._max_timeout)
        self._timeout = self._initial_timeout
        self._oack = negotiated.oack
        self._awaiting_oack_ack = bool(negotiated.oack)
        self._acked = 0  # highest block the client has confirmed
        self._sent_high = 0  # highest block sent in the current window
        self._deadline: float | None = None
        self._retries = 0
        self._confirmed = False  # the client has ACKed something
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self.closed = False
        self.bytes_sent = 0
        self.retransmits = 0
        if self._awaiting_oack_ack:
            self._out.append(encode_oack(self._oack))
        else:
            self._send_window()
        self._arm(now)

    # -- the aioquic-style surface

    def datagrams_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        return None if self.closed else self._deadline

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.closed or len(data) < 4:
            return
        opcode, number = struct.unpack_from("!HH", data)
        if opcode == Opcode.ACK:
            self._on_ack(number, now)
        elif opcode == Opcode.ERROR:
            code, message = parse_error(data)
            refused = self._awaiting_oack_ack and code == ErrorCode.OPTION_REFUSED
            self._close(TransferFailed(f"client sent ERROR {code}: {message}", self.bytes_sent,
                                       self.retransmits, client_refused_options=refused))
        else:
            self._out.append(encode_error(ErrorCode.ILLEGAL_OPERATION,
                                          f"unexpected opcode {opcode} during a read"))
            self._close(TransferFailed(f"client sent opcode {opcode}", self.bytes_sent,
                                       self.retransmits))

    def handle_timer(self, now: float) -> None:
        if self.closed or self._deadline is None or now < self._deadline:
            return
        self._retries += 1
        limit = (self.limits.max_retries if self._confirmed
                 else min(self.limits.unconfirmed_retries, self.limits.max_retries))
        if self._retries > limit:
            reason = (f"no ACK after {limit} retries" if self._confirmed else
                      f"the client never answered ({limit} retries)")
            self._close(TransferFailed(
                reason, self.bytes_sent,
                self.retransmits, final_ack_missing=(
                    not self._awaiting_oack_ack and self._acked == self.total_blocks - 1
                    and self._sent_high == self.total_blocks)))
            return
        self.retransmits += 1
        self._timeout = min(self._timeout * 2, self._max_timeout)
        if self._awaiting_oack_ack:
            self._out.append(encode_oack(self._oack))
        else:
            self._send_window()
        self._arm(now)

    # -- internals

    def _on_ack(self, number: int, now: float) -> None:
        if self._awaiting_oack_ack:
            if number != 0:
                return
            self._awaiting_oack_ack = False
            self._confirmed = True
            self._retries = 0
            self._send_window()
            self._arm(now)
            return
        # The absolute block this 16-bit number names: the latest sent one matching it.
        block = self._sent_high - ((self._sent_high - number) & 0xFFFF)
        if block <= self._acked:
            return  # duplicate or stale ACK: ignoring it avoids the sorcerer's apprentice
        self._acked = block
        self._confirmed = True
        self._retries = 0
        if self._acked >= self.total_blocks:
            self._close(TransferDone(self.bytes_sent, self.total_blocks, self.retransmits))
            return
        self._timeout = self._initial_timeout
        # RFC 7440: an ACK short of the window's end means the rest was lost: resend from
        # the block after it; an ACK of the whole window starts the next one.
        self._send_window()
        self._arm(now)

    def _send_window(self) -> None:
        first = self._acked + 1
        last = min(self._acked + self.windowsize, self.total_blocks)
        for block in range(first, last + 1):
            payload = self.source.read((block - 1) * self.blksize, self.blksize)
            self._out.append(encode_data(block, payload))
            self.bytes_sent += len(payload)
        self._sent_high = last

    def _arm(self, now: float) -> None:
        self._deadline = now + self._timeout

    def _close(self, event: Event) -> None:
        self.closed = True
        self._deadline = None
        self._events.append(event)
