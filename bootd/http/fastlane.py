"""The boot listener's fast lane: per-node iPXE scripts answered in front of aiohttp.

Theory of operation
-------------------

Every machine of a booting fleet asks for its iPXE script: a few hundred bytes the
running snapshot has rendered already (bootd/http/boot.py's script cache). Through
aiohttp a request costs ~100 us of CPU here (bench/http.py: ~10,000 scripts/s; a bare
aiohttp handler ~26,000/s on loopback), most of it aiohttp's request and response
objects; the performance goal is 20,000/s. Measured, an asyncio protocol that parses the
one request line it cares about and writes prepared bytes does many times that, so the
boot listener's connections start in this protocol and go to aiohttp for everything
else. It is deliberately small: it understands one request and hands over the rest.

Rules:

1. A request is answered here only if its head is whole in the buffer, its line is
   exactly `GET /nodes/<mac>/boot.ipxe HTTP/1.1` (no query, no escapes), it carries no
   body and asks for nothing special (no Content-Length, Transfer-Encoding, Expect or
   Upgrade header; a Connection header only if it says keep-alive), and
   `boot.cached_script` has its script. The answer is the bytes aiohttp would send
   (status line, headers, body) and leaves what aiohttp's route leaves: the log line and
   the boot event (`boot.script_served`).
2. Anything else hands the connection over at a request boundary, with every byte not
   answered yet: aiohttp's protocol takes the transport (`set_protocol`) and this one is
   never in the path again. A malformed, oversized or unusual request so meets aiohttp's
   parser and its error, never a second parser's guess.
3. Pipelined requests are answered in order; the first that must go to aiohttp takes
   the rest of the buffer with it.
4. A client that does not read what it asked for stops being read (flow control), as in
   aiohttp. A connection idle for aiohttp's keep-alive timeout is closed; at shutdown the
   connections still here are closed, none of them has a request in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from bootd.fleet.mac import normalize_mac
from bootd.http.boot import RECORDER, SETTINGS, _address, cached_script, script_served

PREFIX = b"GET /nodes/"
SUFFIX = b"/boot.ipxe HTTP/1.1"
MAX_HEAD = 8190  # a longer head goes to aiohttp, whose limit and error it is
KEEPALIVE = 75.0  # aiohttp's keepalive_timeout default
SWEEP = 15.0  # seconds between looks for idle connections
_UNUSUAL = (b"\r\ncontent-length:", b"\r\ntransfer-encoding:", b"\r\nexpect:",
            b"\r\nupgrade:")
_CONNECTION = b"\r\nconnection:"


class Lane:
    """The fast lane of one boot app: what it answers from, and its connections."""

    def __init__(self, app: web.Application,
                 aiohttp_protocol: Callable[[], asyncio.Protocol]) -> None:
        self.settings = app[SETTINGS]
        self.recorder = app[RECORDER]
        self.aiohttp_protocol = aiohttp_protocol
        self.connections: set[LaneProtocol] = set()
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._date_second = -1
        self._date_bytes = b""

    def protocol(self) -> LaneProtocol:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP, self._sweep)
        return LaneProtocol(self)

    def answer(self, head: bytes, remote: str | None) -> bytes | None:
        """Rule 1: the response to one request head, or None for aiohttp."""
        line_end = head.find(b"\r\n")
        line = head if line_end < 0 else head[:line_end]
        if not (line.startswith(PREFIX) and line.endswith(SUFFIX)):
            return None
        if line_end >= 0:
            fields = head[line_end:].lower()
            for unusual in _UNUSUAL:
                if unusual in fields:
                    return None
            at = fields.find(_CONNECTION)
            if at >= 0:
                value_end = fields.find(b"\r\n", at + 2)
                value = fields[at + len(_CONNECTION):value_end if value_end >= 0 else None]
                if value.strip() != b"keep-alive" or fields.find(_CONNECTION, at + 2) >= 0:
                    return None
        raw = line[len(PREFIX):-len(SUFFIX)]
        if not raw.isascii() or b"%" in raw or b"/" in raw or b"?" in raw:
            return None
        try:
            mac = normalize_mac(raw.decode())
        except ValueError:
            return None  # aiohttp's route answers 400
        hit = cached_script(self.settings.get(), mac, _address(remote) if remote else None)
        if hit is None:
            return None
        script_served(self.recorder, remote, hit, mac)
        body = hit.text.encode()
        return b"%s%d\r\nDate: %s\r\nServer: %s\r\n\r\n%s" % (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ",
            len(body), self._date(), SERVER_SOFTWARE.encode(), body)

    def _date(self) -> bytes:
        now = time.time()
        if int(now) != self._date_second:
            self._date_second = int(now)
            self._date_bytes = formatdate(now, usegmt=True).encode()
        return self._date_bytes

    def _sweep(self) -> None:
        """Rule 4's idle connections."""
        cutoff = self.loop.time() - KEEPALIVE
        for connection in [c for c in self.connections if c.last < cutoff]:
            connection.close()
        self._sweeper = self.loop.call_later(SWEEP, self._sweep)

    def close(self) -> None:
        """At shutdown (rule 4)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.close()


class LaneProtocol(asyncio.Protocol):
    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.buffer = b""
        self.last = lane.loop.time()
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else None
        self.lane.connections.add(self)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.last = self.lane.loop.time()
        buffer = self.buffer + data if self.buffer else data
        answers: list[bytes] = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) <= MAX_HEAD:
                    self.buffer = buffer  # the rest of a head is still coming
                    if answers:
                        transport.write(b"".join(answers))
                    return
                break
            answer = self.lane.answer(buffer[:end], self.remote)
            if answer is None:
                break
            answers.append(answer)
            buffer = buffer[end + 4:]
            if not buffer:
                self.buffer = b""
                transport.write(b"".join(answers))
                return
        if answers:
            transport.write(b"".join(answers))
        self._hand_over(transport, buffer)

    def _hand_over(self, transport: asyncio.Transport, rest: bytes) -> None:
        """Rule 2."""
        self.lane.connections.discard(self)
        self.buffer = b""
        if self._paused:
            transport.resume_reading()  # aiohttp keeps its own books from here
        protocol = self.lane.aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if rest:
            protocol.data_received(rest)

    def pause_writing(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and self._paused:
            self._paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close: nothing is owed to a client that stopped sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.connections.discard(self)
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
