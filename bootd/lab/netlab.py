"""Throw-away network namespaces for tests, benchmarks and `bootd lab`.

Everything a lab sends stays inside namespaces it created; `close()` removes them and ends
only the processes it started, by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from bootd.fleet.mac import normalize_mac


class LabError(RuntimeError):
    pass


def netns_available() -> str | None:
    """None if namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    return None


class NetLab:
    """A set of namespaces joined by veth pairs; a context manager that cleans up."""

    def __init__(self, prefix: str = "bootd") -> None:
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- building

    def namespace(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        self._ip("netns", "add", name)
        self.namespaces.append(name)
        self._ip("-n", name, "link", "set", "lo", "up")
        return name

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, *, mac_b: str | None = None,
             ) -> None:
        """A cable from ns_a:if_a to ns_b:if_b, both ends up."""
        tmp_a, tmp_b = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
        self._ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        self._ip("link", "set", tmp_a, "netns", ns_a, "name", if_a)
        self._ip("link", "set", tmp_b, "netns", ns_b, "name", if_b)
        if mac_b:
            self._ip("-n", ns_b, "link", "set", if_b, "address", mac_b)
        self._ip("-n", ns_a, "link", "set", if_a, "up")
        self._ip("-n", ns_b, "link", "set", if_b, "up")

    def bridge(self, ns: str, name: str) -> None:
        self._ip("-n", ns, "link", "add", name, "type", "bridge")
        self._ip("-n", ns, "link", "set", name, "up")

    def tap(self, ns: str, name: str, bridge: str | None) -> None:
        """A tap device for a VM, plugged into `bridge` (None: a port with a link and
        nothing behind it)."""
        self._ip("-n", ns, "tuntap", "add", name, "mode", "tap")
        if bridge is not None:
            self.attach(ns, name, bridge)
        self._ip("-n", ns, "link", "set", name, "up")

    def attach(self, ns: str, interface: str, bridge: str) -> None:
        self._ip("-n", ns, "link", "set", interface, "master", bridge)

    def address(self, ns: str, interface: str, cidr: str) -> None:
        self._ip("-n", ns, "addr", "add", cidr, "dev", interface)

    def set_mac(self, ns: str, interface: str, mac: str) -> None:
        self._ip("-n", ns, "link", "set", interface, "down")
        self._ip("-n", ns, "link", "set", interface, "address", normalize_mac(mac))
        self._ip("-n", ns, "link", "set", interface, "up")

    def lose_packets(self, ns: str, interface: str, percent: int) -> str:
        """Lose `percent`% of the packets on `interface`: netem on its egress where the
        kernel has netem, else an nftables random drop of what it receives (an output-hook
        drop would fail the sender's sendto with EPERM, which a lossy link never does).
        Returns which was used."""
        netem = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev",
                                interface, "root", "netem", "loss", f"{percent}%"],
                               capture_output=True, text=True, check=False)
        if netem.returncode == 0:
            return "netem"
        for args in (["add", "table", "inet", "bootdloss"],
                     ["add", "chain", "inet", "bootdloss", "in",
                      "{ type filter hook input priority 0 ; }"],
                     ["add", "rule", "inet", "bootdloss", "in", "iifname", interface,
                      "numgen", "random", "mod", "100", "lt", str(percent), "drop"]):
            nft = subprocess.run(["ip", "netns", "exec", ns, "nft", *args],
                                 capture_output=True, text=True, check=False)
            if nft.returncode != 0:
                raise LabError(f"cannot emulate loss: netem: {netem.stderr.strip()}; "
                               f"nft: {nft.stderr.strip()}")
        return "nftables"

    def start_bootd(self, ns: str, config: Path, log: Path, *, extra: Sequence[str] = (),
                    timeout: float = 20, **kwargs: object) -> subprocess.Popen[bytes]:
        """`bootd serve` in `ns`, logging JSON to `log` (appended); returns once it logged
        `bootd serving` (again, on a restart), or raises LabError with the log's tail."""
        mark = '"bootd serving"'
        before = log.read_text().count(mark) if log.exists() else 0
        proc = self.spawn(ns, [sys.executable, "-m", "bootd", "serve", "-c", str(config),
                               "--log-format", "json", *extra],
                          stdout=subprocess.DEVNULL, stderr=log.open("ab"), **kwargs)
        deadline = time.monotonic() + timeout
        while log.read_text().count(mark) <= before:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text().splitlines()[-30:])
                raise LabError(f"bootd did not start (exit {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        return proc

    # -- running

    def run(self, ns: str, cmd: Sequence[str], *, timeout: float = 60, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise LabError(f"{' '.join(cmd)} in {ns} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def spawn(self, ns: str, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in `ns`; it is ended by `close()` if still running."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", ns, *cmd], start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10,
             ) -> int:
        """Signal one process we started (its own session) and reap it."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.stop(proc, timeout=5)
        self.processes.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()

    @staticmethod
    def _ip(*args: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
