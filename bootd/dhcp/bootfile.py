"""Which boot program a client gets, from what its firmware says it is.

RFC 4578 option 93 (or the `PXEClient:Arch:NNNNN` vendor class) names the firmware; user
class `iPXE` (or iPXE's option 175) says iPXE is already running, so it gets the HTTP
script instead of iPXE again, which would loop forever.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from bootd.dhcp.options import IPXE_NO_PXEDHCP, PXE_DISCOVERY_CONTROL, Opt
from bootd.dhcp.packet import DhcpPacket, encode_sub_options
from bootd.fleet.inventory import BootFiles


class Firmware(StrEnum):
    BIOS = "bios"
    EFI32 = "efi32"
    EFI64 = "efi64"
    ARM64 = "arm64"
    IPXE = "ipxe"


# RFC 4578 / IANA "Processor Architecture Types": code -> (firmware, HTTP boot?)
ARCHITECTURES: dict[int, tuple[Firmware, bool]] = {
    0: (Firmware.BIOS, False),
    6: (Firmware.EFI32, False),
    7: (Firmware.EFI64, False),  # EFI BC: x86-64 in every firmware seen in practice
    9: (Firmware.EFI64, False),
    11: (Firmware.ARM64, False),
    15: (Firmware.EFI32, True),
    16: (Firmware.EFI64, True),
    19: (Firmware.ARM64, True),
}

_VENDOR_ARCH = re.compile(r"^(PXEClient|HTTPClient):Arch:(\d{5})")


@dataclass(frozen=True)
class BootAnswer:
    firmware: Firmware
    arch: int | None
    bootfile: str  # a TFTP path, or an http:// URL for iPXE and UEFI HTTP boot
    options: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True)
class Unsupported:
    arch: int
    reason: str


def client_arch(req: DhcpPacket) -> int | None:
    arch = req.client_arch
    if arch is not None:
        return arch
    m = _VENDOR_ARCH.match(req.vendor_class)
    return int(m.group(2)) if m else None


def is_boot_client(req: DhcpPacket) -> bool:
    """Firmware or iPXE, as opposed to an installed OS renewing its address."""
    vc = req.vendor_class
    return (req.is_ipxe or Opt.CLIENT_ARCH in req.options
            or vc.startswith("PXEClient") or vc.startswith("HTTPClient"))


def boot_answer(req: DhcpPacket, files: BootFiles, server: str, http_port: int,
                ) -> BootAnswer | Unsupported | None:
    """The boot file and boot options for this request; None for a non-booting client."""
    if not is_boot_client(req):
        return None
    arch = client_arch(req)
    base_url = f"http://{server}:{http_port}"
    if req.is_ipxe:
        script = files.ipxe_script or f"{base_url}/boot.ipxe"
        no_pxedhcp = encode_sub_options([(IPXE_NO_PXEDHCP, b"\x01")], terminate=False)
        return BootAnswer(Firmware.IPXE, arch, script, ((Opt.IPXE_ENCAP, no_pxedhcp),))
    if arch is None:
        arch = 0  # PXEClient without option 93: legacy BIOS PXE ROMs
    known = ARCHITECTURES.get(arch)
    if known is None:
        return Unsupported(arch, f"no iPXE build is configured for client architecture {arch}")
    firmware, http_boot = known
    program: str = getattr(files, firmware.value)
    if http_boot:
        return BootAnswer(firmware, arch, f"{base_url}/boot/{program}",
                          ((Opt.VENDOR_CLASS, b"HTTPClient"),))
    options: list[tuple[int, bytes]] = []
    if req.vendor_class.startswith("PXEClient"):
        # PXE spec: echo "PXEClient" and tell the ROM to boot the file without discovery
        # or a proxyDHCP wait (discovery control bit 3).
        options.append((Opt.VENDOR_CLASS, b"PXEClient"))
        options.append((Opt.VENDOR_SPECIFIC,
                        encode_sub_options([(PXE_DISCOVERY_CONTROL, b"\x08")])))
    options.append((Opt.TFTP_SERVER_NAME, server.encode()))
    return BootAnswer(firmware, arch, program, tuple(options))
