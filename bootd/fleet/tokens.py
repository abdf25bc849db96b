"""Join-token providers: value | file | command, refreshed on a schedule.

On failure the last good token stays in use and the failure is visible (status, metrics);
retries back off from 30s up to the refresh interval. Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass

import structlog

from bootd.fleet.config import ClusterConfig, TokenConfig

log = structlog.get_logger("bootd.tokens")

RETRY_FIRST = 30.0


@dataclass
class TokenStatus:
    source: str
    has_token: bool
    last_success: float | None
    last_error: str | None
    failures: int


class TokenProvider:
    def __init__(self, cluster: str, config: TokenConfig) -> None:
        self.cluster = cluster
        self.config = config
        self._token: str | None = config.value
        self._file_version: tuple[int, int] | None = None
        self.last_success: float | None = time.time() if config.value else None
        self.last_error: str | None = None
        self.failures = 0

    @property
    def source(self) -> str:
        return "value" if self.config.value else "file" if self.config.file else "command"

    def status(self) -> TokenStatus:
        return TokenStatus(self.source, self._token is not None, self.last_success,
                           self.last_error, self.failures)

    def token(self) -> str | None:
        """The current token; a `file` token is re-read when the file changes."""
        if self.config.file is not None:
            self._read_file()
        return self._token

    def _read_file(self) -> None:
        path = self.config.file
        assert path is not None
        try:
            st = os.stat(path)
            version = (st.st_ino, st.st_mtime_ns)
            if version == self._file_version:
                return
            text = path.read_text().strip()
        except OSError as exc:
            self._fail(f"cannot read {path}: {exc.strerror}")
            return
        if not text:
            self._fail(f"{path} is empty")
            return
        self._file_version = version
        self._succeed(text)

    async def refresh_command(self) -> bool:
        """Run the command once; True if it produced a token."""
        command = self.config.command
        assert command is not None
        try:
            proc = await asyncio.create_subprocess_shell(
                command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:
            self._fail(f"cannot run token command: {exc.strerror}")
            return False
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.config.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            self._fail(f"token command timed out after {self.config.timeout:g}s")
            return False
        except asyncio.CancelledError:  # shutdown, or a reload moved on: leave no orphan
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise
        text = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not text:
            detail = err.decode(errors="replace").strip()[-200:]
            self._fail(f"token command exited {proc.returncode}: {detail or 'no output'}")
            return False
        self._succeed(text[-1].strip())
        return True

    async def run(self) -> None:
        """Keep a `command` token fresh until cancelled. A provider kept across a reload
        starts again here: a token younger than `refresh` is not fetched again at once."""
        if self.config.command is None:
            return
        if self._token is not None and self.last_success is not None:
            await asyncio.sleep(max(0.0, self.last_success + self.config.refresh
                                    - time.time()))
        delay = RETRY_FIRST
        while True:
            if await self.refresh_command():
                delay = RETRY_FIRST
                await asyncio.sleep(self.config.refresh)
            else:
                await asyncio.sleep(min(delay, self.config.refresh))
                delay = min(delay * 2, self.config.refresh)

    def _succeed(self, token: str) -> None:
        self._token = token
        self.last_success = time.time()
        self.last_error = None
        self.failures = 0
        log.info("join token refreshed", cluster=self.cluster, source=self.source)

    def _fail(self, message: str) -> None:
        self.last_error = message
        self.failures += 1
        log.warning("join token refresh failed", cluster=self.cluster, source=self.source,
                    error=message, keeping_previous=self._token is not None)


def providers(clusters: dict[str, ClusterConfig]) -> dict[str, TokenProvider]:
    return {name: TokenProvider(name, c.token) for name, c in clusters.items()}
