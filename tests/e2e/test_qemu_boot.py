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
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.netlab import NetLab, netns_available

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
SERVER = "10.251.0.1"
TOKEN = "abcdef.0123456789abcdef"
CA_HASH = "sha256:" + "d" * 64
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


@pytest.fixture(scope="module")
def image() -> Path:
    if (why := netns_available()) is not None:
        pytest.skip(why)
    for tool in ("qemu-system-x86_64", "busybox", "mksquashfs", "cpio"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/install-deps installs it)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("needs /dev/net/tun for the VM's tap device")
    built = subprocess.run(["bash", str(ROOT / "images" / "build-test-image.sh")],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    return Path(built.stdout.strip().splitlines()[-1])


class VmLab:
    def __init__(self, lab: NetLab, tmp: Path, image: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.ns = lab.namespace("vm")
        lab.bridge(self.ns, "br0")
        lab.address(self.ns, "br0", f"{SERVER}/24")
        self.config = tmp / "bootd.yaml"
        self.config.write_text(f"""\
server: {{interfaces: [br0], address: {SERVER}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.251.0.0/24, gateway: {SERVER}, dns: [{SERVER}]}}
tftp: {{root: {tmp}}}
images:
  test: {{kernel: {image}/vmlinuz, initrd: {image}/initrd.img,
          rootfs: {image}/rootfs.squashfs, cmdline: "console=ttyS0 panic=-1"}}
clusters:
  lab: {{api_server: "https://10.251.0.10:6443", ca_cert_hash: "{CA_HASH}",
         token: {{value: {TOKEN}}}}}
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
""")
        self.log = tmp / "bootd.log"
        self.bootd = lab.spawn(self.ns, [sys.executable, "-m", "bootd", "serve", "-c",
                                         str(self.config), "--log-format", "json"],
                               stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        deadline = time.monotonic() + 20
        while '"bootd serving"' not in self.log.read_text():
            assert time.monotonic() < deadline and self.bootd.poll() is None, self.log.read_text()
            time.sleep(0.1)
        self.vms: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start_vm(self, mac: str, *, uefi: bool = False) -> None:
        """BIOS: SeaBIOS runs QEMU's iPXE ROM. UEFI: OVMF's own PXE (no option ROM)
        fetches snponly.efi over TFTP, and that iPXE comes back for the script."""
        tap = f"tap{len(self.vms)}"
        self.lab._ip("-n", self.ns, "tuntap", "add", tap, "mode", "tap")
        self.lab.attach(self.ns, tap, "br0")
        self.lab._ip("-n", self.ns, "link", "set", tap, "up")
        console = self.tmp / f"console-{mac.replace(':', '')}.log"
        firmware: list[str] = []
        nic = f"virtio-net-pci,netdev=n0,mac={mac}"
        if uefi:
            variables = self.tmp / f"vars-{tap}.fd"
            shutil.copy(OVMF_VARS, variables)
            firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,file={variables}"]
            nic += ",romfile="
        proc = self.lab.spawn(self.ns, [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nographic", "-no-reboot",
            *firmware, "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", nic, "-boot", "n"],
            stdout=console.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.vms[mac] = (proc, console)

    def wait_joined(self, mac: str, timeout: float = 240) -> str:
        proc, console = self.vms[mac]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = console.read_bytes().decode(errors="replace")
            if "BOOTD-E2E: joined" in text:
                return text
            if "BOOTD-E2E: FAILED" in text or proc.poll() is not None:
                break
            time.sleep(1)
        raise AssertionError(f"VM {mac} did not join. Console tail:\n"
                             + console.read_bytes().decode(errors="replace")[-3000:]
                             + "\n\nbootd status:\n" + self.status_text(mac))

    def status(self, node: str | None = None) -> dict[str, object]:
        args = [node] if node else []
        out = subprocess.run([sys.executable, "-m", "bootd", "status", "-c", str(self.config),
                              *args, "-o", "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def status_text(self, node: str) -> str:
        return subprocess.run([sys.executable, "-m", "bootd", "status", "-c", str(self.config),
                               node], capture_output=True, text=True, timeout=60).stdout


@pytest.fixture
def vmlab(image: Path, tmp_path: Path) -> Iterator[VmLab]:
    with NetLab("bde2e") as lab:
        yield VmLab(lab, tmp_path, image)


def steps(detail: dict[str, object]) -> list[dict[str, object]]:
    history = detail["history"]
    assert isinstance(history, list)
    result: list[dict[str, object]] = history[-1]["steps"]
    return result


def test_bios_ipxe_reserved_node_joins(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:12:34:01")
    vmlab.wait_joined("52:54:00:12:34:01")
    detail = vmlab.status("vm1")
    assert detail["stage"] == "joined" and detail["ip"] == "10.251.0.11"
    seen = [s["stage"] for s in steps(detail)]
    for stage in ("dhcp-ack", "ipxe-script", "kernel", "initrd", "kernel-handoff", "rootfs",
                  "rootfs-mounted", "join-script", "kubeadm", "joined"):
        assert stage in seen, (stage, seen)
    kubeadm = next(str(s["detail"]["message"]) for s in steps(detail)  # type: ignore[index]
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
    vmlab.wait_joined("52:54:00:12:34:02", timeout=300)
    detail = vmlab.status("vm2")
    assert detail["stage"] == "joined"
    seen = [(s["stage"], s["detail"]) for s in steps(detail)]
    firmware = [d.get("firmware") for stage, d in seen  # type: ignore[union-attr]
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
    vmlab.wait_joined("52:54:00:12:34:03", timeout=300)
    detail = vmlab.status("vm3")
    assert detail["stage"] == "joined"
    files = [str(s["detail"]["file"]) for s in steps(detail)  # type: ignore[index]
             if s["stage"] == "tftp"]
    assert files[0] == "grub/x86_64-efi/core.efi"
    # GRUB asks with a leading "/" (root-relative, as bootd reads it)
    assert any(f.lstrip("/").startswith("grub/grub.cfg") for f in files), files
    assert not list(vmlab.tmp.glob("grub/grub.cfg*"))


def test_unknown_mac_boots_through_the_catch_all_pool(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:aa:bb:01")
    vmlab.wait_joined("52:54:00:aa:bb:01")
    detail = vmlab.status("node-52-54-00-aa-bb-01")
    assert detail["stage"] == "joined" and detail["pool"] == "any"
    ip = str(detail["ip"])
    assert ip.startswith("10.251.0.1") and 100 <= int(ip.rsplit(".", 1)[1]) <= 120


def test_two_vms_boot_at_once(vmlab: VmLab) -> None:
    vmlab.start_vm("52:54:00:12:34:01")
    vmlab.start_vm("52:54:00:12:34:02")
    vmlab.wait_joined("52:54:00:12:34:01", timeout=300)
    vmlab.wait_joined("52:54:00:12:34:02", timeout=300)
    nodes = vmlab.status()["nodes"]
    assert isinstance(nodes, list)
    stages = {n["node"]: n["stage"] for n in nodes}
    assert stages["vm1"] == "joined" and stages["vm2"] == "joined"
