"""Image versions, power control and rollouts against the real daemon and real BMCs.

Three nodes sit behind OpenIPMI's ipmi_sim BMCs (bootd.lab.bmc) in the client namespace;
each machine is a stand-in (tests/integration/fake_node.py) that fetches its iPXE script,
kernel, initrd and rootfs from bootd over HTTP from its reserved address and reports
`joined` with the image its command line names, or `failed` for a broken build. bootd
drives them with pyghmi through `bootd power` and `bootd rollout`; a Redfish BMC
(sushy-tools' emulator) covers the Redfish path. The QEMU version of the rollout is
tests/e2e/test_rollout_boot.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootd.lab.bmc import USERNAME, LabBmc
from tests.integration.conftest import SERVER_IP, DhcpLab, require

pytestmark = pytest.mark.netns

PASSWORD = "bmc-s3cret"
NODES = {"n1": ("02:00:00:00:01:11", "10.77.0.11"), "n2": ("02:00:00:00:01:12", "10.77.0.12"),
         "n3": ("02:00:00:00:01:13", "10.77.0.13")}
FAKE_NODE = Path(__file__).with_name("fake_node.py")


def build(tmp: Path, tag: str, broken: bool = False) -> Path:
    out = tmp / f"build-{tag}"
    out.mkdir()
    (out / "vmlinuz").write_bytes(b"kernel " + tag.encode() * 1000)
    (out / "initrd.img").write_bytes(b"initrd " + tag.encode() * 1000)
    (out / "rootfs.squashfs").write_bytes((b"BROKEN " if broken else b"rootfs ")
                                          + tag.encode() * 100_000)
    return out


def cli(lab: DhcpLab, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`bootd ARGS` inside the server namespace: `bootd power` talks to the BMCs, which
    exist only in the lab's namespaces."""
    started = time.monotonic()
    out = subprocess.run(["ip", "netns", "exec", lab.server_ns, sys.executable, "-m",
                          "bootd", *args, "-c", str(lab.tmp / "bootd.yaml")],
                         capture_output=True, text=True, timeout=timeout, check=False)
    print(f"bootd {' '.join(args)}: {time.monotonic() - started:.1f}s")
    return out


def added(lab: DhcpLab, tag: str, broken: bool = False) -> str:
    out = cli(lab, "image", "add", "k8s", str(build(lab.tmp, tag, broken)))
    assert out.returncode == 0, out.stderr
    return out.stdout.split("@", 1)[1].split(":", 1)[0]


