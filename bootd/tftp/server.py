"""asyncio shell around ReadTransfer: sockets, one timer per transfer, nothing else.

By default every transfer gets its own ephemeral UDP socket (RFC 1350 TIDs). In
single-port mode every transfer is served from the listening port and told apart by the
peer's address, so TFTP works behind NAT or a Kubernetes Service that forwards one port.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import cast

import structlog

from bootd.fleet.filetree import FileResolver, FileSource
from bootd.tftp.protocol import (
    ErrorCode,
    Event,
    Limits,
    Opcode,
    ReadTransfer,
    TftpError,
    TransferDone,
    encode_error,
    negotiate,
    parse_request,
)

log = structlog.get_logger("bootd.tftp")

Addr = tuple[str, int]


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
    outcome: str  # ok | unconfirmed | failed | refused-options | error
    detail: str
    bytes_sent: int
    retransmits: int


OnRecord = Callable[[TransferRecord], None]


class _Active:
    """A transfer and the socket it speaks through."""

    def __init__(self, server: TftpServer, transfer: ReadTransfer, peer: Addr, filename: str,
                 source_close: Callable[[], None], transport: asyncio.DatagramTransport,
                 own_socket: bool) -> None:
        self.server = server
        self.transfer = transfer
        self.peer = peer
        self.filename = filename
        self.started = time.monotonic()
        self.source_close = source_close
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
        self.source_close()


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

    def __init__(self, files: FileResolver, limits: Limits, *, single_port: bool = False,
                 max_transfers: int = 1000, on_record: OnRecord | None = None) -> None:
        self.files = files
        self.limits = limits
        self.single_port = single_port
        self.max_transfers = max_transfers
        self.on_record = on_record
        self.transport: asyncio.DatagramTransport | None = None
        self.active: dict[Addr, _Active] = {}
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
        try:
            request = parse_request(data)
            if request.opcode == Opcode.WRQ:
                raise TftpError(ErrorCode.ACCESS_VIOLATION, "bootd serves files read-only")
            if len(self.active) >= self.max_transfers:
                raise TftpError(ErrorCode.NOT_DEFINED, "server busy, try again")
            source = self.files.open(request.filename, client, request.mode)
        except TftpError as exc:
            self.transport.sendto(exc.packet(), addr)
            self._record(TransferRecord(client, addr[1], _peek_name(data), 0, 0, 0,
                                        time.monotonic() - started, "error",
                                        f"ERROR {exc.code}: {exc.message}", 0, 0))
            return
        negotiated = negotiate(request.options, source.size, self.limits)
        transfer = ReadTransfer(source, negotiated, self.limits, self.loop.time())
        close = source.close if isinstance(source, FileSource) else _nothing
        old = self.active.pop(addr, None)
        if old is not None:
            old.close()
        if self.single_port:
            transport, own = self.transport, False
            sock_proto: _TransferSocket | None = None
        else:
            try:
                t, sock_proto = await self.loop.create_datagram_endpoint(
                    _TransferSocket, local_addr=("0.0.0.0", 0), family=socket.AF_INET)
            except OSError as exc:
                close()
                self.transport.sendto(encode_error(ErrorCode.NOT_DEFINED, "no socket"), addr)
                log.warning("tftp cannot open transfer socket", error=str(exc))
                return
            transport, own = t, True
        active = _Active(self, transfer, addr, request.filename, close, transport, own)
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
            outcome, detail = "ok", ""
        elif event.client_refused_options:
            outcome, detail = "refused-options", event.reason
        elif event.final_ack_missing:
            outcome, detail = "unconfirmed", "all data sent; the client's last ACK never came"
        else:
            outcome, detail = "failed", event.reason
        self._record(TransferRecord(
            IPv4Address(active.peer[0]), active.peer[1], active.filename, t.source.size,
            t.blksize, t.windowsize, time.monotonic() - active.started, outcome, detail,
            t.bytes_sent, t.retransmits))

    def _record(self, record: TransferRecord) -> None:
        if self.on_record is not None:
            self.on_record(record)

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


def _nothing() -> None:
    return None


def _peek_name(data: bytes) -> str:
    return data[2:].split(b"\0", 1)[0].decode("utf-8", "replace")


async def start_tftp(files: FileResolver, limits: Limits, port: int, *,
                     host: str = "0.0.0.0", single_port: bool = False,
                     max_transfers: int = 1000, on_record: OnRecord | None = None,
                     ) -> TftpServer:
    loop = asyncio.get_running_loop()
    try:
        _, server = await loop.create_datagram_endpoint(
            lambda: TftpServer(files, limits, single_port=single_port,
                               max_transfers=max_transfers, on_record=on_record),
            local_addr=(host, port), family=socket.AF_INET, reuse_port=False)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen for TFTP on {host}:{port}: "
                      f"{exc.strerror}") from exc
    return server
