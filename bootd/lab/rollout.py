"""`bootd lab --rollout`: updating a fleet, shown on two VMs with real BMCs.

Two QEMU VMs sit behind OpenIPMI ipmi_sim BMCs (bootd.lab.bmc). The lab imports the test
image as version v1 and a rebuilt one as v2 with `bootd image add`, powers the pool on
through the BMCs (`bootd power --pool workers pxe`), waits until both joined on v1, then
runs `bootd rollout start workers --image test@v2` and prints the rollout as it goes: the
canary, the wave, each node back on the new version, and `bootd status` with its IMAGE
column at the end. Everything is removed afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bootd.lab.bmc import USERNAME, LabBmc
from bootd.lab.netlab import NetLab

SERVER_IP = "10.250.0.1"
PASSWORD = "lab-bmc"
VMS = {"worker-1": ("52:54:00:b0:08:01", "10.250.0.11"),
       "worker-2": ("52:54:00:b0:08:02", "10.250.0.12")}
CONFIG = """\
server: {{interfaces: [br0], address: {server}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.250.0.0/24, gateway: {server}, dns: [{server}], domain: lab.bootd}}
tftp: {{root: {tmp}}}
clusters:
  lab: {{api_server: "https://10.250.0.10:6443", ca_cert_hash: "sha256:{zeros}",
         token: {{value: abcdef.0123456789abcdef}}}}
defaults:
  image: test                  # follows the promoted version (or a rollout's pointer)
  cluster: lab
  power: {{ipmi: {{host: "10.250.0.1{{ip_last}}", username: {user},
                  password: {{file: {tmp}/bmc.pw}}}}}}
pools:
  - name: workers
    nodes:
      - {{name: worker-1, mac: "52:54:00:b0:08:01", ip: 10.250.0.11}}
      - {{name: worker-2, mac: "52:54:00:b0:08:02", ip: 10.250.0.12}}
"""


def run_rollout_lab(out: Any = sys.stdout, timeout: float = 600) -> int:
    from bootd.lab.vms import VmLab, build_test_image, missing_for_vms

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    why = missing_for_vms() or (None if shutil.which("ipmi_sim") else
                                "needs ipmi_sim (Debian's openipmi; scripts/install-deps)")
    if why is not None:
        say(f"bootd lab --rollout: {why}")
        return 2
    say("lab: building or reusing the test image (Debian cloud kernel, busybox initramfs)")
    image = build_test_image()
    with tempfile.TemporaryDirectory(prefix="bootd-lab-") as d, NetLab("bootdroll") as lab:
        tmp = Path(d)
        (tmp / "bmc.pw").write_text(PASSWORD)
        config = tmp / "bootd.yaml"
        config.write_text(CONFIG.format(server=SERVER_IP, tmp=tmp, zeros="0" * 64,
                                        user=USERNAME))
        vmlab = VmLab(lab, tmp, None, f"{SERVER_IP}/24")

        def bootd(*args: str, show: bool = True, timeout: float = 120,
                  ) -> subprocess.CompletedProcess[str]:
            if show:
                say(f"\n$ bootd {shlex.join(args)}")
            done = lab.run(vmlab.ns, [sys.executable, "-m", "bootd", *args, "-c",
                                      str(config)], timeout=timeout, check=False)
            if show:
                say((done.stdout + done.stderr).rstrip())
            return done

        builds = {"v1": image_build(image, tmp / "v1"),
                  "v2": image_build(image, tmp / "v2", pad=4096)}
        say("lab: two builds of the test image: v1, and v2 (its rootfs rebuilt)")
        versions = {}
        for tag, build in builds.items():
            added = bootd("image", "add", "test", str(build), "--cmdline",
                          "console=ttyS0 panic=-1")
            if added.returncode != 0:
                return 1
            versions[tag] = added.stdout.split("@", 1)[1].split(":", 1)[0]
        lab.start_bootd(vmlab.ns, config, tmp / "bootd.log")
        say(f"\nlab: bootd serving on br0 {SERVER_IP}/24; each VM has an IPMI BMC "
            "(ipmi_sim) whose chassis control starts and stops its QEMU")
        bmcs = []
        try:
            for i, (name, (mac, ip)) in enumerate(VMS.items()):
                bmc_ip = f"10.250.0.1{ip.rsplit('.', 1)[1]}"
                lab.address(vmlab.ns, "br0", f"{bmc_ip}/24")
                bmcs.append(LabBmc(lab, vmlab.ns, bmc_ip, tmp / f"bmc-{name}",
                                   vmlab.vm_command(mac, f"tap{i}"), PASSWORD, name=name))
            if bootd("power", "--pool", "workers", "pxe").returncode != 0:
                return 1
            say("\nlab: waiting for both to join on v1")
            deadline = time.monotonic() + timeout
            while not _all_joined(bootd("status", "-o", "json", show=False),
                                  f"test@{versions['v1']}"):
                if time.monotonic() > deadline:
                    bootd("status")
                    return 1
                time.sleep(2)
            bootd("status")
            bootd("image", "list")
            started = time.monotonic()
            rolled = bootd("rollout", "start", "workers", "--image", f"test@{versions['v2']}",
                           "--max-unavailable", "1", "--timeout", "5m", "--wait",
                           timeout=timeout)
            say(f"\nlab: rollout took {time.monotonic() - started:.0f}s")
            bootd("status")
            bootd("image", "list")
        finally:
            for bmc in bmcs:
                bmc.close()
        say("lab: removing namespaces, BMCs and VMs")
    return rolled.returncode


def image_build(image: Path, out: Path, *, pad: int = 0, rootfs: bytes | None = None,
                ) -> Path:
    """A build directory from the test image, as `bootd image add` takes it: the same
    kernel and initrd, and its rootfs followed by `pad` zero bytes (a new version that
    still mounts: squashfs ignores what follows its data), or replaced by `rootfs` (a
    broken build)."""
    out.mkdir()
    for name in ("vmlinuz", "initrd.img", "rootfs.squashfs"):
        shutil.copy(image / name, out / name)
    if rootfs is not None:
        (out / "rootfs.squashfs").write_bytes(rootfs)
    with (out / "rootfs.squashfs").open("ab") as f:
        f.write(b"\0" * pad)
    return out


def _all_joined(done: subprocess.CompletedProcess[str], ref: str) -> bool:
    """From `bootd status -o json`: every node joined on `ref`."""
    if done.returncode != 0:
        return False
    nodes = json.loads(done.stdout)["nodes"]
    return bool(nodes) and all(n["stage"] == "joined" and n["image"] == ref for n in nodes)
