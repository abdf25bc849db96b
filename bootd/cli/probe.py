"""`bootd probe`: play a PXE client against whatever answers on an interface.

Any boot server (bootd, dnsmasq, ...) is probed the way firmware meets it: a DHCP
DISCOVER/REQUEST crafted with scapy, the boot file over TFTP with tftpy, and the iPXE
script over HTTP; each step gets a verdict and a timing. scapy and tftpy are independent
implementations, which is the point: this is how bootd's own codecs are cross-checked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bootd.cli.explain import firmware_identity, option_text
from bootd.dhcp.packet import DhcpError, decode
from bootd.fleet.mac import mac_to_bytes, normalize_mac

PRL = [1, 3, 6, 12, 15, 28, 42, 43, 60, 66, 67, 93, 175]


@dataclass
class Step:
    name: str
    ok: bool | None  # None: skipped
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)


def _dhcp_options(kind: str, arch: str, ipxe: bool, extra: list[tuple[str, Any]],
                  ) -> list[Any]:
    client_arch, vendor_class = firmware_identity(arch)
    options: list[Any] = [("message-type", kind), ("param_req_list", PRL),
                          ("vendor_class_id", vendor_class),
                          ("pxe_client_architecture", client_arch)]
    if ipxe:
        options.append(("user_class", b"iPXE"))
    return [*options, *extra, "end"]


def _exchange(iface: str, mac: str, xid: int, options: list[Any], timeout: float,
              ) -> tuple[Any | None, float]:
    from scapy.config import conf
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.sendrecv import srp1

    conf.verb = 0
    conf.checkIPaddr = False  # the answer comes from the server, not from 255.255.255.255
    frame = (Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src="0.0.0.0", dst="255.255.255.255")
             / UDP(sport=68, dport=67)
             / BOOTP(chaddr=mac_to_bytes(mac), xid=xid, flags=0x8000) / DHCP(options=options))
    started = time.monotonic()
    answer = srp1(frame, iface=iface, timeout=timeout)
    return answer, time.monotonic() - started


def probe(iface: str, mac: str | None = None, arch: str = "bios", ipxe: bool = False,
          timeout: float = 5.0, out: Callable[[str], None] = print) -> int:
    """Run the probe; print verdicts as it goes; exit code 0 when every step passed."""
    from scapy.arch import get_if_hwaddr
    from scapy.layers.dhcp import BOOTP

    mac = normalize_mac(mac or get_if_hwaddr(iface))
    steps: list[Step] = []
    xid = random.getrandbits(32)

    def report(step: Step) -> None:
        steps.append(step)
        verdict = {True: "OK  ", False: "FAIL", None: "skip"}[step.ok]
        out(f"[{verdict}] {step.name} ({step.seconds * 1000:.0f} ms)")
        for line in step.lines:
            out(f"       {line}")

    out(f"probe: {arch}{' iPXE' if ipxe else ''} client {mac} on {iface}")
    offer, took = _exchange(iface, mac, xid, _dhcp_options("discover", arch, ipxe, []),
                            timeout)
    if offer is None or BOOTP not in offer:
        report(Step("DHCP DISCOVER -> OFFER", False, took, [f"no offer within {timeout:g}s"]))
        return 1
    try:
        reply = decode(bytes(offer[BOOTP]))
    except DhcpError as exc:
        report(Step("DHCP DISCOVER -> OFFER", False, took, [f"malformed offer: {exc}"]))
        return 1
    server_id = reply.server_id or reply.siaddr
    lines = [f"address {reply.yiaddr} from {server_id}, next-server {reply.siaddr}, "
             f"boot file {reply.file.decode(errors='replace') or '-'}"]
    lines += [option_text(c, v).strip() for c, v in reply.options.items()]
    report(Step("DHCP DISCOVER -> OFFER", True, took, lines))

    ack, took = _exchange(iface, mac, xid, _dhcp_options(
        "request", arch, ipxe, [("server_id", str(server_id)),
                                ("requested_addr", str(reply.yiaddr))]), timeout)
    acked = None
    if ack is not None and BOOTP in ack:
        with contextlib.suppress(DhcpError):
            acked = decode(bytes(ack[BOOTP]))
    ok = acked is not None and acked.message_type is not None and acked.message_type.name == "ACK"
    kind = acked.message_type.name if acked and acked.message_type else "nothing"
    report(Step("DHCP REQUEST -> ACK", ok, took, [f"answer: {kind}"]))
    if acked is None or not ok:
        return 1

    # dnsmasq NUL-terminates option 67; firmware strips that, so do we
    bootfile = (acked.options.get(67) or acked.file).rstrip(b"\0").decode(errors="replace")
    if not bootfile:
        report(Step("boot file", False, 0, ["the answer names no boot file"]))
        return 1
    if bootfile.startswith("http://") or bootfile.startswith("https://"):
        report(Step("TFTP", None, 0, [f"boot file is a URL: {bootfile}"]))
        if bootfile.endswith("/boot.ipxe"):
            bootfile += f"?mac={mac}"  # bootd answers with this node's own script
        return _http(bootfile, timeout, report)
    return _tftp(str(acked.siaddr), bootfile, timeout, report)


def _tftp(server: str, name: str, timeout: float, report: Callable[[Step], None]) -> int:
    import tftpy

    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="bootd-probe-") as d:
        target = os.path.join(d, "bootfile")
        started = time.monotonic()
        try:
            client = tftpy.TftpClient(server, 69, options={"blksize": 1468, "tsize": 0})
            client.download(name, target, timeout=int(max(1, timeout)))
        except (TimeoutError, tftpy.TftpException, OSError) as exc:
            report(Step(f"TFTP {name} from {server}", False, time.monotonic() - started,
                        [str(exc)]))
            return 1
        took = time.monotonic() - started
        size = os.path.getsize(target)
        rate = size / took / 1e6 if took > 0 else 0.0
        report(Step(f"TFTP {name} from {server}", size > 0, took,
                    [f"{size} bytes, {rate:.1f} MB/s"]))
        return 0 if size > 0 else 1


def _http(url: str, timeout: float, report: Callable[[Step], None]) -> int:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # the operator's own server
            body = resp.read(1 << 20)
            status = resp.status
    except OSError as exc:
        report(Step(f"HTTP GET {url}", False, time.monotonic() - started, [str(exc)]))
        return 1
    took = time.monotonic() - started
    text = body.decode(errors="replace")
    lines = [f"{status}, {len(body)} bytes", *text.splitlines()[:12]]
    report(Step(f"HTTP GET {url}", status == 200, took, lines))
    return 0 if status == 200 else 1
