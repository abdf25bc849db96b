"""Join-token providers: refresh, last good token kept on failure, command timeout."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bootd.fleet.config import TokenConfig
from bootd.fleet.tokens import TokenProvider


def test_value_token() -> None:
    p = TokenProvider("c", TokenConfig(value="abc.def"))
    assert p.token() == "abc.def" and p.status().has_token and p.source == "value"


def test_file_token_reread_when_changed(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("first.token\n")
    p = TokenProvider("c", TokenConfig(file=f))
    assert p.token() == "first.token"
    f.write_text("second.token\n")
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert p.token() == "second.token"
    f.unlink()
    assert p.token() == "second.token"  # last good kept
    assert p.status().last_error is not None and "cannot read" in p.status().last_error
    f.write_text("")
    assert p.token() == "second.token" and "empty" in str(p.last_error)


async def test_command_token_refresh_and_failure_keeps_last_good(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    counter.write_text("0")
    script = tmp_path / "tok.sh"
    script.write_text(f"#!/bin/sh\nn=$(cat {counter}); n=$((n+1)); echo $n > {counter}\n"
                      f"[ -e {tmp_path}/fail ] && {{ echo broken >&2; exit 3; }}\n"
                      "echo \"token.$n\"\n")
    script.chmod(0o755)
    p = TokenProvider("c", TokenConfig(command=str(script)))
    assert p.token() is None
    assert await p.refresh_command()
    assert p.token() == "token.1"
    (tmp_path / "fail").touch()
    assert not await p.refresh_command()
    assert p.token() == "token.1"
    status = p.status()
    assert status.failures == 1 and "exited 3: broken" in str(status.last_error)
    (tmp_path / "fail").unlink()
    assert await p.refresh_command() and p.token() == "token.3"
    assert p.status().failures == 0 and p.status().last_error is None


async def test_command_timeout_kills_it() -> None:
    p = TokenProvider("c", TokenConfig(command="sleep 30; echo late", timeout=0.3))
    started = time.monotonic()
    assert not await p.refresh_command()
    assert time.monotonic() - started < 5
    assert "timed out" in str(p.last_error) and p.token() is None


async def test_command_with_no_output_fails() -> None:
    p = TokenProvider("c", TokenConfig(command="true"))
    assert not await p.refresh_command()
    assert "no output" in str(p.last_error)


async def test_a_provider_kept_across_a_reload_does_not_refetch_a_fresh_token(
        tmp_path: Path) -> None:
    """run() is started again for each runtime snapshot; a token younger than `refresh`
    must not make the command (kubeadm token create) run again at once."""
    import asyncio

    runs = tmp_path / "runs"
    p = TokenProvider("c", TokenConfig(command=f"echo x >> {runs}; echo abcdef.0123456789abcdef",
                                       refresh=3600))
    first = asyncio.create_task(p.run())
    for _ in range(100):
        if p.token() is not None:
            break
        await asyncio.sleep(0.02)
    first.cancel()  # the reload: this snapshot's background work ends ...
    second = asyncio.create_task(p.run())  # ... and the next snapshot's starts
    await asyncio.sleep(0.3)
    second.cancel()
    assert runs.read_text().count("x") == 1 and p.token() == "abcdef.0123456789abcdef"
