"""Whole boots: QEMU VMs (TCG) with empty disks PXE boot from bootd to `joined`.

SeaBIOS runs QEMU's iPXE ROM (it sends user class iPXE), bootd answers with its script,
iPXE fetches kernel and initrd over HTTP, the test image's initramfs takes DHCP again,
fetches and checks the rootfs, mounts it under an overlay and runs the node's join.sh,
whose kubeadm is a test double that reports its arguments. UEFI: OVMF's own PXE fetches
snponly.efi over TFTP and that iPXE continues the same way; or OVMF loads GRUB over TFTP,
which reads bootd's per-client grub.cfg and fetches kernel and initrd over HTTP.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.http.forward import forwarding
from bootd.lab.netlab import NetLab
from bootd.lab.vms import OVMF_CODE, VmLab, build_test_image, missing_for_vms
from tests.browser import Browser, available, not_blank, save_artifact
from tests.e2e.vms import last_attempt_steps, wait_joined

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
SERVER = "10.251.0.1"
TOKEN = "abcdef.0123456789abcdef"
CA_HASH = "sha256:" + "d" * 64


@pytest.fixture(scope="module")
def image() -> Path:
    if (why := missing_for_vms()) is not None:
        pytest.skip(why)
    return build_test_image()


CONFIG = """\
server: {{interfaces: [br0], address: {server}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.251.0.0/24, gateway: {server}, dns: [{server}]}}
tftp: {{root: {tmp}}}
images:
  test: {{kernel: {image}/vmlinuz, initrd: {image}/initrd.img,
          rootfs: {image}/rootfs.squashfs, cmdline: "console=ttyS0 panic=-1"}}
clusters:
  lab: {{api_server: "https://10.251.0.10:6443", ca_cert_hash: "{ca_hash}",
         token: {{value: {token}}}}}
defaults: {{image: test, cluster: lab}}
tags:
  gpu: {{labels: {{nvidia.com/gpu: "true"}}, taints: ["nvidia.com/gpu=present:NoSchedule"]}}
pools:
  - name: workers
    labels: {{node.kubernetes.io/pool: workers}}
    nodes:
      - {{name: vm1, mac: "52:54:00:12:34:01", ip: 10.251.0.11, tags: [gpu]}}
      - {{name: vm2, mac: "52:54:00:12:34:02", ip: 10.251.0.12}}
      - {{name: vm3, mac: "52:54:00:12:34:03", ip: 10.251.0.13,
          boot: {{efi64: grub/x86_64-efi/core.efi}}}}
  - name: any
    dynamic: {{range: 10.251.0.100-10.251.0.120, name: "node-{{mac}}"}}
"""


@pytest.fixture
def vmlab(image: Path, tmp_path: Path) -> Iterator[VmLab]:
    config = CONFIG.format(server=SERVER, tmp=tmp_path, image=image, ca_hash=CA_HASH,
                           token=TOKEN)
    with NetLab("bde2e") as lab:
        yield VmLab(lab, tmp_path, config, f"{SERVER}/24")


def test_bios_ipxe_reserved_node_joins(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:12:34:01")
    wait_joined(vmlab, "52:54:00:12:34:01")
    detail = vmlab.status("vm1")
    assert detail["stage"] == "joined" and detail["ip"] == "10.251.0.11"
    seen = [s["stage"] for s in last_attempt_steps(detail)]
    for stage in ("dhcp-ack", "ipxe-script", "kernel", "initrd", "kernel-handoff", "rootfs",
                  "rootfs-mounted", "join-script", "kubeadm", "joined"):
        assert stage in seen, (stage, seen)
    kubeadm = next(str(s["detail"]["message"]) for s in last_attempt_steps(detail)  # type: ignore[index]
                   if s["stage"] == "kubeadm" and "--token" in str(s["detail"]))
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
    assert f"--token token-sha256:{digest}" in kubeadm  # the node got its token
    assert f"--discovery-token-ca-cert-hash {CA_HASH}" in kubeadm
    assert "--node-name vm1" in kubeadm and "join 10.251.0.10:6443" in kubeadm
    assert "--node-labels=node.kubernetes.io/pool=workers,nvidia.com/gpu=true" in kubeadm
    assert "--register-with-taints=nvidia.com/gpu=present:NoSchedule" in kubeadm
    assert TOKEN not in vmlab.log.read_text()  # never in bootd's log


def test_uefi_native_pxe_snponly_then_ipxe_joins(vmlab: VmLab) -> None:
    if not OVMF_CODE.exists() or not Path("/usr/lib/ipxe/snponly.efi").exists():
        pytest.skip("needs ovmf and ipxe (scripts/install-deps installs them)")
    vmlab.start_vm("52:54:00:12:34:02", uefi=True)
    wait_joined(vmlab, "52:54:00:12:34:02", timeout=300)
    detail = vmlab.status("vm2")
    assert detail["stage"] == "joined"
    seen = [(s["stage"], s["detail"]) for s in last_attempt_steps(detail)]
    firmware = [d.get("firmware") for stage, d in seen  # type: ignore[attr-defined]
                if stage == "dhcp-discover"]
    assert firmware[:2] == ["efi64", "ipxe"], firmware
    tftp = [d for stage, d in seen if stage == "tftp"]
    assert tftp and tftp[0]["file"] == "snponly.efi"  # type: ignore[index]


def test_uefi_grub_over_tftp_then_http_joins(vmlab: VmLab) -> None:
    """OVMF PXE -> GRUB's core.efi over TFTP -> bootd's per-client grub.cfg -> kernel and
    initrd over GRUB's HTTP -> joined. No GRUB config file exists on disk."""
    mknetdir = shutil.which("grub-mknetdir")
    if not OVMF_CODE.exists() or mknetdir is None or not Path(
            "/usr/lib/grub/x86_64-efi").exists():
        pytest.skip("needs ovmf and grub-efi-amd64-bin (scripts/install-deps installs them)")
    subprocess.run([mknetdir, f"--net-directory={vmlab.tmp}", "--subdir=grub",
                    "-d", "/usr/lib/grub/x86_64-efi"], check=True, capture_output=True)
    vmlab.start_vm("52:54:00:12:34:03", uefi=True)
    wait_joined(vmlab, "52:54:00:12:34:03", timeout=300)
    detail = vmlab.status("vm3")
    assert detail["stage"] == "joined"
    files = [str(s["detail"]["file"]) for s in last_attempt_steps(detail)  # type: ignore[index]
             if s["stage"] == "tftp"]
    assert files[0] == "grub/x86_64-efi/core.efi"
    # GRUB asks with a leading "/" (root-relative, as bootd reads it)
    assert any(f.lstrip("/").startswith("grub/grub.cfg") for f in files), files
    assert not list(vmlab.tmp.glob("grub/grub.cfg*"))


