"""`bootd lab`: bootd doing its job on a throw-away network, with nothing prepared.

Today it shows the DHCP stage of a boot: a namespace with a bridge, bootd on it with a
generated config, and real DHCP clients (busybox udhcpc) that speak like BIOS PXE, UEFI
PXE, iPXE, a booted Linux and an unknown machine, each with what bootd told it. The QEMU
VMs that boot all the way arrive with the TFTP/HTTP issues.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from bootd.netlab import LabError, NetLab, netns_available

SERVER_IP = "10.250.0.1"


@dataclass(frozen=True)
class DemoClient:
    label: str
    mac: str
    udhcpc_args: tuple[str, ...]


CLIENTS = (
    DemoClient("BIOS PXE ROM", "02:00:00:00:01:01",
               ("-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")),
    DemoClient("UEFI PXE (x64)", "02:00:00:00:01:02",
               ("-V", "PXEClient:Arch:00007:UNDI:003000", "-x", "0x5d:0007")),
    DemoClient("iPXE", "02:00:00:00:01:01",
               ("-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x4d:69505845")),
    DemoClient("booted Linux", "02:00:00:00:01:01", ()),
    DemoClient("unknown MAC", "52:54:00:c0:ff:ee",
               ("-V", "PXEClient:Arch:00007:UNDI:003000", "-x", "0x5d:0007")),
)

CONFIG = """\
server: {{interfaces: [br0], address: {server}, state_dir: {state}, api: {state}/api.sock}}
network: {{subnet: 10.250.0.0/24, gateway: {server}, dns: [{server}], domain: lab.bootd,
          lease_time: 1h}}
tags:
  gpu: {{labels: {{nvidia.com/gpu: "true"}}, taints: ["nvidia.com/gpu=present:NoSchedule"]}}
pools:
  - name: workers
    nodes:
      - {{name: worker-1, mac: "02:00:00:00:01:01", ip: 10.250.0.11}}
      - {{name: worker-2, mac: "02:00:00:00:01:02", ip: 10.250.0.12, tags: [gpu]}}
  - name: catch-all
    dynamic: {{range: 10.250.0.100-10.250.0.149, name: "node-{{mac}}"}}
"""


def run_lab(out: object = sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    if (why := netns_available()) is not None:
        say(f"bootd lab: {why}")
        return 2
    with tempfile.TemporaryDirectory(prefix="bootd-lab-") as d, NetLab("bootdlab") as lab:
        tmp = Path(d)
        config = tmp / "bootd.yaml"
        config.write_text(CONFIG.format(server=SERVER_IP, state=tmp / "state"))
        say(f"lab: namespaces {lab.tag}-*, bridge br0 {SERVER_IP}/24, config {config}")
        say(textwrap.indent(config.read_text(), "  | "))
        srv = lab.namespace("srv")
        lab.bridge(srv, "br0")
        lab.address(srv, "br0", f"{SERVER_IP}/24")
        log = tmp / "bootd.log"
        proc = lab.spawn(srv, [sys.executable, "-m", "bootd", "serve", "-c", str(config),
                               "--log-format", "json"],
                         stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        if not _wait_for(log, '"bootd serving"', proc):
            say(f"bootd did not start:\n{log.read_text()}")
            return 1
        say(f"bootd: serving DHCP on br0 (pid {proc.pid})\n")
        say(f"{'client':16} {'MAC':18} {'address':13} {'hostname':24} boot file")
        failures = 0
        for i, client in enumerate(CLIENTS):
            env = _dhcp(lab, srv, tmp, i, client)
            if env is None:
                failures += 1
                say(f"{client.label:16} {client.mac:18} (no answer)")
                continue
            boot = env.get("boot_file", "-")
            if boot != "-":
                boot += f"  (next-server {env.get('siaddr', '?')})"
            say(f"{client.label:16} {client.mac:18} {env.get('ip', '?'):13} "
                f"{env.get('hostname', '-'):24} {boot}")
        status = subprocess.run([sys.executable, "-m", "bootd", "status", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, check=False)
        say("\n$ bootd status")
        say(status.stdout.rstrip() or status.stderr.rstrip())
        lab.stop(proc)
        say("\nbootd's log of the same exchanges:")
        for line in log.read_text().splitlines():
            if '"dhcp ack"' in line:
                say("  " + line)
        say("\nlab: removed namespaces and processes")
        return 1 if failures else 0


def _wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and marker in log.read_text():
            return True
        time.sleep(0.05)
    return False


def _dhcp(lab: NetLab, srv: str, tmp: Path, i: int, client: DemoClient,
          ) -> dict[str, str] | None:
    ns = lab.namespace(f"c{i}")
    lab.veth(srv, f"port{i}", ns, "eth0", mac_b=client.mac)
    lab.attach(srv, f"port{i}", "br0")
    result = tmp / f"client{i}.env"
    script = tmp / f"client{i}.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {result}\nexit 0\n')
    script.chmod(0o755)
    try:
        lab.run(ns, ["udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "4", "-T", "1",
                     "-s", str(script), *client.udhcpc_args], timeout=30)
    except (LabError, subprocess.TimeoutExpired, FileNotFoundError):
        return None
    if not result.exists():
        return None
    return dict(line.split("=", 1) for line in result.read_text().splitlines() if "=" in line)
