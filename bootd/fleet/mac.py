"""MAC address spellings: operators paste them from switches, BMCs and `ip link` alike."""

from __future__ import annotations

import functools
import re

_HEX12 = re.compile(r"^[0-9a-f]{12}$")
_SEPARATED = re.compile(r"^[0-9a-f]{1,2}([:-])(?:[0-9a-f]{1,2}\1){4}[0-9a-f]{1,2}$")
_CISCO = re.compile(r"^[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}$")


# Every request naming a node parses its MAC (a URL, an event, a status query): the
# answers for the last few thousand spellings are kept (bounded: anyone may invent MACs).
@functools.lru_cache(maxsize=4096)
def normalize_mac(text: str) -> str:
    """Return the canonical `aa:bb:cc:dd:ee:ff` form, or raise ValueError.

    Accepted: `aa:bb:cc:dd:ee:ff`, `AA-BB-CC-DD-EE-FF`, `aabb.ccdd.eeff` and bare 12 hex digits.
    """
    s = text.strip().lower()
    if _SEPARATED.match(s):
        parts = re.split(r"[:-]", s)
        hex12 = "".join(p.zfill(2) for p in parts)
    elif _CISCO.match(s):
        hex12 = s.replace(".", "")
    elif _HEX12.match(s):
        hex12 = s
    else:
        raise ValueError(
            f"malformed MAC address {text!r} "
            "(expected aa:bb:cc:dd:ee:ff, AA-BB-CC-DD-EE-FF or aabb.ccdd.eeff)"
        )
    return ":".join(hex12[i : i + 2] for i in range(0, 12, 2))


def mac_from_bytes(raw: bytes) -> str:
    """Canonical text of a 6-byte hardware address."""
    if len(raw) != 6:
        raise ValueError(f"hardware address must be 6 bytes, got {len(raw)}")
    return raw.hex(":")


def mac_to_bytes(mac: str) -> bytes:
    return bytes.fromhex(normalize_mac(mac).replace(":", ""))


def mac_dashed(mac: str) -> str:
    """`aa-bb-cc-dd-ee-ff`: the form usable inside host names and file names."""
    return normalize_mac(mac).replace(":", "-")
