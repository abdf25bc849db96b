"""A routed lab: bootd one router hop away from N racks, as in a datacenter.

    srv namespace: bootd on up0 (10.60.0.1/24)
        |
    rtr namespace: core0 10.60.0.254, IP forwarding, Debian's dhcrelay (-a: option 82
        with the rack bridge's name as circuit-id) relaying every rack to bootd
        +-- bridge rack1 10.61.1.1/24 -- VMs or clients
        +-- bridge rack2 10.61.2.1/24 -- ...

Everything lives in namespaces the lab made; dhcrelay is ended by PID with the lab.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bootd.lab.netlab import NetLab

SERVER_IP = "10.60.0.1"
ROUTER_IP = "10.60.0.254"


def rack_gateway(n: int) -> str:
    return f"10.61.{n}.1"


def missing_for_racks() -> str | None:
    if shutil.which("dhcrelay") is None:
        return "needs dhcrelay (Debian's isc-dhcp-relay; scripts/install-deps installs it)"
    return None


class Racks:
    def __init__(self, lab: NetLab, tmp: Path, count: int) -> None:
        self.lab, self.count = lab, count
        self.srv = lab.namespace("srv")
        self.rtr = lab.namespace("rtr")
        lab.veth(self.srv, "up0", self.rtr, "core0")
        lab.address(self.srv, "up0", f"{SERVER_IP}/24")
        lab.address(self.rtr, "core0", f"{ROUTER_IP}/24")
        lab.run(self.rtr, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        lab.run(self.srv, ["ip", "route", "add", "10.61.0.0/16", "via", ROUTER_IP])
        relay_args = []
        for n in range(1, count + 1):
            lab.bridge(self.rtr, f"rack{n}")
            lab.address(self.rtr, f"rack{n}", f"{rack_gateway(n)}/24")
            relay_args += ["-i", f"rack{n}"]
        lab.spawn(self.rtr, ["dhcrelay", "-4", "-d", "-a", "-pf", str(tmp / "dhcrelay.pid"),
                             *relay_args, "-iu", "core0", SERVER_IP],
                  stdout=subprocess.DEVNULL, stderr=(tmp / "dhcrelay.log").open("wb"))

    def networks_yaml(self, indent: str = "") -> str:
        """The `networks:` block for bootd's config: the core and every rack."""
        lines = ["networks:", "  - {name: core, subnet: 10.60.0.0/24}"]
        for n in range(1, self.count + 1):
            lines.append(f"  - {{name: rack{n}, subnet: 10.61.{n}.0/24, "
                         f"gateway: {rack_gateway(n)}, dns: [{SERVER_IP}]}}")
        return "".join(f"{indent}{line}\n" for line in lines)

    def catch_all_ranges(self) -> str:
        return ", ".join(f"10.61.{n}.100-10.61.{n}.149" for n in range(1, self.count + 1))
