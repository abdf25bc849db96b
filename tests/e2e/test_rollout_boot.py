"""Updating a fleet of real VMs: three QEMU VMs behind OpenIPMI ipmi_sim BMCs (whose
chassis control starts, stops and resets each VM's QEMU and records its boot device).

One test, sharing the VM boots between its assertions:
1. `bootd power --pool workers pxe` boots the three on test@v1 (the test image) to
   `joined`.
2. `bootd rollout start workers --image test@v2`: the canary, then a wave of two; all on
   v2, no drift.
3. A broken v3 (its rootfs does not mount: the initramfs reports `failed`) halts at the
   canary; the pool points back at v2, the canary is booted back onto v2, the other two
   are never touched (their BMCs saw nothing).
4. A VM mid-boot when v3 is promoted finishes on v2, the version its script named:
   kernel, initrd and rootfs fetches all name v2, and `bootd status` shows its drift.

    vm ns: br0 10.253.0.1 (bootd), BMCs 10.253.0.121-123, VMs on tap0-2
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootd.lab.bmc import USERNAME, LabBmc
from bootd.lab.netlab import NetLab
from bootd.lab.rollout import image_build
from bootd.lab.vms import VmLab, build_test_image, missing_for_vms
from tests.integration.conftest import require

pytestmark = pytest.mark.netns

SERVER = "10.253.0.1"
PASSWORD = "e2e-bmc"
VMS = {"vm1": ("52:54:00:25:30:01", "10.253.0.21"), "vm2": ("52:54:00:25:30:02", "10.253.0.22"),
       "vm3": ("52:54:00:25:30:03", "10.253.0.23")}

CONFIG = """\
server: {{interfaces: [br0], address: {server}, state_dir: {state}, api: {state}/api.sock,
         drain_timeout: 2s}}
network: {{subnet: 10.253.0.0/24, dns: [{server}]}}
tftp: {{root: {state}}}
clusters:
  lab: {{api_server: "https://10.253.0.10:6443", ca_cert_hash: "sha256:{ca}",
         token: {{value: abcdef.0123456789abcdef}}}}
defaults:
  image: test
  cluster: lab
  power: {{ipmi: {{host: "10.253.0.1{{ip_last}}", username: {user},
                  password: {{file: {tmp}/bmc.pw}}}}, timeout: 20s}}
