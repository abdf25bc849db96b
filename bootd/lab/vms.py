"""QEMU virtual machines PXE booting from a bootd on a throw-away namespace network.

Used by `bootd lab` and by the end-to-end tests (whose waits and console checks live in
tests/e2e/vms.py). BIOS VMs run SeaBIOS with QEMU's iPXE
ROM; UEFI VMs run OVMF's own PXE (no option ROM). Everything lives in namespaces the lab
made and is removed with it; VMs are ended by PID.
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bootd.lab.netlab import NetLab, netns_available
from bootd.lab.racks import Racks
from bootd.state.events import FINISHED

# The recipe ships as package data, so `bootd lab` works from an installed wheel.
IMAGE_RECIPE = importlib.resources.files("bootd.lab") / "testimage" / "build.sh"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


def missing_for_vms(uefi: bool = False) -> str | None:
    """None when VMs can be booted here, else what is missing."""
    if (why := netns_available()) is not None:
        return why
    for tool in ("qemu-system-x86_64", "busybox", "mksquashfs", "cpio"):
        if shutil.which(tool) is None:
            return f"needs {tool} (scripts/install-deps installs it)"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun for the VMs' tap devices"
    if not IMAGE_RECIPE.is_file():
        return f"the installed package lacks its test image recipe ({IMAGE_RECIPE})"
    if uefi and not OVMF_CODE.exists():
        return "needs ovmf for UEFI VMs"
    return None


def build_test_image() -> Path:
    """The cached test image directory (built from Debian packages on first use)."""
    with importlib.resources.as_file(IMAGE_RECIPE) as recipe:
        built = subprocess.run(["bash", str(recipe)], capture_output=True, text=True,
                               timeout=900, check=False)
    if built.returncode != 0:
        raise RuntimeError(f"building the test image failed: {built.stderr.strip()}")
    return Path(built.stdout.strip().splitlines()[-1])


class VmLab:
    """bootd serving with `config`, and VMs on taps: on one bridge beside bootd (br0,
    `server_cidr` on it), or on the rack bridges of a routed lab (`racks`).

    With `config` None the lab starts no bootd: the caller runs one in `ns` its own way (a
    container) and sets `status_command` to how `bootd status` is asked there."""

    def __init__(self, lab: NetLab, tmp: Path, config: str | None, server_cidr: str = "",
                 *, racks: Racks | None = None) -> None:
        self.lab, self.tmp = lab, tmp
        if racks is None:
            self.ns = self.vm_ns = lab.namespace("vm")
            lab.bridge(self.ns, "br0")
            lab.address(self.ns, "br0", server_cidr)
        else:  # bootd in the server namespace, VMs on the router's rack bridges
            self.ns, self.vm_ns = racks.srv, racks.rtr
        self.config = tmp / "bootd.yaml"
        self.log = tmp / "bootd.log"
        self.status_command = [sys.executable, "-m", "bootd", "status", "-c", str(self.config)]
        self.bootd: subprocess.Popen[bytes] | None = None
        if config is not None:
            self.config.write_text(config)
            self.bootd = lab.start_bootd(self.ns, self.config, self.log)
        self.vms: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

    def start_vm(self, mac: str, *, uefi: bool = False, memory_mib: int = 512,
                 dead_nic: bool = False, bridge: str = "br0") -> None:
        """`dead_nic`: a second NIC with a link but no DHCP server behind it, as an
        uncabled-to-anything-useful server port (BIOS only: OVMF would try to PXE from it).
        `bridge`: where the VM is cabled (a rack's bridge in a routed lab)."""
        tap = f"tap{len(self.vms)}"
        console = self.tmp / f"console-{mac.replace(':', '')}.log"
        command = self.vm_command(mac, tap, uefi=uefi, memory_mib=memory_mib,
                                  dead_nic=dead_nic, bridge=bridge)
        proc = self.lab.spawn(self.vm_ns, command, stdout=console.open("wb"),
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.vms[mac] = (proc, console)

    def vm_command(self, mac: str, tap: str, *, uefi: bool = False, memory_mib: int = 512,
                   dead_nic: bool = False, bridge: str = "br0") -> list[str]:
        """A VM's QEMU command line on a new tap `tap` on `bridge` (serial console on
        stdout; it powers off rather than reboots), for start_vm or a lab BMC to run."""
        self.lab.tap(self.vm_ns, tap, bridge)
        firmware: list[str] = []
        nic = f"virtio-net-pci,netdev=n0,mac={mac}"
        if uefi:
            variables = self.tmp / f"vars-{tap}.fd"
            shutil.copy(OVMF_VARS, variables)
            firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                        "-drive", f"if=pflash,format=raw,file={variables}"]
            nic += ",romfile="
        return ["qemu-system-x86_64", "-accel", "tcg", "-m", str(memory_mib), "-nographic",
                "-no-reboot", *firmware,
                "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                "-device", nic, *self._dead_nic(tap, mac, dead_nic), "-boot", "n"]

    def _dead_nic(self, tap: str, mac: str, wanted: bool) -> list[str]:
        if not wanted:
            return []
        self.lab.tap(self.vm_ns, f"{tap}x", None)
        second = mac[:-2] + f"{int(mac[-2:], 16) ^ 0x80:02x}"
        return ["-netdev", f"tap,id=n1,ifname={tap}x,script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=n1,mac={second},romfile="]

    def console(self, mac: str) -> str:
        return self.vms[mac][1].read_bytes().decode(errors="replace")

    def outcome(self, mac: str, stage: str | None) -> str | None:
        """joined | failed | None (still booting): the node's `stage` in bootd status,
        else "failed" for a VM that ended before it finished."""
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

    def status(self, node: str | None = None) -> dict[str, object]:
        out = subprocess.run([*self.status_command, *([node] if node else []), "-o", "json"],
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
        return subprocess.run([*self.status_command, *([node] if node else [])],
                              capture_output=True, text=True,
                              timeout=60, check=False).stdout
