"""asyncio shell around ReadTransfer: sockets, one timer per transfer, nothing else.

By default every transfer gets its own ephemeral UDP socket (RFC 1350 TIDs). In
single-port mode every transfer is served from the listening port and told apart by the
peer's address, so TFTP works behind NAT or a Kubernetes Service that forwards one port.

Settings (file tree, limits, the node directory) come from the current runtime snapshot,
read once per request: a transfer keeps the snapshot it started with until it ends, so a
reload changes what new requests get and never what is already being sent.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address
from typing import cast

import structlog

from bootd.fleet.directory import NodeDirectory
from bootd.fleet.filetree import BytesSource, FileTree, Forbidden, NotFound
from bootd.tftp.protocol import (
    ErrorCode,
    Event,
    Limits,
    Opcode,
    ReadTransfer,
    Source,
    TftpError,
    TransferDone,
    encode_error,
    negotiate,
    netascii,
    parse_request,
)

log = structlog.get_logger("bootd.tftp")

Addr = tuple[str, int]
NETASCII_LIMIT = 16 << 20  # netascii is converted in memory; boot files use octet


@dataclass(frozen=True)
class TftpSettings:
    """What TFTP takes from one config load."""

    files: FileTree
    limits: Limits
    max_transfers: int
    max_per_client: int  # transfers one client address may have open at once
    directory: NodeDirectory  # names the node behind a client address in reports


class TransferOutcome(StrEnum):
    OK = "ok"
    UNCONFIRMED = "unconfirmed"  # all data sent; the client's last ACK never came
    FAILED = "failed"
    REFUSED_OPTIONS = "refused-options"  # the client answered our OACK with ERROR 8
    ERROR = "error"  # refused before any data: not found, access, busy, WRQ


@dataclass(frozen=True)
class TransferRecord:
    """What one finished transfer looked like, for logs, metrics and boot events."""

    client: IPv4Address
    port: int
    filename: str
    size: int
    blksize: int
    windowsize: int
    duration: float
    outcome: TransferOutcome
    detail: str
    bytes_sent: int
    retransmits: int


# a finished transfer, the settings it ran under
OnRecord = Callable[[TransferRecord, TftpSettings], None]


class _Active:
    """A transfer and the socket it speaks through."""

    def __init__(self, server: TftpServer, transfer: ReadTransfer, peer: Addr, filename: str,
                 settings: TftpSettings, transport: asyncio.DatagramTransport,
                 own_socket: bool) -> None:
        self.server = server
        self.transfer = transfer
        self.peer = peer
        self.filename = filename
        self.settings = settings
        self.started = time.monotonic()
        self.transport = transport
        self.own_socket = own_socket
        self.timer: asyncio.TimerHandle | None = None

    def pump(self) -> None:
        """Send what the transfer wants sent, keep its timer armed, handle its end."""
        sendto, peer = self.transport.sendto, self.peer
        for data in self.transfer.datagrams_to_send():
            sendto(data, peer)
        deadline = self.transfer.get_timer()
        if deadline is None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
        elif self.timer is None or self.timer.when() > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.server.loop.call_at(deadline, self._on_timer)
        # else: the armed timer fires no later than the deadline and re-checks it then.
        # Not re-arming on every ACK keeps the hot path free of timer-heap churn.
        event = self.transfer.next_event()
        if event is not None:
            self.server.finish(self, event)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.server.loop.time()
        deadline = self.transfer.get_timer()
        if deadline is not None and now < deadline:
            self.timer = self.server.loop.call_at(deadline, self._on_timer)
            return
        self.transfer.handle_timer(now)
        self.pump()

    def receive(self, data: bytes) -> None:
        self.transfer.receive_datagram(data, self.server.loop.time())
        self.pump()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.own_socket:
            self.transport.close()
        self.transfer.source.close()


class _TransferSocket(asyncio.DatagramProtocol):
    """An ephemeral per-transfer socket: its peer is the only valid TID."""

    def __init__(self) -> None:
        self.active: _Active | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if self.active is None or self.transport is None:
            return
        if addr != self.active.peer:
            # RFC 1350: a packet from a wrong TID gets ERROR 5 and does not disturb us
            self.transport.sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"),
                                  addr)
            return
        self.active.receive(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable etc.: the retransmit timer decides


class TftpServer(asyncio.DatagramProtocol):
    """The listening socket: parses requests, starts transfers, demuxes in single-port."""

    def __init__(self, settings: Callable[[], TftpSettings], *, single_port: bool = False,
                 on_record: OnRecord | None = None) -> None:
        self.settings = settings  # the current snapshot's
        self.single_port = single_port
        self.on_record = on_record
        self.transport: asyncio.DatagramTransport | None = None
        self.active: dict[Addr, _Active] = {}
        self.opening: dict[Addr, None] = {}  # RRQs accepted, their socket not yet open
        self.accepting = True
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        current = self.active.get(addr)
        if len(data) >= 2 and data[1] in (Opcode.RRQ, Opcode.WRQ) and data[0] == 0:
            if current is not None and current.transfer.bytes_sent == 0 and (
                    current.filename == _peek_name(data)):
                return  # a retransmitted RRQ: the transfer's own timer answers it
            if not self.accepting:
                if self.transport is not None:
                    self.transport.sendto(encode_error(ErrorCode.NOT_DEFINED,
                                                       "server shutting down"), addr)
                return
            self.loop.create_task(self._start(data, addr))
        elif self.single_port and current is not None:
            current.receive(data)
        elif self.transport is not None and len(data) >= 4:
            self.transport.sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"),
                                  addr)

    def error_received(self, exc: Exception) -> None:
        pass

    async def _start(self, data: bytes, addr: Addr) -> None:
        assert self.transport is not None
        client = IPv4Address(addr[0])
        started = time.monotonic()
        settings = self.settings()
        try:
            request = parse_request(data)
            if request.opcode == Opcode.WRQ:
                raise TftpError(ErrorCode.ACCESS_VIOLATION, "bootd serves files read-only")
            # transfers whose socket is still being opened count too: RRQs arriving
            # together must not all pass these checks before any is registered
            held = [*self.active, *self.opening]
            if len(held) >= settings.max_transfers:
                raise TftpError(ErrorCode.NOT_DEFINED, "server busy, try again")
            # (a new RRQ from the same address and port replaces that transfer)
            if sum(1 for peer in held if peer[0] == addr[0] and peer != addr
                   ) >= settings.max_per_client:
                raise TftpError(ErrorCode.NOT_DEFINED,
                                "too many transfers from this address, try again")
            source = _open(settings.files, request.filename, client, request.mode)
        except TftpError as exc:
            self.transport.sendto(exc.packet(), addr)
            self._record(TransferRecord(client, addr[1], _peek_name(data), 0, 0, 0,
                                        time.monotonic() - started, TransferOutcome.ERROR,
                                        f"ERROR {exc.code}: {exc.message}", 0, 0), settings)
            return
        negotiated = negotiate(request.options, source.size, settings.limits)
        transfer = ReadTransfer(source, negotiated, settings.limits, self.loop.time())
        old = self.active.pop(addr, None)
        if old is not None:
            old.close()
        if self.single_port:
            transport, own = self.transport, False
            sock_proto: _TransferSocket | None = None
        else:
            self.opening[addr] = None
            try:
                t, sock_proto = await self.loop.create_datagram_endpoint(
                    _TransferSocket, local_addr=("0.0.0.0", 0), family=socket.AF_INET)
            except OSError as exc:
                source.close()
                self.transport.sendto(encode_error(ErrorCode.NOT_DEFINED, "no socket"), addr)
                log.warning("tftp cannot open transfer socket", error=str(exc))
                return
            finally:
                self.opening.pop(addr, None)
            transport, own = t, True
        active = _Active(self, transfer, addr, request.filename, settings, transport, own)
        if sock_proto is not None:
            sock_proto.active = active
        self.active[addr] = active
        active.pump()

    def finish(self, active: _Active, event: Event) -> None:
        if self.active.get(active.peer) is active:
            del self.active[active.peer]
        active.close()
        t = active.transfer
        if isinstance(event, TransferDone):
            outcome, detail = TransferOutcome.OK, ""
        elif event.client_refused_options:
            outcome, detail = TransferOutcome.REFUSED_OPTIONS, event.reason
        elif event.final_ack_missing:
            outcome = TransferOutcome.UNCONFIRMED
            detail = "all data sent; the client's last ACK never came"
        else:
            outcome, detail = TransferOutcome.FAILED, event.reason
        self._record(TransferRecord(
            IPv4Address(active.peer[0]), active.peer[1], active.filename, t.source.size,
            t.blksize, t.windowsize, time.monotonic() - active.started, outcome, detail,
            t.bytes_sent, t.retransmits), active.settings)

    def _record(self, record: TransferRecord, settings: TftpSettings) -> None:
        if self.on_record is not None:
            self.on_record(record, settings)

    async def drain(self, timeout: float) -> int:
        """Refuse new requests, let transfers in flight finish for up to `timeout`;
        returns how many were still running when the time ran out."""
        self.accepting = False
        deadline = self.loop.time() + timeout
        while self.active and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        return len(self.active)

    def close(self) -> None:
        for active in list(self.active.values()):
            active.close()
        self.active.clear()
        if self.transport is not None:
            self.transport.close()


def _open(files: FileTree, name: str, client: IPv4Address, mode: str) -> Source:
    """The file tree's answer as a TFTP source, or the TftpError the client should see."""
    try:
        source: Source = files.open(name, client, time.time())
    except NotFound as exc:
        raise TftpError(ErrorCode.FILE_NOT_FOUND, str(exc)) from None
    except Forbidden as exc:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, str(exc)) from None
    if mode != "netascii":
        return source
    try:
        if source.size > NETASCII_LIMIT:
            raise TftpError(ErrorCode.ACCESS_VIOLATION,
                            "netascii transfers are limited to 16 MiB; use octet")
        return BytesSource(netascii(source.read(0, source.size)))
    finally:
        source.close()


def _peek_name(data: bytes) -> str:
    return data[2:].split(b"\0", 1)[0].decode("utf-8", "replace")


async def start_tftp(settings: Callable[[], TftpSettings], port: int, *,
                     host: str = "0.0.0.0", single_port: bool = False,
                     on_record: OnRecord | None = None) -> TftpServer:
    loop = asyncio.get_running_loop()
    try:
        _, server = await loop.create_datagram_endpoint(
            lambda: TftpServer(settings, single_port=single_port, on_record=on_record),
            local_addr=(host, port), family=socket.AF_INET, reuse_port=False)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for TFTP on {host}:{port}: "
                      f"{exc.strerror}") from exc
    return server
