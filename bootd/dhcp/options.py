"""DHCP option codes (RFC 2132 and friends) and typed encoding of operator-supplied options.

Operators write `dhcp_options: {"42": "10.0.0.1"}` or `{ntp-servers: [10.0.0.1]}` in the
config; this module turns that into wire bytes once, at load time, so a typo is a config
error with a line number rather than a malformed packet at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import struct
from enum import IntEnum
from typing import Literal

PAD = 0
END = 255


class Opt(IntEnum):
    SUBNET_MASK = 1
    TIME_OFFSET = 2
    ROUTER = 3
    TIME_SERVER = 4
    DNS = 6
    LOG_SERVER = 7
    HOSTNAME = 12
    BOOT_FILE_SIZE = 13
    DOMAIN_NAME = 15
    ROOT_PATH = 17
    INTERFACE_MTU = 26
    BROADCAST = 28
    STATIC_ROUTE = 33
    NIS_DOMAIN = 40
    NTP_SERVERS = 42
    VENDOR_SPECIFIC = 43
    NETBIOS_NS = 44
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER_NAME = 66
    BOOTFILE_NAME = 67
    USER_CLASS = 77
    RELAY_AGENT_INFO = 82
    CLIENT_FQDN = 81
    CLIENT_ARCH = 93
    CLIENT_NDI = 94
    CLIENT_UUID = 97
    DOMAIN_SEARCH = 119
    CLASSLESS_ROUTE = 121
    TFTP_SERVER_ADDRESS = 150
    IPXE_ENCAP = 175


# iPXE's encapsulated settings (inside option 175); see ipxe src/include/ipxe/dhcp.h
IPXE_NO_PXEDHCP = 176
# PXE vendor sub-options inside option 43 (PXE spec 2.1, table 2-1)
PXE_DISCOVERY_CONTROL = 6

# Options the protocol itself manages; an operator may not override them.
RESERVED_OPTIONS = frozenset(
    {PAD, END, Opt.REQUESTED_IP, Opt.LEASE_TIME, Opt.OVERLOAD, Opt.MESSAGE_TYPE, Opt.SERVER_ID,
     Opt.PARAMETER_REQUEST_LIST, Opt.MAX_MESSAGE_SIZE, Opt.RENEWAL_TIME, Opt.REBINDING_TIME,
     Opt.CLIENT_ID, Opt.RELAY_AGENT_INFO}
)

Kind = Literal["ip", "ips", "u8", "u16", "u32", "s32", "text", "bool", "domains", "raw"]

# Value types of the options an operator is likely to set by hand.
OPTION_KINDS: dict[int, Kind] = {
    1: "ip", 2: "s32", 3: "ips", 4: "ips", 5: "ips", 6: "ips", 7: "ips", 9: "ips",
    12: "text", 13: "u16", 14: "text", 15: "text", 16: "ip", 17: "text", 18: "text",
    19: "bool", 23: "u8", 26: "u16", 28: "ip", 31: "bool", 35: "u32", 37: "u8", 40: "text",
    41: "ips", 42: "ips", 44: "ips", 45: "ips", 46: "u8", 47: "text", 64: "text", 65: "ips",
    66: "text", 67: "text", 69: "ips", 70: "ips", 72: "ips", 100: "text", 101: "text",
    119: "domains", 150: "ips", 209: "text", 210: "text", 211: "u32", 252: "text",
}

OPTION_NAMES: dict[str, int] = {
    "subnet-mask": 1, "time-offset": 2, "router": 3, "time-server": 4, "dns-server": 6,
    "log-server": 7, "hostname": 12, "boot-file-size": 13, "domain-name": 15, "root-path": 17,
    "extensions-path": 18, "ip-forwarding": 19, "default-ttl": 23, "mtu": 26,
    "broadcast": 28, "router-discovery": 31, "arp-timeout": 35, "tcp-ttl": 37,
    "nis-domain": 40, "nis-server": 41, "ntp-server": 42, "ntp-servers": 42,
    "vendor-encap": 43, "netbios-ns": 44, "netbios-dd": 45, "netbios-nodetype": 46,
    "netbios-scope": 47, "tftp-server": 66, "bootfile-name": 67, "smtp-server": 69,
    "pop3-server": 70, "www-server": 72, "tzdb-posix": 100, "tzdb-name": 101,
    "domain-search": 119, "tftp-server-address": 150, "pxelinux-configfile": 209,
    "pxelinux-pathprefix": 210, "pxelinux-reboottime": 211, "wpad": 252,
}

OptionValue = str | int | bool | list[str] | list[int]


def option_code(key: str | int) -> int:
    """Resolve `"42"`, `42`, `"0x2a"` or `"ntp-servers"` to an option code."""
    if isinstance(key, bool):
        raise ValueError(f"option key must be a number or name, not {key!r}")
    if isinstance(key, int):
        code = key
    else:
        k = key.strip().lower()
        if k in OPTION_NAMES:
            code = OPTION_NAMES[k]
        else:
            try:
                code = int(k, 0)
            except ValueError:
                raise ValueError(f"unknown DHCP option name {key!r}") from None
    if not 1 <= code <= 254:
        raise ValueError(f"DHCP option code {code} outside 1..254")
    if code in RESERVED_OPTIONS:
        raise ValueError(f"DHCP option {code} is managed by bootd and cannot be set")
    return code


def _as_list(value: OptionValue) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _encode_domains(names: list[str]) -> bytes:
    out = bytearray()
    for name in names:
        for label in name.rstrip(".").split("."):
            raw = label.encode("ascii")
            if not 0 < len(raw) < 64:
                raise ValueError(f"bad domain label in {name!r}")
            out += bytes([len(raw)]) + raw
        out += b"\x00"
    return bytes(out)


def encode_option_value(code: int, value: OptionValue) -> bytes:
    """Wire bytes for one operator option. `hex:` prefix gives raw bytes for any code."""
    if isinstance(value, str) and value.startswith("hex:"):
        try:
            return bytes.fromhex(value[4:].replace(":", ""))
        except ValueError:
            raise ValueError(f"bad hex string {value!r}") from None
    kind = OPTION_KINDS.get(code, "text")
    try:
        if kind == "ip":
            return ipaddress.IPv4Address(str(value).strip()).packed
        if kind == "ips":
            items = _as_list(value)
            if not items:
                raise ValueError("needs at least one address")
            return b"".join(ipaddress.IPv4Address(v).packed for v in items)
        if kind == "bool":
            if isinstance(value, bool):
                return bytes([int(value)])
            if str(value).lower() in ("1", "true", "yes", "on"):
                return b"\x01"
            if str(value).lower() in ("0", "false", "no", "off"):
                return b"\x00"
            raise ValueError(f"expected a boolean, got {value!r}")
        if kind in ("u8", "u16", "u32", "s32"):
            if isinstance(value, bool | list):
                raise ValueError(f"expected an integer, got {value!r}")
            n = int(value)
            fmt = {"u8": "!B", "u16": "!H", "u32": "!I", "s32": "!i"}[kind]
            return struct.pack(fmt, n)
        if kind == "domains":
            return _encode_domains(_as_list(value))
    except (ValueError, struct.error, ipaddress.AddressValueError) as exc:
        raise ValueError(f"option {code}: {exc}") from None
    if isinstance(value, list):
        raise ValueError(f"option {code} takes a single text value")
    raw = str(value).encode("utf-8")
    if not raw:
        raise ValueError(f"option {code}: empty value")
    return raw
