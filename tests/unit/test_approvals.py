"""Catch-all join approval (`dynamic: {join: approve}`): a machine's join.sh waits until an
operator approves it, approvals survive a restart, and a flood cannot grow the list."""

from __future__ import annotations

import shutil
import subprocess
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bootd.http.admin import admin_app
from bootd.http.boot import boot_app
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.state import approvals as approvals_module
from bootd.state.approvals import Approvals
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store
from tests.unit.test_http_app import TOKEN, client_for, context, make_config
from tests.unit.test_tokens_per_node import get_from

CATCH_ALL = "52:54:00:00:00:01"
NAME = "node-52-54-00-00-00-01"


def test_approvals_are_kept_and_bounded(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "s.sqlite3")
    approvals = Approvals(store)
    approvals.ask("a", 1.0)
    approvals.ask("b", 2.0)
    assert approvals.approve(["a"], 3.0) == ["a"] and list(approvals.awaiting) == ["b"]
    assert approvals.approve(["a"], 4.0) == []  # already
    assert approvals.approve_all(5.0) == ["b"] and not approvals.awaiting
    store.close()
    assert Approvals(Store(tmp_path / "s.sqlite3")).approved == {"a", "b"}  # a restart
    monkeypatch.setattr(approvals_module, "MAX_AWAITING", 3)
    flood = Approvals(None)
    for i in range(10):
        flood.ask(f"fake-{i}", float(i))
    assert list(flood.awaiting) == ["fake-7", "fake-8", "fake-9"]


async def test_a_catch_all_machine_joins_once_approved(tree: Path) -> None:
    config = make_config(tree).replace(
        "dynamic: {range: 127.0.1.0-127.0.1.9}",
        "dynamic: {range: 127.0.1.0-127.0.1.9, join: approve, approval_poll: 2s}")
    assert "join: approve" in config
    snapshot = context(tree, config)
    leases = snapshot.directory.leases
    assert leases is not None
    leases.offer(CATCH_ALL, time.time(), None, network="default")
    leases.bind(CATCH_ALL, IPv4Address("127.0.1.1"), time.time(), 3600)
    recorder = Recorder(None, EventPolicy(600, 3))
    approvals = Approvals(Store(tree / "approvals.sqlite3"))
    boot = await client_for(boot_app(View.fixed(snapshot.boot), Metrics(), recorder,
                                     approvals))
    admin = await client_for(admin_app(View.fixed(snapshot.admin), Metrics(), recorder,
                                       approvals=approvals))
    try:
        status, script = await get_from(boot, "127.0.1.1", f"/nodes/{CATCH_ALL}/join.sh")
        assert status == 200 and script.startswith("#!/bin/sh\n# bootd: awaiting approval")
        assert TOKEN not in script and "sleep 2" in script
        assert f"bootd approve {NAME}" in script
        if shutil.which("shellcheck"):
            (tree / "wait.sh").write_text(script)
            lint = subprocess.run(["shellcheck", "-s", "sh", str(tree / "wait.sh")],
                                  capture_output=True, text=True, check=False)
            assert lint.returncode == 0, lint.stdout
        state = recorder.state(NAME)
        assert state is not None and state.stage == "awaiting-approval"
        status, _ = await get_from(boot, "127.0.1.1", f"/cloud-init/{CATCH_ALL}/user-data")
        assert status == 503
        listed = await (await admin.get("/api/v1/approvals")).json()
        assert list(listed["awaiting"]) == [NAME] and listed["approved"] == []

        typo = await admin.post("/api/v1/approve", json={"nodes": ["node-typo"]})
        assert typo.status == 404  # never approves a name no machine asked with
        assert (await admin.post("/api/v1/approve", data=b"[1]")).status == 400
        done = await admin.post("/api/v1/approve", json={"all": True})
        assert await done.json() == {"approved": [NAME]}

        status, script = await get_from(boot, "127.0.1.1", f"/nodes/{CATCH_ALL}/join.sh")
        assert status == 200 and f"--token {TOKEN}" in script
        assert "awaiting approval" not in script
        # a reserved node never waits
        own = await (await boot.get("/nodes/02:00:00:00:00:01/join.sh")).text()
        assert f"--token {TOKEN}" in own
    finally:
        await boot.close()
        await admin.close()


def test_approve_command_needs_names_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    from bootd.cli.main import main

    assert main(["approve", "--api", "/nonexistent.sock"]) == 2
    assert "name nodes, or --all" in capsys.readouterr().err
    assert main(["approve", "--all", "--api", "/nonexistent.sock"]) == 1
    assert "cannot reach the daemon" in capsys.readouterr().err
