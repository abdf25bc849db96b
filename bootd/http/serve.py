"""Run an aiohttp app on a listener: the boot network's address, or the admin API's unix
socket or loopback address, with a bounded drain on the way out. The boot listener may
have a front (bootd/http/fastlane.py) that takes each connection first and gives it to
aiohttp when it should."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web


class Front(Protocol):
    def protocol(self) -> asyncio.Protocol: ...

    def close(self) -> None: ...


# (the app, aiohttp's protocol factory) -> the front
FrontFactory = Callable[[web.Application, Callable[[], asyncio.Protocol]], Front]


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, *, host: str | None = None, port: int = 0,
                     api: str | None = None, drain: float = 5.0,
                     front: FrontFactory | None = None) -> AsyncIterator[web.AppRunner]:
    """Run an aiohttp app on host:port, or on `api` (a unix socket path or loopback
    host:port, never the boot network). On exit (or the runner's cleanup) it stops
    listening and gives requests in flight up to `drain` seconds. `front`: host:port's
    connections go to it first."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=drain)
    listening: list[asyncio.Server] = []
    fronts: list[Front] = []

    async def stop_front(_: web.Application) -> None:
        for server in listening:
            server.close()
        for started in fronts:
            started.close()

    if front is not None:
        app.on_shutdown.append(stop_front)  # the runner's cleanup: before aiohttp drains
    await runner.setup()
    where = api or f"{host}:{port}"
    try:
        try:
            if front is not None and api is None:
                assert runner.server is not None
                fronts.append(front(app, runner.server))
                listening.append(await asyncio.get_running_loop().create_server(
                    fronts[0].protocol, host, port, reuse_address=True))
            else:
                await _site(runner, host, port, api).start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for HTTP on {where}: {exc.strerror}",
                          ) from exc
        yield runner
    finally:
        if runner.server is not None:  # not already drained by the caller
            await runner.cleanup()


def _site(runner: web.AppRunner, host: str | None, port: int,
          api: str | None) -> web.BaseSite:
    if api is not None and api.startswith("/"):
        Path(api).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            Path(api).unlink()  # a stale socket from an earlier run
        return web.UnixSite(runner, api)
    if api is not None:
        api_host, _, api_port = api.rpartition(":")
        return web.TCPSite(runner, api_host.strip("[]"), int(api_port))
    return web.TCPSite(runner, host, port, reuse_address=True)
