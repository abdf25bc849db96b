"""Join tokens minted per node (issue 16, finding 11): one node's token is never another's,
it is revoked when its node reports joined, catch-all machines get a bounded number. The
mint and revoke commands are a kubeadm stand-in that records every call."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from ipaddress import IPv4Address
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bootd.fleet.config import ConfigError, parse_config
from bootd.fleet.tokens import Minted, MintedTokens
from bootd.http.admin import admin_app
from bootd.http.boot import boot_app
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.state import events as ev
from bootd.state.events import BootEvent
from bootd.state.recorder import EventPolicy, Recorder
from tests.unit.test_http_app import client_for, context, make_config

KUBEADM = """#!/bin/sh
# a kubeadm stand-in: `token create` prints a fresh token, `token delete ID` forgets one
echo "$*|node=$BOOTD_NODE|mac=$BOOTD_MAC|ip=$BOOTD_IP" >> {log}
case "$2" in
  create) printf '%06x.%016x\\n' $(shuf -i 0-16777215 -n 1) $(shuf -i 0-4294967295 -n 1) ;;
  delete) exit 0 ;;
esac
"""


def test_the_ledger_keeps_one_token_per_node_and_attempt() -> None:
    ledger = MintedTokens(ttl=900, max_catch_all=1)
    first = Minted("aaaaaa.0000000000000001", "n1", 1, 0.0, False)
    assert ledger.add(first) is None
    assert ledger.held("n1", 1, 10.0) == first.token
    assert ledger.held("n1", 2, 10.0) is None  # a new attempt: not this token
    assert ledger.held("n1", 1, 900.0) is None  # past its ttl
    second = Minted("bbbbbb.0000000000000002", "n1", 2, 20.0, False)
    assert ledger.add(second) == first  # replaced: to be revoked
    assert first.token_id == "aaaaaa"
    assert ledger.may_mint("c1", catch_all=True)
    ledger.add(Minted("cccccc.0000000000000003", "c1", 1, 30.0, True))
    assert not ledger.may_mint("c2", catch_all=True)  # the cap
    assert ledger.may_mint("c1", catch_all=True)  # its own next attempt is fine
    assert ledger.may_mint("n2", catch_all=False)  # reserved nodes are not capped
    assert [m.node for m in ledger.expired(925.0)] == ["n1"]  # minted at 20
    assert ledger.finish("c1") is not None and len(ledger) == 0


@pytest.mark.parametrize("token,error", [
    ("{value: x, per_node: true}", "per_node tokens are minted by a command"),
    ("{command: x, revoke: y}", "revoke is for per_node tokens")])
def test_per_node_config_is_checked(tree: Path, token: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_config(make_config(tree, token=token))


@pytest.fixture
async def minting(tree: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application],
                                                      Recorder, Path, Metrics]]:
    log = tree / "kubeadm.log"
    kubeadm = tree / "kubeadm"
    kubeadm.write_text(KUBEADM.format(log=log))
    kubeadm.chmod(0o755)
    token = (f'{{command: "{kubeadm} token create --ttl 15m --description bootd-{{node}}", '
             f'per_node: true, revoke: "{kubeadm} token delete {{token_id}}", '
             f'max_catch_all: 1}}')
    snapshot = context(tree, make_config(tree, token=token))
    leases = snapshot.directory.leases
    assert leases is not None
    for i in (1, 2):  # two catch-all machines holding addresses
        leases.offer(f"52:54:00:00:00:0{i}", time.time(), None, network="default")
        leases.bind(f"52:54:00:00:00:0{i}", IPv4Address(f"127.0.1.{i}"), time.time(), 3600)
    recorder = Recorder(None, EventPolicy(600, 3))
    metrics = Metrics()
    app = boot_app(View.fixed(snapshot.boot), metrics, recorder)
    client = await client_for(app)
    admin = await client_for(admin_app(View.fixed(snapshot.admin), metrics))
    try:
        yield client, recorder, log, metrics
    finally:
        await client.close()
        await admin.close()


async def get_from(client: TestClient[web.Request, web.Application], source: str,
                   path: str) -> tuple[int, str]:
    """A request from another loopback address, as that node would send it."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (aiohttp.ClientSession(connector=connector) as session,
                session.get(client.make_url(path)) as resp):
        return resp.status, await resp.text()


