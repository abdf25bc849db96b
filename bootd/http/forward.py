"""A loopback TCP port in front of the admin API's unix socket, so that a browser can open
the status page (`bootd status --web`, `bootd lab`).

Bytes are copied both ways, unchanged: the page's Server-Sent Events stream flows through
as it is written. It listens on loopback only; reaching it from another machine is for
`ssh -L`, which also forwards to the unix socket directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def start_forwarder(socket_path: str, host: str = "127.0.0.1",
                          port: int = 0) -> asyncio.Server:
    async def connect(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                      ) -> None:
        try:
            api_r, api_w = await asyncio.open_unix_connection(socket_path)
        except OSError:
            client_w.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 33\r\n"
                           b"Connection: close\r\n\r\nbootd: the daemon is not running\n")
            client_w.close()
            return
        try:
            await asyncio.gather(_copy(client_r, api_w), _copy(api_r, client_w))
        finally:
            for writer in (api_w, client_w):
                writer.close()

    return await asyncio.start_server(connect, host, port)


@contextlib.contextmanager
def forwarding(socket_path: str, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """For synchronous callers (the lab): forward from a thread; yields the page's URL."""
    loop = asyncio.new_event_loop()
    started: list[asyncio.Server] = []
    ready = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.append(loop.run_until_complete(start_forwarder(socket_path, host, port)))
        except OSError as exc:
            failure.append(exc)
            return
        finally:
            ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="bootd-page-forwarder", daemon=True)
    thread.start()
    ready.wait(10)
    if failure or not started:
        loop.close()
        raise OSError(f"cannot listen on {host}:{port}: {failure[0] if failure else '?'}")
    bound = started[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}/"
    finally:
        async def stop() -> None:
            started[0].close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
