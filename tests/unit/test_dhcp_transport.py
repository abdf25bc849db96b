"""The DHCP transport's wakeup: drain the socket, known machines first, a budget for the
rest (see bootd.dhcp.transport's theory of operation), on a real loopback socket."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence

import pytest

from bootd.dhcp import transport
from bootd.dhcp.service import Datagram


class FakeService:
    shared = False

    def __init__(self) -> None:
        self.answered: list[bytes] = []
        self.batches = 0
        self.shed_count = 0

    def handle_batch(self, batch: Sequence[bytes], interface: str, now: float,
                     ) -> list[Datagram]:
        self.batches += 1
        self.answered.extend(batch)
        return []

    async def handle_batch_shared(self, batch: Sequence[bytes], interface: str, now: float,
                                  ) -> list[Datagram]:
        raise AssertionError("not in cluster mode")

    def is_known(self, data: bytes) -> bool:
        return data.startswith(b"known")

    def answers(self, data: bytes) -> bool:
        return not data.startswith(b"known theirs")

    def shed(self, count: int) -> None:
        self.shed_count += count


def loopback_pair(rcvbuf: int) -> tuple[socket.socket, socket.socket]:
    """A non-blocking loopback socket the endpoint reads, and one to send to it from."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock, socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


async def until_answered(service: FakeService) -> None:
    """Let the loop run until the endpoint's first wakeup has reached the service."""
    for _ in range(50):
        await asyncio.sleep(0.01)
        if service.answered:
            return


async def test_a_wakeup_answers_known_machines_first_and_sheds_the_excess() -> None:
    service = FakeService()
    sock, sender = loopback_pair(4 << 20)
    # a flood of 300 unknown datagrams with 3 known ones among them, all queued before
    # the loop gets to read
    sent = []
    for i in range(300):
        sent.append(f"unknown {i}".encode())
        if i in (10, 150, 299):
            sent.append(f"known {i}".encode())
    for data in sent:
        sender.sendto(data, sock.getsockname())
    endpoint = transport.DhcpEndpoint("lo", sock, service)
    try:
        await until_answered(service)
        budget = transport.UNKNOWN_PER_WAKEUP
        assert service.answered[:3] == [b"known 10", b"known 150", b"known 299"]
        assert service.answered[3:] == [f"unknown {i}".encode() for i in range(budget)]
        assert service.shed_count == 300 - budget
        assert service.batches == 1  # one wakeup, one batch: one store transaction
    finally:
        endpoint.close()
        sender.close()
    assert sock.fileno() == -1  # closed with the endpoint


async def test_a_quiet_socket_answers_everything() -> None:
    service = FakeService()
    sock, sender = loopback_pair(1 << 20)
    endpoint = transport.DhcpEndpoint("lo", sock, service)
    try:
        for i in range(5):
            sender.sendto(f"unknown {i}".encode(), sock.getsockname())
            await asyncio.sleep(0.01)
        assert len(service.answered) == 5 and service.shed_count == 0
    finally:
        endpoint.close()
        sender.close()


async def test_past_its_budget_a_wakeup_sheds_the_rest_instead_of_queueing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of BATCH_LIMIT, each answered before the next; once a wakeup has worked
    WAKEUP_BUDGET, what is left (known machines' datagrams too) is shed."""
    monkeypatch.setattr(transport, "BATCH_LIMIT", 10)
    monkeypatch.setattr(transport, "WAKEUP_BUDGET", 0.05)

    class SlowService(FakeService):
        def handle_batch(self, batch: Sequence[bytes], interface: str, now: float,
                         ) -> list[Datagram]:
            time.sleep(0.03)  # a batch's worth of work
            return super().handle_batch(batch, interface, now)

    service = SlowService()
    sock, sender = loopback_pair(1 << 20)
    for i in range(100):
        sender.sendto(f"known {i}".encode(), sock.getsockname())
    endpoint = transport.DhcpEndpoint("lo", sock, service)
    try:
        await until_answered(service)
        # 0.03 s after the first batch: under budget, one more; 0.06 s: the rest is shed
        assert service.batches == 2
        assert service.answered == [f"known {i}".encode() for i in range(20)]
        assert service.shed_count == 80
    finally:
        endpoint.close()
        sender.close()


class SharedFakeService(FakeService):
    """Cluster mode: each batch waits for its claims (here: a short sleep)."""

    shared = True

    def __init__(self) -> None:
        super().__init__()
        self.decided: list[bytes] = []
        self.running = 0
        self.most_at_once = 0

    async def handle_batch_shared(self, batch: Sequence[bytes], interface: str, now: float,
                                  ) -> list[Datagram]:
        self.decided.extend(batch)  # the synchronous part: decide, before any await
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        await asyncio.sleep(0.005)  # the claims in etcd
        self.batches += 1
        self.answered.extend(batch)
        self.running -= 1
        return []


async def test_cluster_mode_decides_in_order_overlaps_claims_and_bounds_the_backlog(
        ) -> None:
    service = SharedFakeService()
    sock, sender = loopback_pair(4 << 20)
    backlog = transport.SHARED_BACKLOG
    sent = [f"known {i}".encode() for i in range(backlog + 100)]
    for i, data in enumerate(sent):
        sender.sendto(data, sock.getsockname())
        if i % 3 == 0:  # another member's client: dropped at once, takes no queue space
            sender.sendto(b"known theirs %d" % i, sock.getsockname())
    endpoint = transport.DhcpEndpoint("lo", sock, service)
    try:
        for _ in range(500):
            await asyncio.sleep(0.01)
            if service.batches and endpoint.worker is not None and endpoint.worker.done():
                break
        assert service.decided == sent[:backlog]  # in arrival order
        assert sorted(service.answered) == sorted(sent[:backlog])
        assert service.shed_count == len(sent) - backlog
        assert service.batches == backlog // transport.BATCH_LIMIT
        assert 1 < service.most_at_once <= transport.SHARED_IN_FLIGHT
        # a later datagram starts the worker again
        sender.sendto(b"known late", sock.getsockname())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if service.answered[-1:] == [b"known late"]:
                break
        assert service.answered[-1:] == [b"known late"]
    finally:
        endpoint.close()
        sender.close()
