"""Join-token providers: value | file | command, refreshed on a schedule; or a command
that mints a token per node (`per_node`).

On failure the last good token stays in use and the failure is visible (status, metrics);
retries back off from 30s up to the refresh interval. Tokens are never logged.

Minted tokens (theory of operation):

1. A node gets a token when it first asks for its join.sh (or user-data) in a boot
   attempt; asking again in the same attempt returns the same token, a new attempt
   mints a new one and revokes the old.
2. A token is held by one node and handed to nobody else; it is revoked (the `revoke`
   command) when its node reports `joined` or `failed`, and `ttl` after it was minted
   at the latest.
3. Catch-all nodes may hold at most `max_catch_all` tokens at once: a flood of fake
   machines obtains that many, then 503s (counted as refused).
4. `MintedTokens` is the ledger (pure, time as a parameter); the provider runs the
   commands around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
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
    minted: int = 0
    revoked: int = 0
    refused: int = 0
    outstanding: int = 0


@dataclass(frozen=True)
class Minted:
    token: str
    node: str
    attempt: int
    minted: float
    catch_all: bool

    @property
    def token_id(self) -> str:
        return self.token.split(".", 1)[0]


class TokenRefused(Exception):
    """No token for this node now (the catch-all cap, or the mint command failed)."""


class MintedTokens:
    """Which node holds which minted token; see the module's rules 1-3."""

    def __init__(self, ttl: float, max_catch_all: int) -> None:
        self.ttl, self.max_catch_all = ttl, max_catch_all
        self._by_node: dict[str, Minted] = {}

    def held(self, node: str, attempt: int, now: float) -> str | None:
        minted = self._by_node.get(node)
        if minted is None or minted.attempt != attempt or now - minted.minted >= self.ttl:
            return None
        return minted.token

    def may_mint(self, node: str, catch_all: bool) -> bool:
        if not catch_all:
            return True
        others = sum(1 for m in self._by_node.values() if m.catch_all and m.node != node)
        return others < self.max_catch_all

    def add(self, minted: Minted) -> Minted | None:
        """Record a new token; the one it replaces (to revoke), if any."""
        old = self._by_node.get(minted.node)
        self._by_node[minted.node] = minted
        return old

    def finish(self, node: str) -> Minted | None:
        return self._by_node.pop(node, None)

    def expired(self, now: float) -> list[Minted]:
        gone = [m for m in self._by_node.values() if now - m.minted >= self.ttl]
        for minted in gone:
            del self._by_node[minted.node]
        return gone

    def __len__(self) -> int:
        return len(self._by_node)


