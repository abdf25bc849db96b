"""Text shown to an operator: what came from a node made safe, and times made short."""

from __future__ import annotations

import re

# C0 and C1 controls and DEL: a node's message must not drive the operator's terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """Text from a node or the network, safe to print: controls shown as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    return duration(max(0.0, now - ts)) + " ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"