def test_unknown_mac_boots_through_the_catch_all_pool(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:aa:bb:01")
    wait_joined(vmlab, "52:54:00:aa:bb:01")
    detail = vmlab.status("node-52-54-00-aa-bb-01")
    assert detail["stage"] == "joined" and detail["pool"] == "any"
    ip = str(detail["ip"])
    assert ip.startswith("10.251.0.1") and 100 <= int(ip.rsplit(".", 1)[1]) <= 120


def test_two_vms_boot_at_once(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:12:34:01")
    vmlab.start_vm("52:54:00:12:34:02")
    wait_joined(vmlab, "52:54:00:12:34:01", timeout=300)
    wait_joined(vmlab, "52:54:00:12:34:02", timeout=300)
    nodes = vmlab.status()["nodes"]
    assert isinstance(nodes, list)
    stages = {n["node"]: n["stage"] for n in nodes}
    assert stages["vm1"] == "joined" and stages["vm2"] == "joined"
    see_the_boots_in_the_status_page(vmlab)


def see_the_boots_in_the_status_page(vmlab: VmLab) -> None:
    """The status page of that lab in a real browser: both VMs joined, vm1's timeline with
    every phase of a real boot. Its screenshots are the README's (BOOTD_ARTIFACTS=docs)."""
    if available() is not None:
        return  # the browser tests skip with the reason; the boot itself passed
    with (forwarding(str(vmlab.tmp / "state" / "api.sock")) as url,
          Browser(vmlab.tmp / "chromium", size=(1280, 860)) as b):
        b.goto(url)
        b.wait_for("document.body.dataset.version !== undefined")
        for vm in ("vm1", "vm2"):
            assert b.eval(f"document.querySelector('#grid a[data-k={vm}]').className") == (
                "c s-joined")
        b.wait_for("document.querySelector('#boot-times figure.hist')")
        shot = b.screenshot(vmlab.tmp / "status-overview.png")
        assert not_blank(shot)
        save_artifact(shot)
        b.eval("document.querySelector('#grid a[data-k=vm1]').click()")
        b.wait_for("document.querySelector('#panel svg.gantt')")
        phases = b.eval("[...document.querySelectorAll('#panel section.attempt')[0]"
                        ".querySelectorAll('rect.bar')].map(r => r.dataset.phase)")
        for phase in ("DHCP", "iPXE script", "kernel", "initrd", "rootfs", "join", "joined"):
            assert phase in phases, phases
        assert phases[-1] == "joined"
        shot = b.screenshot(vmlab.tmp / "status-node-timeline.png")
        assert not_blank(shot)
        save_artifact(shot)


def test_bootd_lab_boots_vms_to_joined(image: Path) -> None:
    """The README's run command: two VMs from nothing to joined, then all cleaned up."""
    proc = subprocess.run([sys.executable, "-m", "bootd", "lab", "--vms", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "VM 52:54:00:b0:07:01: joined" in proc.stdout
    assert "VM 52:54:00:b0:07:02: joined" in proc.stdout
    assert "worker-1" in proc.stdout and "node-52-54-00-b0-07-02" in proc.stdout
    assert "lab: status page http://127.0.0.1:" in proc.stdout  # a newcomer sees it
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    assert "bootdlab-" not in leftovers.stdout


KUBEADM_STAND_IN = """#!/bin/sh
# kubeadm on the control plane, as bootd runs it: records every call and the token made
case "$2" in
  create) token=$(printf '%06x.%016x' $(shuf -i 0-16777215 -n 1) $(shuf -i 0-4294967295 -n 1))
          echo "create $BOOTD_NODE $token" >> {log}; echo "$token" ;;
  delete) echo "delete $3" >> {log} ;;
esac
"""


def test_minted_tokens_through_whole_boots(image: Path, tmp_path: Path) -> None:
    """Two VMs boot with join tokens minted per node: each ran kubeadm with its own token
    (the test image's kubeadm reports a digest of it), never the other's, and each token
    was deleted once its node reported joined."""
    log = tmp_path / "kubeadm-calls.log"
    kubeadm = tmp_path / "kubeadm"
    kubeadm.write_text(KUBEADM_STAND_IN.format(log=log))
    kubeadm.chmod(0o755)
    config = CONFIG.format(server=SERVER, tmp=tmp_path, image=image, ca_hash=CA_HASH,
                           token=TOKEN).replace(
        f"token: {{value: {TOKEN}}}",
        f'token: {{command: "{kubeadm} token create --ttl 15m", per_node: true, '
        f'revoke: "{kubeadm} token delete {{token_id}}"}}')
    assert "per_node: true" in config
    with NetLab("bde2e") as lab:
        vmlab = VmLab(lab, tmp_path, config, f"{SERVER}/24")
        for mac in ("52:54:00:12:34:01", "52:54:00:12:34:02"):
            vmlab.start_vm(mac)
        for mac in ("52:54:00:12:34:01", "52:54:00:12:34:02"):
            wait_joined(vmlab, mac, timeout=300)
        used = {}
        for node in ("vm1", "vm2"):
            steps = last_attempt_steps(vmlab.status(node))
            message = next(str(s["detail"]["message"]) for s in steps  # type: ignore[index]
                           if s["stage"] == "kubeadm" and "--token" in str(s["detail"]))
            used[node] = message.split("--token token-sha256:")[1].split()[0]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and log.read_text().count("delete") < 2:
            time.sleep(0.2)
        calls = log.read_text().splitlines()
        minted = {c.split()[1]: c.split()[2] for c in calls if c.startswith("create")}
        assert sorted(minted) == ["vm1", "vm2"], calls  # one token each, minted once
        for node, token in minted.items():
            assert used[node] == hashlib.sha256(token.encode()).hexdigest()[:16]
        assert used["vm1"] != used["vm2"]
        deleted = [c.split()[1] for c in calls if c.startswith("delete")]
        assert sorted(deleted) == sorted(t.split(".")[0] for t in minted.values())
        for token in minted.values():  # created before it was deleted
            assert calls.index(f"delete {token.split('.')[0]}") > next(
                i for i, c in enumerate(calls) if c.endswith(token))
            assert token not in vmlab.log.read_text()  # never in bootd's log


def test_catch_all_machine_waits_for_approval_then_joins(image: Path, tmp_path: Path) -> None:
    """`dynamic: {join: approve}`: an unknown VM boots, its join.sh waits, `bootd status`
    shows it awaiting approval; `bootd approve --all` lets it join."""
    config = CONFIG.format(server=SERVER, tmp=tmp_path, image=image, ca_hash=CA_HASH,
                           token=TOKEN).replace(
        'dynamic: {range: 10.251.0.100-10.251.0.120, name: "node-{mac}"}',
        'dynamic: {range: 10.251.0.100-10.251.0.120, name: "node-{mac}", join: approve, '
        'approval_poll: 2s}')
    assert "join: approve" in config
    mac, name = "52:54:00:aa:bb:02", "node-52-54-00-aa-bb-02"
    with NetLab("bde2e") as lab:
        vmlab = VmLab(lab, tmp_path, config, f"{SERVER}/24")
        vmlab.start_vm(mac)
        deadline = time.monotonic() + 240
        stage = None
        while time.monotonic() < deadline and stage != "awaiting-approval":
            time.sleep(1)
            stage = next((n["stage"] for n in vmlab.nodes() if n["node"] == name), None)
        assert stage == "awaiting-approval", vmlab.status_text()
        time.sleep(5)  # it keeps waiting: nothing joins without an operator
        assert "joined" not in vmlab.console(mac).split("awaiting")[-1]
        approve = subprocess.run([sys.executable, "-m", "bootd", "approve", "--all", "-c",
                                  str(vmlab.config)], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert approve.returncode == 0 and name in approve.stdout, approve.stderr
        wait_joined(vmlab, mac, timeout=120)
        stages = [s["stage"] for s in last_attempt_steps(vmlab.status(name))]
        assert stages.index("awaiting-approval") < stages.index("join-script")
        assert stages[-1] == "joined"
