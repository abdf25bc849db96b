"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    img = tmp_path / "img"
    img.mkdir()
    (img / "vmlinuz").write_bytes(os.urandom(300_000))
    (img / "initrd.img").write_bytes(os.urandom(100_000))
    (img / "rootfs").write_bytes(os.urandom(2_000_000))
    root = tmp_path / "tftp"
    root.mkdir()
    (root / "snponly.efi").write_bytes(b"EFI")
    (tmp_path / "secret").write_text("SECRET")
    return tmp_path