def api(lab: DhcpLab, path: str) -> Any:
    """GET on the admin API's unix socket (what `bootd status -o json` prints, without
    starting a Python per poll)."""
    out = subprocess.run(["curl", "-sS", "-f", "--unix-socket",
                          str(lab.tmp / "state" / "api.sock"), f"http://bootd{path}"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def status(lab: DhcpLab) -> dict[str, dict[str, Any]]:
    return {str(r["node"]): r for r in api(lab, "/api/v1/status")["nodes"]}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def steps(lab: DhcpLab, node: str) -> list[dict[str, Any]]:
    return [s for a in api(lab, f"/api/v1/status/{node}?attempts=20")["history"]
            for s in a["steps"]]


def test_versions_power_and_rollouts_with_ipmi_bmcs(dhcp_lab: DhcpLab) -> None:
    require("ipmi_sim", "ipmitool")
    lab = dhcp_lab
    (lab.tmp / "state").mkdir()
    (lab.tmp / "bmc.pw").write_text(PASSWORD + "\n")
    bmcs: dict[str, LabBmc] = {}
    pause = lab.tmp / "go"
    try:
        for name, (mac, ip) in NODES.items():
            bmc_ip = f"10.77.0.1{ip.rsplit('.', 1)[1]}"
            lab.lab.address(lab.client_ns, "cli0", f"{ip}/24")
            lab.lab.address(lab.client_ns, "cli0", f"{bmc_ip}/24")
            machine = [sys.executable, str(FAKE_NODE), "--server", SERVER_IP, "--ip", ip,
                       "--mac", mac]
            if name == "n3":
                machine += ["--pause-at-script", str(pause)]
            bmcs[name] = LabBmc(lab.lab, lab.client_ns, bmc_ip, lab.tmp / f"bmc-{name}",
                                machine, PASSWORD, name=f"bmc-{name}")
        nodes = "\n".join(f"      - {{name: {n}, mac: \"{m}\", ip: {i}}}"
                          for n, (m, i) in NODES.items())
        config = f"""\
defaults:
  image: k8s
  power: {{ipmi: {{host: "10.77.0.1{{ip_last}}", username: {USERNAME},
                 password: {{file: {lab.tmp}/bmc.pw}}}}, timeout: 20s}}
pools:
  - name: w
    nodes:
{nodes}
"""
        lab.write_config(config)  # the operator's order: config, image, then the daemon
        v1 = added(lab, "v1")
        lab.bootd(config)

        # power: one BMC at a time and the whole pool, with an independent client's view
        out = cli(lab, "power", "n1", "status")
        assert out.returncode == 0 and "ok, power off" in out.stdout, out.stdout + out.stderr
        assert PASSWORD not in out.stdout + out.stderr
        out = cli(lab, "power", "--pool", "w", "pxe")
        assert out.returncode == 0 and out.stdout.count("ok, power on") == 3, out.stdout
        # n3 waits at its script (no `go` file yet): ipmitool sees its BMC powered on
        seen = lab.lab.run(lab.client_ns, ["ipmitool", "-I", "lanplus", "-H", "10.77.0.113",
                                           "-U", USERNAME, "-P", PASSWORD, "power", "status"])
        assert "Chassis Power is on" in seen.stdout
        pause.touch()
        wait_for("three nodes joined on v1", lambda: all(
            r["stage"] == "joined" and r["image"] == f"k8s@{v1}"
            for r in status(lab).values()))
        assert all(b.events()[0] == "on boot=pxe" for b in bmcs.values())
        assert not any(r["drift"] for r in status(lab).values())
        # a wrong password, a BMC that does not answer: one clear error each
        (lab.tmp / "bmc.pw").write_text("wrong\n")
        out = cli(lab, "power", "n1", "status")
        assert out.returncode == 1 and "FAILED" in out.stdout and "wrong" not in out.stdout
        (lab.tmp / "bmc.pw").write_text(PASSWORD + "\n")

        # a new version waits for promote; nodes run v1 and nothing drifts
        v2 = added(lab, "v2")
        listed = cli(lab, "image", "list", "k8s", "-o", "json")
        versions = {i["version"]: i for i in json.loads(listed.stdout)["images"]}
        assert versions[v1]["promoted"] and versions[v1]["nodes"] == 3
        assert not versions[v2]["promoted"] and versions[v2]["nodes"] == 0

        # rollout v2: canary n1, then n2 and n3 together; all on v2, no drift
        started = time.monotonic()
        out = cli(lab, "rollout", "start", "w", "--image", f"k8s@{v2}",
                  "--max-unavailable", "2", "--timeout", "60s", "--wait", timeout=180)
        took = time.monotonic() - started
        assert out.returncode == 0, out.stdout + out.stderr
        assert "canary: n1" in out.stdout and "wave 1: n2, n3" in out.stdout
        rows = status(lab)
        assert {r["image"] for r in rows.values()} == {f"k8s@{v2}"}
        assert not any(r["drift"] for r in rows.values())
        assert all(b.events().count("on boot=pxe") == 2 for b in bmcs.values())
        print(f"3-node rollout with fake nodes: {took:.1f}s")
        assert any(s["stage"] == "power" for s in steps(lab, "n2"))

        # a node mid-boot when the image is promoted finishes on its script's version
        pause.unlink()
        v3 = added(lab, "v3", broken=True)
        assert cli(lab, "power", "n3", "pxe").returncode == 0
        wait_for("n3's script", lambda: any(
            s["stage"] == "ipxe-script" and s["detail"].get("image") == f"k8s@{v2}"
            for s in steps(lab, "n3")[-5:]))
        out = cli(lab, "image", "promote", "k8s", v3)
        assert out.returncode == 0 and "the daemon reloaded" in out.stdout, out.stdout
        assert status(lab)["n3"]["desired_image"] == f"k8s@{v3}"
        resumed = time.time()
        pause.touch()
        wait_for("n3 joined again", lambda: status(lab)["n3"]["stage"] == "joined"
                 and status(lab)["n3"]["since"] > resumed)
        history = steps(lab, "n3")
        last = history[max(i for i, s in enumerate(history) if s["stage"] == "ipxe-script"):]
        fetched = {str(s["stage"]): s["detail"]["image"] for s in last
                   if s["stage"] in ("kernel", "initrd", "rootfs")}
        assert fetched == {"kernel": f"k8s@{v2}", "initrd": f"k8s@{v2}",
                           "rootfs": f"k8s@{v2}"}
        assert status(lab)["n3"]["drift"]  # runs v2, would boot v3 now
        assert cli(lab, "image", "rollback", "k8s").returncode == 0
        assert cli(lab, "image", "promote", "k8s", v2).returncode == 0

        # the broken v3 halts at the canary; the pool points back at v2; n1 comes back
        # on v2; n2 and n3 are never touched
        before = {n: b.events().count("on boot=pxe") for n, b in bmcs.items()}
        started = time.monotonic()
        out = cli(lab, "rollout", "start", "w", "--image", f"k8s@{v3}", "--timeout", "60s",
                  "--wait", timeout=180)
        took = time.monotonic() - started
        assert out.returncode == 1, out.stdout + out.stderr
        assert "HALTED: canary n1 failed: reported failed" in out.stdout, out.stdout
        rows = status(lab)
        assert rows["n1"]["image"] == f"k8s@{v2}" and rows["n1"]["stage"] == "joined"
        assert {r["desired_image"] for r in rows.values()} == {f"k8s@{v2}"}
        # n1: the canary's power cycle and its revert; the others: nothing
        assert {n: b.events().count("on boot=pxe") for n, b in bmcs.items()} == {
            "n1": before["n1"] + 2, "n2": before["n2"], "n3": before["n3"]}
        print(f"halt at the canary and revert, fake nodes: {took:.1f}s")
        shown = cli(lab, "rollout", "status")
        assert "reverted" in shown.stdout and "HALTED" in shown.stdout

        # a restart mid-rollout goes on: v3 by another name is still broken, so roll
        # out v2' (v2 rebuilt) and restart bootd while its canary boots
        v4 = added(lab, "v4")
        pause.unlink()  # n3 waits at its script: the rollout is still running then
        out = cli(lab, "rollout", "start", "w", "--image", f"k8s@{v4}", "--canary", "0",
                  "--max-unavailable", "3", "--timeout", "60s")
        assert out.returncode == 0, out.stderr
        wait_for("n1 and n2 on v4", lambda: all(
            r["stage"] == "joined" and r["image"] == f"k8s@{v4}"
            for n, r in status(lab).items() if n != "n3"))
        daemon = lab.daemons[-1]
        assert daemon.stop() == 0
        daemon.start()
        assert "rollout resumed after a restart" in daemon.log.read_text()
        pause.touch()
        out = cli(lab, "rollout", "status", "--wait", timeout=120)
        assert out.returncode == 0 and "COMPLETED" in out.stdout, out.stdout
        assert "bootd restarted: the rollout goes on (running)" in out.stdout
        # all three on v4: n3 too, cycled again if the restart cut its power cycle short
        states = {n["name"]: n["state"] for n in api(lab, "/api/v1/rollout")["current"]["nodes"]}
        assert states == {"n1": "healthy", "n2": "healthy", "n3": "healthy"}, out.stdout

        # prune keeps what nodes run and what the store points at
        out = cli(lab, "image", "prune", "k8s", "--keep", "0")
        assert out.returncode == 0, out.stderr
        assert v3 in out.stdout and v4 not in out.stdout and v2 not in out.stdout
    finally:
        for bmc in bmcs.values():
            bmc.close()


def test_redfish_power_against_sushy_tools(dhcp_lab: DhcpLab) -> None:
    require("sushy-emulator")
    bcrypt = pytest.importorskip("bcrypt")
    lab = dhcp_lab
    bmc = "10.77.0.200"
    lab.lab.address(lab.client_ns, "cli0", f"{bmc}/24")
    (lab.tmp / "htpasswd").write_text(
        f"{USERNAME}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()}\n")
    (lab.tmp / "emulator.conf").write_text(
        f"SUSHY_EMULATOR_AUTH_FILE = {str(lab.tmp / 'htpasswd')!r}\n"
        f"SUSHY_EMULATOR_STATE_DIR = {str(lab.tmp / 'sushy')!r}\n")
    emulator = lab.lab.spawn(lab.client_ns, [
        shutil.which("sushy-emulator") or "sushy-emulator", "--fake", "-i", bmc,
        "-p", "8000", "--config", str(lab.tmp / "emulator.conf")],
        stdout=(lab.tmp / "sushy.log").open("wb"), stderr=subprocess.STDOUT)
    wait_for("the Redfish emulator", lambda: "8000" in lab.lab.run(
        lab.client_ns, ["ss", "-tln"], check=False).stdout, timeout=30)
    (lab.tmp / "bmc.pw").write_text(PASSWORD)
    lab.bootd(f"""\
images: {{k: {{kernel: /dev/null, initrd: /dev/null}}}}
pools:
  - name: w
    image: k
    power: {{redfish: {{url: "http://{bmc}:8000", username: {USERNAME},
             password: {{file: {lab.tmp}/bmc.pw}}}}}}
    nodes: [{{name: r1, mac: "02:00:00:00:02:01", ip: 10.77.0.21}}]
  - name: bad
    image: k
    power: {{redfish: {{url: "http://{bmc}:8000", username: {USERNAME},
             password: {{value: nope}}}}}}
    nodes: [{{name: r2, mac: "02:00:00:00:02:02", ip: 10.77.0.22}}]
""")
    try:
        out = cli(lab, "power", "r1", "status", "-o", "json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["results"][0]["state"] == "off"
        out = cli(lab, "power", "r1", "pxe", "-o", "json")
        result = json.loads(out.stdout)["results"][0]
        assert out.returncode == 0 and result["ok"], out.stdout
        # the emulator applies a power change 1-11 s later, as hardware does; the boot
        # source override it records at once
        system = lab.lab.run(lab.client_ns, [
            "curl", "-sS", "-u", f"{USERNAME}:{PASSWORD}",
            f"http://{bmc}:8000/redfish/v1/Systems/{_system_id(lab, bmc)}"]).stdout
        # (the emulator stores the target and shows "Continuous" whatever was asked:
        # its code says it ignores BootSourceOverrideEnabled)
        assert json.loads(system)["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        out = cli(lab, "power", "r2", "status")
        assert out.returncode == 1 and "FAILED" in out.stdout and "nope" not in out.stdout
    finally:
        lab.lab.stop(emulator)


def _system_id(lab: DhcpLab, bmc: str) -> str:
    listing = lab.lab.run(lab.client_ns, [
        "curl", "-sS", "-u", f"{USERNAME}:{PASSWORD}",
        f"http://{bmc}:8000/redfish/v1/Systems"]).stdout
    return str(json.loads(listing)["Members"][0]["@odata.id"]).rsplit("/", 1)[1]
