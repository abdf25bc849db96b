"""The boot listener's fast lane (bootd/http/fastlane.py) over real TCP: what it answers is
byte for byte what aiohttp answers, and everything else reaches aiohttp intact."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bootd.http import fastlane
from bootd.http.fastlane import Lane, LaneProtocol
from bootd.state.recorder import EventPolicy, Recorder
from tests.unit.test_http_app import boot_of, context

SCRIPT = b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nHost: bootd\r\n\r\n"
DATE = re.compile(rb"Date: [^\r]+\r\n")


class Served:
    def __init__(self, lane: Lane, port: int, recorder: Recorder) -> None:
        self.lane, self.port, self.recorder = lane, port, recorder
        self.handed: list[bytes] = []

    async def exchange(self, *sends: bytes, expect: int = 1, pause: float = 0.0,
                       ) -> list[bytes]:
        """Send, then read `expect` whole responses (Content-Length framed)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for data in sends:
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(pause)
            return [await read_response(reader) for _ in range(expect)]
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


@pytest.fixture
async def served(tree: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    recorder = Recorder(None, EventPolicy(stall_after=600, keep_attempts=3))
    app = boot_of(context(tree), recorder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    lane = Lane(app, runner.server)
    server = await asyncio.get_running_loop().create_server(lane.protocol, "127.0.0.1", 0)
    out = Served(lane, server.sockets[0].getsockname()[1], recorder)
    real = LaneProtocol._hand_over

    def hand_over(self: LaneProtocol, transport: Any, rest: bytes) -> None:
        out.handed.append(rest)
        real(self, transport, rest)

    monkeypatch.setattr(LaneProtocol, "_hand_over", hand_over)
    yield out
    server.close()
    lane.close()
    await runner.cleanup()


def events_of(recorder: Recorder) -> list[str]:
    state = recorder.state("me")
    if state is None:
        return []
    return [str(s["stage"]) for a in state.to_json(with_history=10)["history"]
            for s in a["steps"]]


async def test_a_cached_script_is_answered_as_aiohttp_answers_it(served: Served) -> None:
    first, = await served.exchange(SCRIPT)  # not rendered yet: aiohttp's route renders it
    assert served.handed == [SCRIPT]
    second, = await served.exchange(SCRIPT)
    assert served.handed == [SCRIPT]  # answered by the lane
    assert DATE.sub(b"", first) == DATE.sub(b"", second)
    assert second.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n")
    assert b"kernel --name vmlinuz http://127.0.0.53:8080/images/k8s/kernel" in second
    assert events_of(served.recorder).count("ipxe-script") == 2  # the same boot event


async def test_pipelined_and_split_requests_and_the_hand_over_in_between(
        served: Served) -> None:
    await served.exchange(SCRIPT)
    served.handed.clear()
    generic = b"GET /boot.ipxe HTTP/1.1\r\nHost: bootd\r\n\r\n"
    answers = await served.exchange(SCRIPT + SCRIPT + generic + SCRIPT, expect=4)
    assert served.handed == [generic + SCRIPT]  # the rest goes with the first it cannot
    assert [a.count(b"kernel --name vmlinuz") for a in answers] == [1, 1, 0, 1]
    assert b"chain --autofree" in answers[2]
    served.handed.clear()
    answers = await served.exchange(SCRIPT[:10], SCRIPT[10:30], SCRIPT[30:] + SCRIPT[:5],
                                    SCRIPT[5:], expect=2, pause=0.02)
    assert served.handed == [] and all(b"vmlinuz" in a for a in answers)


@pytest.mark.parametrize("request_bytes", [
    b"HEAD /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe?attempt=2 HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /nodes/02%2D00-00-00-00-01/boot.ipxe HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.0\r\n\r\n",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\n",
    b"GET /nodes/not-a-mac/boot.ipxe HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\nConnection: keep-alive\r\n"
    b"Connection: close\r\n\r\n",
])
async def test_anything_unusual_goes_to_aiohttp(served: Served, request_bytes: bytes) -> None:
    await served.exchange(SCRIPT)  # the script is cached: only the request's form decides
    served.handed.clear()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(request_bytes)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert served.handed == [request_bytes]
    assert head.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "))


async def test_an_oversized_head_meets_aiohttp_s_limit(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(SCRIPT[:-2] + b"X-Filler: " + b"a" * 9000 + b"\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert len(served.handed) == 1 and b" 400 Bad Request" in head.split(b"\r\n")[0]


async def test_keep_alive_and_shutdown(served: Served, monkeypatch: pytest.MonkeyPatch,
                                       ) -> None:
    await served.exchange(SCRIPT)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(b"GET /nodes/02-00-00-00-00-01/boot.ipxe HTTP/1.1\r\n"
                 b"Connection: Keep-Alive\r\n\r\n")
    await read_response(reader)
    assert len(served.lane.connections) == 1  # still the lane's, kept alive
    for connection in served.lane.connections:
        connection.last -= fastlane.KEEPALIVE + 1
    served.lane._sweep()  # an idle connection is closed after the keep-alive timeout
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    writer.write(SCRIPT)
    await read_response(reader)
    served.lane.close()  # shutdown: nothing of theirs is in flight
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


def test_a_client_that_does_not_read_stops_being_read() -> None:
    class Transport:
        def __init__(self) -> None:
            self.reading = True
            self.protocol: Any = None

        def get_extra_info(self, name: str) -> Any:
            return ("10.0.0.1", 1234)

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def set_protocol(self, protocol: Any) -> None:
            self.protocol = protocol

    class Handler:
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.data = data

    async def scenario() -> None:
        app = web.Application()
        app[fastlane.SETTINGS] = None  # type: ignore[assignment]
        app[fastlane.RECORDER] = None
        handler = Handler()
        lane = Lane(app, lambda: handler)  # type: ignore[arg-type,return-value]
        protocol = lane.protocol()
        transport = Transport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.pause_writing()
        assert not transport.reading
        protocol.resume_writing()
        assert transport.reading
        protocol.pause_writing()
        protocol.data_received(b"POST /x HTTP/1.1\r\n\r\n")  # handed over while paused
        assert transport.reading and transport.protocol is handler
        assert handler.data == b"POST /x HTTP/1.1\r\n\r\n"
        lane.close()

    asyncio.run(scenario())
