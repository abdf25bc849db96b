"""Run an aiohttp app on a listener: the boot network's address, or the admin API's unix
socket or loopback address, with a bounded drain on the way out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, *, host: str | None = None, port: int = 0,
                     api: str | None = None, drain: float = 5.0,
                     ) -> AsyncIterator[web.AppRunner]:
    """Run an aiohttp app on host:port, or on `api` (a unix socket path or loopback
    host:port, never the boot network). On exit it stops listening and gives requests in
    flight up to `drain` seconds."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=drain)
    await runner.setup()
    try:
        site: web.BaseSite
        if api is not None and api.startswith("/"):
            Path(api).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                Path(api).unlink()  # a stale socket from an earlier run
            site = web.UnixSite(runner, api)
        elif api is not None:
            api_host, _, api_port = api.rpartition(":")
            site = web.TCPSite(runner, api_host.strip("[]"), int(api_port))
        else:
            site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            where = api or f"{host}:{port}"
            raise OSError(exc.errno, f"cannot listen for HTTP on {where}: {exc.strerror}",
                          ) from exc
        yield runner
    finally:
        if runner.server is not None:  # not already drained by the caller
            await runner.cleanup()