class TokenProvider:
    def __init__(self, cluster: str, config: TokenConfig) -> None:
        self.cluster = cluster
        self.config = config
        self._token: str | None = config.value
        self._file_version: tuple[int, int] | None = None
        self.last_success: float | None = time.time() if config.value else None
        self.last_error: str | None = None
        self.failures = 0
        self.minted = MintedTokens(config.ttl, config.max_catch_all)
        self.counts = {"minted": 0, "revoked": 0, "refused": 0}
        self._minting: dict[str, asyncio.Lock] = {}
        self._revocations: set[asyncio.Task[None]] = set()

    @property
    def source(self) -> str:
        if self.config.per_node:
            return "per-node"
        return "value" if self.config.value else "file" if self.config.file else "command"

    def status(self) -> TokenStatus:
        has = self._token is not None or (self.config.per_node and self.failures == 0)
        return TokenStatus(self.source, has, self.last_success, self.last_error,
                           self.failures, **self.counts, outstanding=len(self.minted))

    def token(self) -> str | None:
        """The current token; a `file` token is re-read when the file changes. None for
        per-node tokens: see `token_for`."""
        if self.config.file is not None:
            self._read_file()
        return self._token

    async def token_for(self, node: str, mac: str, ip: str, attempt: int,
                        catch_all: bool) -> str | None:
        """The token this node's boot attempt gets: its own minted one (rules 1-3;
        TokenRefused if none can be had now), else the cluster's shared one (None while
        there is none yet)."""
        if not self.config.per_node:
            return self.token()
        lock = self._minting.setdefault(node, asyncio.Lock())
        async with lock:  # two requests of one node mint one token
            now = time.time()
            held = self.minted.held(node, attempt, now)
            if held is not None:
                return held
            if not self.minted.may_mint(node, catch_all):
                self.counts["refused"] += 1
                raise TokenRefused(f"{self.config.max_catch_all} catch-all machines hold "
                                   "join tokens already")
            assert self.config.command is not None
            values = {"node": node, "mac": mac, "ip": ip}
            token = await self._run(_fill(self.config.command, values), _env(values))
            if token is None:
                raise TokenRefused(self.last_error or "the token command failed")
            self.counts["minted"] += 1
            self.last_success, self.last_error, self.failures = time.time(), None, 0
            log.info("join token minted", cluster=self.cluster, node=node, attempt=attempt)
            replaced = self.minted.add(Minted(token, node, attempt, now, catch_all))
            if replaced is not None:
                self._revoke_later(replaced, "a new boot attempt")
            return token

    def finish(self, node: str, why: str) -> None:
        """The node is done with its token (it reported joined or failed): a minted one
        is revoked; a shared token has nothing to finish."""
        minted = self.minted.finish(node)
        if minted is not None:
            self._revoke_later(minted, why)

    def _revoke_later(self, minted: Minted, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self.revoke(minted, why))
        self._revocations.add(task)
        task.add_done_callback(self._revocations.discard)

    async def revoke(self, minted: Minted, why: str) -> None:
        self.counts["revoked"] += 1
        log.info("join token revoked", cluster=self.cluster, node=minted.node, why=why)
        if self.config.revoke is None:
            return
        values = {"node": minted.node, "token_id": minted.token_id, "token": minted.token}
        await self._run(_fill(self.config.revoke, values), _env(values), want_output=False)

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
        assert self.config.command is not None
        token = await self._run(self.config.command)
        if token is None:
            return False
        self._succeed(token)
        return True

    async def _run(self, command: str, env: dict[str, str] | None = None, *,
                   want_output: bool = True) -> str | None:
        """Run a token command with the timeout; its last output line, or None (and the
        failure recorded)."""
        try:
            proc = await asyncio.create_subprocess_shell(
                command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, env={**os.environ, **(env or {})})
        except OSError as exc:
            self._fail(f"cannot run token command: {exc.strerror}")
            return None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.config.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            await proc.wait()
            self._fail(f"token command timed out after {self.config.timeout:g}s")
            return None
        except asyncio.CancelledError:  # shutdown, or a reload moved on: leave no orphan
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            raise
        text = out.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or (want_output and not text):
            detail = err.decode(errors="replace").strip()[-200:]
            self._fail(f"token command exited {proc.returncode}: {detail or 'no output'}")
            return None
        return text[-1].strip() if text else ""

    async def run(self) -> None:
        """Keep a `command` token fresh until cancelled. A provider kept across a reload
        starts again here: a token younger than `refresh` is not fetched again at once.
        Per-node tokens: revoke those past their `ttl`."""
        if self.config.per_node:
            while True:
                for minted in self.minted.expired(time.time()):
                    await self.revoke(minted, f"older than {self.config.ttl:g}s")
                await asyncio.sleep(min(30.0, self.config.ttl / 4))
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


def _fill(command: str, values: dict[str, str]) -> str:
    """{name} placeholders, shell-quoted; other braces (${VAR}) are left alone."""
    for name, value in values.items():
        command = command.replace("{" + name + "}", shlex.quote(value))
    return command


def _env(values: dict[str, str]) -> dict[str, str]:
    return {f"BOOTD_{name.upper()}": value for name, value in values.items()}


def providers(clusters: dict[str, ClusterConfig]) -> dict[str, TokenProvider]:
    return {name: TokenProvider(name, c.token) for name, c in clusters.items()}
