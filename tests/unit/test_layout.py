"""The layout's rules, checked on the source: a protocol package never imports another
protocol's package; the fleet, state and ops rooms never import a protocol package (the
one exception: the config validates `dhcp_options:` against the DHCP option table)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bootd"
PROTOCOLS = ("dhcp", "tftp", "http")
NEUTRAL = ("fleet", "state", "ops", "power")
ALLOWED = {("fleet/config.py", "bootd.dhcp.options")}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {name for name in out if name.startswith("bootd")}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("room", PROTOCOLS + NEUTRAL)
def test_rooms_import_only_what_they_may(room: str) -> None:
    forbidden = set(PROTOCOLS) - {room} if room in PROTOCOLS else set(PROTOCOLS)
    forbidden |= {"runtime", "daemon", "cli", "lab"}
    offences = []
    for path in sorted((PACKAGE / room).rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for module in imports(path):
            if room_of(module) in forbidden and (rel, module) not in ALLOWED:
                offences.append(f"{rel} imports {module}")
    assert offences == []


@pytest.mark.parametrize("module", ["bootd.http.boot", "bootd.http.admin",
                                    "bootd.tftp.server", "bootd.dhcp.service"])
def test_no_protocol_loads_another_even_indirectly(module: str) -> None:
    own = module.split(".")[1]
    code = (f"import sys, {module}; print(' '.join(m for m in sys.modules "
            "if m.startswith('bootd.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    others = [m for m in loaded if room_of(m) in PROTOCOLS and room_of(m) != own
              and m not in ("bootd.dhcp", "bootd.dhcp.options")]
    assert others == []
