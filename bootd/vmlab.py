"""QEMU virtual machines PXE booting from a bootd on a throw-away namespace network.

Used by `bootd lab` and by the end-to-end tests. BIOS VMs run SeaBIOS with QEMU's iPXE
ROM; UEFI VMs run OVMF's own PXE (no option ROM). Everything lives in namespaces the lab
made and is removed with it; VMs are ended by PID.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bootd.events import FINISHED
from bootd.netlab import NetLab, netns_available

SOURCE_TREE = Path(__file__).resolve().parents[1]
IMAGE_SCRIPT = SOURCE_TREE / "images" / "build-test-image.sh"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
JOINED_MARK = "BOOTD-E2E: joined"
FAILED_MARK = "BOOTD-E2E: FAILED"


def missing_for_vms(uefi: bool = False) -> str | None:
    """None when VMs can be booted here, else what is missing."""
    if (why := netns_available()) is not None:
        return why
    for tool in ("qemu-system-x86_64", "busybox", "mksquashfs", "cpio"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/install-deps installs it)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for the VMs' tap devices"
    if not IMAGE_SCRIPT.exists():
        return f"needs the source tree's {IMAGE_SCRIPT.relative_to(SOURCE_TREE)}"
    if uefi and not OVMF_CODE.exists():
        return "needs ovmf for UEFI VMs"
    return None


def build_test_image() -> Path:
    """The cached test image directory (built from Debian packages on first use)."""
    built = subprocess.run(["bash", str(IMAGE_SCRIPT)], capture_output=True, text=True,
                           timeout=900, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"building the test image failed: {built.stderr.strip()}")
    return Path(built.stdout.strip().splitlines()[-1])


class VmLab:
    """A bridge, bootd serving it with `config`, and VMs on taps attached to it."""

    def __init__(self, lab: NetLab, tmp: Path, config: str, server_cidr: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.ns = lab.namespace("vm")
        lab.bridge(self.ns, "br0")
        lab.address(self.ns, "br0", server_cidr)
        self.config = tmp / "bootd.yaml"
        self.config.write_text(config)
        self.log = tmp / "bootd.log"
        self.bootd = lab.start_bootd(self.ns, self.config, self.log)
        self.vms: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start_vm(self, mac: str, *, uefi: bool = False, memory_mib: int = 512,
                 dead_nic: bool = False) -> None:
        """`dead_nic`: a second NIC with a link but no DHCP server behind it, as an
        uncabled-to-anything-useful server port (BIOS only: OVMF would try to PXE from it)."""
        tap = f"tap{len(self.vms)}"
        self.lab.tap(self.ns, tap, "br0")
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
            "qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-nographic",
            "-no-reboot",
            *firmware, "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", nic, *self._dead_nic(tap, mac, dead_nic), "-boot", "n"],
            stdout=console.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.vms[mac] = (proc, console)

    def _dead_nic(self, tap: str, mac: str, wanted: bool) -> list[str]:
        if not wanted:
            return []
        self.lab.tap(self.ns, f"{tap}x", None)
        second = mac[:-2] + f"{int(mac[-2:], 16) ^ 0x80:02x}"
        return ["-netdev", f"tap,id=n1,ifname={tap}x,script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n1,mac={second},romfile="]

    def console(self, mac: str) -> str:
        return self.vms[mac][1].read_bytes().decode(errors="replace")

    def outcome(self, mac: str, stage: str | None = None) -> str | None:
        """joined | failed | None (still booting): the test image's console markers, else
        the node's `stage` in bootd status if given (images without markers), else a VM
        that ended."""
        text = self.console(mac)
        if JOINED_MARK in text:
            return "joined"
        if FAILED_MARK in text:
            return "failed"
        if stage in FINISHED:
            return stage
        if self.vms[mac][0].poll() is not None:
            return "failed"
        return None

    def outcomes(self, nodes: list[dict[str, object]] | None = None,
                 ) -> dict[str, str | None]:
        """outcome() of every VM, from one `bootd status` (`nodes`, else asked now)."""
        stages = {str(n["mac"]): str(n["stage"])
                  for n in (self.nodes() if nodes is None else nodes)}
        return {mac: self.outcome(mac, stages.get(mac)) for mac in self.vms}

    def wait_joined(self, mac: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.outcome(mac)
            if result == "joined":
                return self.console(mac)
            if result == "failed":
                break
            time.sleep(1)
        raise AssertionError(f"VM {mac} did not join. Console tail:\n"
                             + self.console(mac)[-3000:]
                             + "\n\nbootd status:\n" + self.status_text(mac))

    def wait_finished(self, mac: str, node: str, timeout: float = 300) -> dict[str, object]:
        """For images that print no test markers (the production image): poll `bootd
        status` until the node is joined or failed; its status detail is returned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                detail = self.status(node)
            except RuntimeError:  # no events for the node yet
                detail = {}
            if detail.get("stage") in FINISHED:
                return detail
            if self.vms[mac][0].poll() is not None:
                break
            time.sleep(2)
        raise AssertionError(f"VM {mac} ({node}) neither joined nor failed. Console tail:\n"
                             + self.console(mac)[-3000:]
                             + "\n\nbootd status:\n" + self.status_text(node))

    def status(self, node: str | None = None) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-m", "bootd", "status", "-c", str(self.config),
                              *([node] if node else []), "-o", "json"],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        result: dict[str, object] = json.loads(out.stdout)
        return result

    def nodes(self) -> list[dict[str, object]]:
        """The rows of `bootd status -o json`; none before bootd has seen anything."""
        try:
            nodes = self.status()["nodes"]
        except RuntimeError:  # no events yet
            return []
        assert isinstance(nodes, list)
        return nodes

    def status_text(self, node: str | None = None) -> str:
        return subprocess.run([sys.executable, "-m", "bootd", "status", "-c", str(self.config),
                               *([node] if node else [])], capture_output=True, text=True,
                              timeout=60, check=False).stdout


def last_attempt_steps(detail: dict[str, object]) -> list[dict[str, object]]:
    """The steps of a node's latest boot attempt, from `bootd status NODE -o json`."""
    history = detail["history"]
    assert isinstance(history, list)
    steps: list[dict[str, object]] = history[-1]["steps"]
    return steps
