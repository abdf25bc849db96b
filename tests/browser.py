"""A real browser for the tests: Debian's headless Chromium, driven over the DevTools
protocol on a pipe (--remote-debugging-pipe). A pipe, not a port: Chromium runs inside the
namespace of the bootd under test (whose admin API listens on that namespace's loopback)
while the test talks to it from outside, through two file descriptors."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
import zlib
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keeps it off every network but the page's
# (no component updates, no sync, no QUIC probes to the outside world).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--hide-scrollbars", "--remote-debugging-pipe"]


def available() -> str | None:
    """Why there is no browser here, or None."""
    return None if Path(CHROMIUM).exists() else f"needs {CHROMIUM} (Debian package chromium)"


class BrowserError(RuntimeError):
    pass


class Browser:
    """One Chromium and one page in it. `netns`: run it in that network namespace."""

    def __init__(self, profile: Path, netns: str | None = None,
                 size: tuple[int, int] = (1400, 1000)) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        prefix = ["ip", "netns", "exec", netns] if netns else []
        # fds 3 and 4 are where Chromium expects the pipe; bash puts them there (dash's
        # redirections take one-digit fds only)
        shell = f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*prefix, "bash", "-c", shell, "bash", CHROMIUM, *FLAGS,
             f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
            stderr=(profile / "chromium.log").open("wb"))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=size[0],
                  height=size[1], deviceScaleFactor=1, mobile=False)

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
            if not ready:
                raise BrowserError(f"no answer from Chromium in {timeout}s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, session: bool = False, timeout: float = 30.0,
             **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read(max(0.0, deadline - time.monotonic()))
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            if "method" in answer:
                self.events.append(answer)

    def goto(self, url: str, timeout: float = 30.0) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for("document.readyState === 'complete'", timeout)

    def eval(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", session=True, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0) -> float:
        """Poll until `expression` is truthy in the page; the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.eval(f"!!({expression})"):
                return time.monotonic() - started
            time.sleep(0.05)
        raise BrowserError(f"not true within {timeout}s: {expression}")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            width, height = self.eval("[document.documentElement.scrollWidth, "
                                      "document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1})
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_chrome, self._from_chrome):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the raw (filtered) scanlines of a PNG: enough to tell a blank
    screenshot from a drawn one without an imaging library."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def not_blank(path: Path) -> bool:
    """A screenshot with something on it: many distinct byte values, not one colour."""
    _, _, pixels = png_pixels(path)
    return len(set(pixels[: 4 << 20])) > 32


def save_artifact(path: Path) -> None:
    """Copy a screenshot where the caller asked for artifacts (BOOTD_ARTIFACTS)."""
    where = os.environ.get("BOOTD_ARTIFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(where) / path.name)