pools:
  - name: workers
    nodes:
{nodes}
"""


def test_rollout_over_three_vms_with_ipmi_bmcs(tmp_path: Path) -> None:
    if (why := missing_for_vms()) is not None:
        pytest.skip(why)
    require("ipmi_sim")
    image = build_test_image()
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "bmc.pw").write_text(PASSWORD)
    config = tmp_path / "bootd.yaml"
    config.write_text(CONFIG.format(
        server=SERVER, state=state, tmp=tmp_path, ca="c" * 64, user=USERNAME,
        nodes="\n".join(f'      - {{name: {n}, mac: "{m}", ip: {i}}}'
                        for n, (m, i) in VMS.items())))
    with NetLab("bdro") as lab:
        vmlab = VmLab(lab, tmp_path, None, f"{SERVER}/24")
        ns = vmlab.ns

        def bootd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
            return lab.run(ns, [sys.executable, "-m", "bootd", *args, "-c", str(config)],
                           timeout=timeout, check=False)

        def added(tag: str, build: Path) -> str:
            out = bootd("image", "add", "test", str(build), "--cmdline",
                        "console=ttyS0 panic=-1")
            assert out.returncode == 0, out.stderr
            return out.stdout.split("@", 1)[1].split(":", 1)[0]

        def nodes() -> dict[str, dict[str, Any]]:
            return {str(r["node"]): r for r in _api(state, "/api/v1/status")["nodes"]}

        bmcs: dict[str, LabBmc] = {}
        try:
            v1 = added("v1", image_build(image, tmp_path / "v1"))
            lab.start_bootd(ns, config, tmp_path / "bootd.log")
            for i, (name, (mac, ip)) in enumerate(VMS.items()):
                bmc_ip = f"10.253.0.1{ip.rsplit('.', 1)[1]}"
                lab.address(ns, "br0", f"{bmc_ip}/24")
                bmcs[name] = LabBmc(lab, ns, bmc_ip, tmp_path / f"bmc-{name}",
                                    vmlab.vm_command(mac, f"tap{i}"), PASSWORD, name=name)

            # 1. the pool on v1, powered on through the BMCs
            out = bootd("power", "--pool", "workers", "pxe")
            assert out.returncode == 0, out.stdout + out.stderr
            _wait("three VMs joined on v1", lambda: all(
                r["stage"] == "joined" and r["image"] == f"test@{v1}"
                for r in nodes().values()), 300, bmcs)

            # 2. roll v2 out: canary vm1, then vm2 and vm3
            v2 = added("v2", image_build(image, tmp_path / "v2", pad=4096))
            started = time.monotonic()
            out = bootd("rollout", "start", "workers", "--image", f"test@{v2}",
                        "--max-unavailable", "2", "--timeout", "240s", "--wait",
                        timeout=600)
            rollout_s = time.monotonic() - started
            assert out.returncode == 0, out.stdout + out.stderr + _consoles(bmcs)
            assert "canary: vm1" in out.stdout and "wave 1: vm2, vm3" in out.stdout
            rows = nodes()
            assert {r["image"] for r in rows.values()} == {f"test@{v2}"}
            assert not any(r["drift"] for r in rows.values())
            assert all(b.events().count("on boot=pxe") == 2 for b in bmcs.values())

            # 3. a broken v3 halts at the canary and the canary comes back on v2
            v3 = added("v3", image_build(image, tmp_path / "v3", rootfs=os.urandom(1 << 20)))
            before = {n: b.events() for n, b in bmcs.items()}
            out = bootd("rollout", "start", "workers", "--image", f"test@{v3}",
                        "--timeout", "240s", "--wait", timeout=600)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "HALTED: canary vm1 failed: reported failed" in out.stdout, out.stdout
            doc = _api(state, "/api/v1/rollout")["current"]
            halted = next(t for t, m in doc["log"] if m.startswith("halted"))
            reverted = next(t for t, m in doc["log"] if m.startswith("vm1: back on"))
            rows = nodes()
            assert rows["vm1"]["stage"] == "joined" and rows["vm1"]["image"] == f"test@{v2}"
            assert {r["desired_image"] for r in rows.values()} == {f"test@{v2}"}
            assert bmcs["vm2"].events() == before["vm2"]
            assert bmcs["vm3"].events() == before["vm3"]
            assert bmcs["vm1"].events().count("on boot=pxe") == 4  # v1, v2, v3, revert

            # 4. vm2 mid-boot while v3 is promoted: it finishes on v2
            since = time.time()
            assert bootd("power", "vm2", "pxe").returncode == 0
            _wait("vm2's script", lambda: any(
                s["stage"] == "ipxe-script" and s["detail"].get("image") == f"test@{v2}"
                for s in _last_steps(state, "vm2", since)), 120, bmcs)
            out = bootd("image", "promote", "test", v3)
            assert out.returncode == 0 and "the daemon reloaded" in out.stdout, out.stdout
            _wait("vm2 joined again", lambda: nodes()["vm2"]["stage"] == "joined"
                  and nodes()["vm2"]["since"] > since, 240, bmcs)
            fetched = {str(s["stage"]): s["detail"]["image"]
                       for s in _last_steps(state, "vm2", since)
                       if s["stage"] in ("kernel", "initrd", "rootfs")}
            assert fetched == {"kernel": f"test@{v2}", "initrd": f"test@{v2}",
                               "rootfs": f"test@{v2}"}
            row = nodes()["vm2"]
            assert row["drift"] and row["desired_image"] == f"test@{v3}"
            shown = bootd("status").stdout
            assert f"test@{v2} (drift: now test@{v3})" in shown, shown
            print(f"3-VM rollout v1 -> v2: {rollout_s:.1f}s; halt to revert "
                  f"(canary back on v2): {reverted - halted:.1f}s")
        finally:
            for bmc in bmcs.values():
                bmc.close()


def _api(state: Path, path: str) -> Any:
    out = subprocess.run(["curl", "-sS", "-f", "--unix-socket", str(state / "api.sock"),
                          f"http://bootd{path}"], capture_output=True, text=True, timeout=30,
                         check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _last_steps(state: Path, node: str, since: float) -> list[dict[str, Any]]:
    """The node's steps from `since` on, whatever attempts they fall in."""
    detail = _api(state, f"/api/v1/status/{node}?attempts=5")
    return [s for a in detail["history"] for s in a["steps"]
            if a["started"] + s["offset"] >= since]


def _consoles(bmcs: dict[str, LabBmc]) -> str:
    return "".join(f"\n--- {name} console tail:\n"
                   + (b.dir / "machine.log").read_text(errors="replace")[-1500:]
                   for name, b in bmcs.items() if (b.dir / "machine.log").exists())


def _wait(what: str, check: Callable[[], bool], timeout: float,
          bmcs: dict[str, LabBmc]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}" + _consoles(bmcs)
        time.sleep(1)
