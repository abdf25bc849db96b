"""Integration fixtures: a server namespace running the real `bootd serve`, a client
namespace on the other end of a veth cable, and the real clients (dhclient, udhcpc,
perfdhcp) run inside it. Everything is created per test and removed afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bootd.lab.netlab import NetLab, netns_available

SERVER_IP = "10.77.0.1"
SUBNET = "10.77.0.0/24"


def require(*tools: str) -> None:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")


def udhcpc(lab: NetLab, ns: str, tmp: Path, *extra: str, tries: int = 3,
           ) -> dict[str, str] | None:
    """Busybox udhcpc once on `ns`'s cli0: the env its script saw on `bound`, or None."""
    out = tmp / f"udhcpc-{time.monotonic_ns()}.env"
    script = tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}\nexit 0\n')
    script.chmod(0o755)
    proc = lab.run(ns, [
        "udhcpc", "-i", "cli0", "-f", "-q", "-n", "-t", str(tries), "-T", "1", "-A", "1",
        "-s", str(script), *extra], check=False, timeout=30)
    if proc.returncode != 0 or not out.exists():
        return None
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


@dataclass
class Bootd:
    """The daemon under test, as a child process in the server namespace."""

    lab: NetLab
    ns: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = self.lab.start_bootd(self.ns, self.config, self.log,
                                         extra=["--log-level", "debug"])

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        return self.lab.stop(self.proc, sig)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text().splitlines()[-n:]) if self.log.exists() else ""

    def events(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


@dataclass
class DhcpLab:
    lab: NetLab
    server_ns: str
    client_ns: str
    tmp: Path
    daemons: list[Bootd] = field(default_factory=list)

    def bootd(self, config_body: str, drain: str = "3s", api: str | None = None) -> Bootd:
        """Start bootd; a short drain by default, since protocol tests leave transfers
        abandoned on purpose and teardown expects a prompt exit. `api`: the admin
        listener (default a unix socket in the state directory)."""
        config = self.write_config(config_body, drain, api)
        daemon = Bootd(self.lab, self.server_ns, config, self.tmp / "bootd.log")
        daemon.start()
        self.daemons.append(daemon)
        return daemon

    def write_config(self, config_body: str, drain: str = "3s", api: str | None = None,
                     ) -> Path:
        """The config `bootd()` starts with, written without starting anything."""
        state = self.tmp / "state"
        config = self.tmp / "bootd.yaml"
        config.write_text(textwrap.dedent(f"""\
            server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {state},
                     api: {api or f"{state}/api.sock"}, drain_timeout: {drain}}}
            network: {{subnet: {SUBNET}, gateway: {SERVER_IP}, dns: [{SERVER_IP}],
                       domain: lab.example, lease_time: 1h}}
            """) + textwrap.dedent(config_body))
        return config

    def set_client_mac(self, mac: str) -> None:
        self.lab.set_mac(self.client_ns, "cli0", mac)

    def udhcpc(self, *extra: str, tries: int = 3) -> dict[str, str] | None:
        """Run busybox udhcpc once; the env its script saw on `bound`, or None."""
        return udhcpc(self.lab, self.client_ns, self.tmp, *extra, tries=tries)

    def dhclient(self, timeout: float = 20) -> dict[str, str] | None:
        """Run ISC dhclient in the foreground until it binds; the env of its BOUND hook."""
        out = self.tmp / f"dhclient-{time.monotonic_ns()}.env"
        script = self.tmp / "dhclient.sh"
        script.write_text(f'#!/bin/sh\ncase "$reason" in BOUND|REBOOT) env > {out};; esac\n'
                          'exit 0\n')
        script.chmod(0o755)
        proc = self.lab.spawn(self.client_ns, [
            "dhclient", "-d", "-1", "-v", "-sf", str(script), "-lf", str(self.tmp / "dh.leases"),
            "-pf", str(self.tmp / "dh.pid"), "cli0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.stat().st_size:
                    time.sleep(0.1)
                    return dict(line.split("=", 1) for line in out.read_text().splitlines()
                                if "=" in line)
                time.sleep(0.1)
            return None
        finally:
            self.lab.stop(proc)


@pytest.fixture
def dhcp_lab(tmp_path: Path) -> Iterator[DhcpLab]:
    require("udhcpc")
    with NetLab("bdt") as lab:
        srv = lab.namespace("s")
        cli = lab.namespace("c")
        lab.veth(srv, "srv0", cli, "cli0", mac_b="02:00:00:00:00:01")
        lab.address(srv, "srv0", f"{SERVER_IP}/24")
        env = DhcpLab(lab, srv, cli, tmp_path)
        yield env
        for daemon in env.daemons:
            if daemon.proc is not None and daemon.proc.poll() is None:
                rc = daemon.stop()
                assert rc == 0, f"bootd did not exit cleanly on SIGTERM:\n{daemon.tail()}"


os.environ.setdefault("PYTHONUNBUFFERED", "1")
