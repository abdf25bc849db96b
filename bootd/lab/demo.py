"""`bootd lab`: bootd doing its job on a throw-away network, with nothing prepared.

By default it builds (or reuses) the test image, starts bootd on a namespace bridge with a
generated config and PXE boots QEMU VMs with empty disks (BIOS + iPXE, or `--uefi` with
OVMF) until they have joined, showing `bootd status` as they go. `--racks N` puts the VMs
in N rack subnets behind a router running a DHCP relay, as in a routed datacenter.
`--dhcp-only` instead plays the DHCP stage with real udhcpc clients speaking like BIOS
PXE, UEFI PXE, iPXE, a booted Linux and an unknown machine. Everything is removed
afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bootd.http.forward import forwarding
from bootd.lab.netlab import LabError, NetLab, netns_available
from bootd.lab.racks import SERVER_IP as RACKS_SERVER_IP
from bootd.lab.racks import Racks, missing_for_racks

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


FLAT_NETWORK = """\
server: {{interfaces: [br0], address: {server}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.250.0.0/24, gateway: {server}, dns: [{server}], domain: lab.bootd}}
"""
ROUTED_NETWORK = """\
server: {{interfaces: [up0], address: {server}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
{networks}"""
VM_CONFIG = """\
tftp: {{root: {tmp}}}
images:
  test: {{kernel: {image}/vmlinuz, initrd: {image}/initrd.img,
          rootfs: {image}/rootfs.squashfs, cmdline: {cmdline}}}
clusters:
  lab: {{api_server: "https://10.250.0.10:6443", ca_cert_hash: "sha256:{zeros}",
         token: {{value: abcdef.0123456789abcdef}}}}
defaults: {{image: test, cluster: lab}}
tags:
  gpu: {{labels: {{nvidia.com/gpu: "true"}}, taints: ["nvidia.com/gpu=present:NoSchedule"]}}
pools:
  - name: workers
    nodes:
      - {{name: worker-1, mac: "52:54:00:b0:07:01", ip: {worker_ip}, tags: [gpu]}}
  - name: catch-all
    dynamic: {{ranges: [{ranges}], name: "node-{{mac}}"}}
"""


def vm_config(tmp: Path, image: Path, cmdline: str, racks: Racks | None) -> str:
    """bootd's config for the VM lab: one bridge, or the racks of a routed lab."""
    if racks is None:
        head = FLAT_NETWORK.format(server=SERVER_IP, tmp=tmp)
        worker_ip, ranges = "10.250.0.11", "10.250.0.100-10.250.0.149"
    else:
        head = ROUTED_NETWORK.format(server=RACKS_SERVER_IP, tmp=tmp,
                                     networks=racks.networks_yaml())
        worker_ip, ranges = "10.61.1.11", racks.catch_all_ranges()
    return head + VM_CONFIG.format(tmp=tmp, image=image, zeros="0" * 64,
                                   cmdline=json.dumps(cmdline), worker_ip=worker_ip,
                                   ranges=ranges)


IMAGE_FILES = ("vmlinuz", "initrd.img", "rootfs.squashfs")


def image_cmdline(image: Path) -> str:
    """The kernel command line for an image of images/build-production-image.sh: the one
    in its bootd-image.yaml, with the serial console the lab reads."""
    cmdline = "boot=bootd"
    snippet = image / "bootd-image.yaml"
    if snippet.exists():
        data = yaml.safe_load(snippet.read_text())
        for entry in (data or {}).get("images", {}).values():
            cmdline = str(entry.get("cmdline", cmdline))
            break
    if "console=ttyS0" not in cmdline:
        cmdline += " console=ttyS0"
    return cmdline


def run_vm_lab(vms: int = 2, uefi: bool = False, out: object = sys.stdout,
               timeout: float = 400, image: Path | None = None, racks: int = 0) -> int:
    """Boot `vms` QEMU VMs from bootd; the first is a reserved node, the rest unknown.
    `image`: a directory from images/build-production-image.sh (or any with vmlinuz,
    initrd.img and rootfs.squashfs) instead of the test image. `racks`: that many rack
    subnets behind a router and a DHCP relay, VMs spread over them."""
    from bootd.lab.vms import VmLab, build_test_image, missing_for_vms

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    why = missing_for_vms(uefi) or (missing_for_racks() if racks else None)
    if why is not None:
        say(f"bootd lab: {why}; `bootd lab --dhcp-only` needs only udhcpc")
        return 2
    if image is None:
        say("lab: building or reusing the test image (Debian cloud kernel, busybox initramfs)")
        image, cmdline, memory = build_test_image(), "console=ttyS0 panic=-1", 512
    else:
        missing = [f for f in IMAGE_FILES if not (image / f).is_file()]
        if missing:
            say(f"bootd lab: {image} has no {', '.join(missing)} "
                "(images/build-production-image.sh makes them)")
            return 2
        image, cmdline, memory = image.resolve(), image_cmdline(image), 1536
        say(f"lab: booting the image in {image} ({cmdline}); the lab has no Kubernetes "
            "control plane, so a real kubeadm gets as far as its join attempt")
    tty = hasattr(out, "isatty") and out.isatty()
    with (tempfile.TemporaryDirectory(prefix="bootd-lab-") as d, NetLab("bootdlab") as lab,
          contextlib.ExitStack() as stack):
        tmp = Path(d)
        rack_lab = Racks(lab, tmp, racks) if racks else None
        vmlab = VmLab(lab, tmp, vm_config(tmp, image, cmdline, rack_lab), f"{SERVER_IP}/24",
                      racks=rack_lab)
        if rack_lab is None:
            say(f"lab: bootd serving on br0 {SERVER_IP}/24 in namespace {vmlab.ns}")
        else:
            say(f"lab: bootd on {RACKS_SERVER_IP} in namespace {vmlab.ns}, one router hop "
                f"from {racks} rack(s) (10.61.N.0/24) whose DHCP dhcrelay forwards to it")
        page = stack.enter_context(status_page(tmp / "state" / "api.sock", say))
        macs = [f"52:54:00:b0:07:{i + 1:02x}" for i in range(vms)]
        started = time.monotonic()
        for i, mac in enumerate(macs):
            bridge = f"rack{i % racks + 1}" if racks else "br0"
            vmlab.start_vm(mac, uefi=uefi, memory_mib=memory, bridge=bridge)
        placed = [f"{mac} ({f'rack{i % racks + 1}' if racks else 'br0'})"
                  for i, mac in enumerate(macs)]
        say(f"lab: {vms} {'UEFI' if uefi else 'BIOS'} VM(s) powered on with empty disks: "
            + ", ".join(placed))
        last_print = 0.0
        while time.monotonic() - started < timeout:
            done = vmlab.outcomes()
            finished = all(result is not None for result in done.values())
            now = time.monotonic()
            if tty or finished or now - last_print > 15:
                table = vmlab.status_text()
                say(("\033[H\033[2J" if tty else "\n")
                    + f"[{now - started:5.1f}s] bootd status\n" + table.rstrip())
                last_print = now
            if finished:
                break
            time.sleep(2)
        nodes = vmlab.nodes()
        results = {mac: r or "timed out" for mac, r in vmlab.outcomes(nodes).items()}
        say("")
        errors = {str(n["mac"]): n.get("last_error") for n in nodes}
        for mac, result in results.items():
            why = f" ({errors[mac]})" if result == "failed" and errors.get(mac) else ""
            say(f"  VM {mac}: {result}{why}")
        say(f"lab: done in {time.monotonic() - started:.0f}s")
        if tty and page is not None and sys.stdin.isatty():
            with contextlib.suppress(EOFError, KeyboardInterrupt):
                input(f"lab: the status page stays up at {page}; press Enter to end the lab ")
        say("lab: removing namespaces and VMs")
    return 0 if all(r == "joined" for r in results.values()) else 1


@contextlib.contextmanager
def status_page(api: Path, say: Callable[[str], None]) -> Iterator[str | None]:
    """The lab's status page on this machine's loopback (port 8080, else a free one),
    forwarded to the lab bootd's unix-socket API."""
    with contextlib.ExitStack() as stack:
        url = None
        for port in (8080, 0):
            with contextlib.suppress(OSError):
                url = stack.enter_context(forwarding(str(api), "127.0.0.1", port))
                break
        if url is None:
            say("lab: no loopback port for the status page; `bootd status` shows the same")
        else:
            port_text = url.rstrip("/").rsplit(":", 1)[1]
            say(f"lab: status page {url} (from a laptop: ssh -L 8080:127.0.0.1:{port_text} "
                "root@this-host, then open http://localhost:8080/)")
        yield url


def run_lab(out: object = sys.stdout) -> int:
    """The DHCP stage only, with udhcpc clients (no QEMU needed)."""
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
        try:
            proc = lab.start_bootd(srv, config, log)
        except LabError as exc:
            say(str(exc))
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