def token_in(script: str) -> str:
    found = re.search(r"--token ([a-z0-9]{6}\.[a-z0-9]{16})", script)
    assert found, script[-500:]
    return found.group(1)


async def test_each_node_gets_its_own_token_revoked_after_joined(
        minting: tuple[TestClient[web.Request, web.Application], Recorder, Path, Metrics],
        ) -> None:
    client, recorder, log, _ = minting
    mine = await client.get("/nodes/02:00:00:00:00:01/join.sh")
    assert mine.status == 200
    me = token_in(await mine.text())
    again = token_in(await (await client.get("/nodes/02:00:00:00:00:01/join.sh")).text())
    assert again == me  # the same attempt: one token, minted once
    status, text = await get_from(client, "127.0.0.2", "/nodes/02:00:00:00:00:02/join.sh")
    assert status == 200
    other = token_in(text)
    assert other != me and me not in text
    calls = log.read_text().splitlines()
    assert calls == [
        "token create --ttl 15m --description bootd-me|node=me|mac=02:00:00:00:00:01"
        "|ip=127.0.0.1",
        "token create --ttl 15m --description bootd-other|node=other|mac=02:00:00:00:00:02"
        "|ip=127.0.0.2"]

    # `joined`: the token is revoked at once
    assert (await client.post("/api/v1/events", json={"stage": "joined"})).status == 204
    for _ in range(50):
        if len(log.read_text().splitlines()) == 3:
            break
        await asyncio.sleep(0.05)
    assert log.read_text().splitlines()[2].startswith(f"token delete {me.split('.')[0]}|")

    # a new boot attempt mints a new token
    recorder.record(BootEvent(time.time(), ev.DHCP_DISCOVER, "me", "02:00:00:00:00:01",
                              None, "w", detail={"firmware": "bios"}))
    fresh = token_in(await (await client.get("/nodes/02:00:00:00:00:01/join.sh")).text())
    assert fresh not in (me, other)

    # catch-all machines: one token outstanding at most, then 503 with a reason
    status, text = await get_from(client, "127.0.1.1", "/nodes/52:54:00:00:00:01/join.sh")
    assert status == 200 and token_in(text) not in (me, other, fresh)
    status, text = await get_from(client, "127.0.1.2", "/nodes/52:54:00:00:00:02/join.sh")
    assert status == 503 and "catch-all machines hold join tokens" in text
    assert len(log.read_text().splitlines()) == 5  # the refused one ran no command


async def test_tokens_are_counted_on_the_admin_metrics(tree: Path) -> None:
    kubeadm = tree / "kubeadm"
    kubeadm.write_text(KUBEADM.format(log=tree / "k.log"))
    kubeadm.chmod(0o755)
    token = f'{{command: "{kubeadm} token create", per_node: true, max_catch_all: 0}}'
    snapshot = context(tree, make_config(tree, token=token))
    metrics = Metrics()
    boot = await client_for(boot_app(View.fixed(snapshot.boot), metrics, None))
    admin = await client_for(admin_app(View.fixed(snapshot.admin), metrics))
    try:
        assert (await boot.get("/nodes/02:00:00:00:00:01/join.sh")).status == 200
        exposed = await (await admin.get("/metrics")).text()
        assert 'bootd_join_tokens_per_node{cluster="prod",kind="minted"} 1.0' in exposed
        assert 'bootd_join_tokens_per_node{cluster="prod",kind="outstanding"} 1.0' in exposed
        assert 'bootd_join_token_available{cluster="prod"} 1.0' in exposed
    finally:
        await boot.close()
        await admin.close()
