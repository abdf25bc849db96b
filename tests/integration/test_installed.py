"""bootd as a user gets it: `pip install .` (not editable) into a fresh venv outside the
source tree. Product commands must work from there alone: the demo finds its image recipe
as package data, and `bootd probe` has its clients (scapy, tftpy) as dependencies."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin/ directory of a venv with bootd installed from a wheel of this tree."""
    tmp = tmp_path_factory.mktemp("installed")
    wheels, venv = tmp / "wheels", tmp / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=300, cwd=tmp)
    (wheel,) = wheels.glob("bootd-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True,
                   timeout=600, cwd=tmp)
    yield venv / "bin"


def run(bin_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    # cwd outside the tree and no PYTHONPATH: only the installed package can be imported
    return subprocess.run([str(bin_dir / "bootd"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=bin_dir.parent,
                          env={"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"})


def test_installed_package_is_not_the_source_tree(installed: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import bootd, importlib.resources as r; print(bootd.__file__); "
                            "print(r.files('bootd.lab') / 'testimage' / 'build.sh')"],
                           capture_output=True, text=True, check=True,
                           cwd=installed.parent).stdout.split()
    assert not Path(where[0]).is_relative_to(ROOT)
    assert Path(where[1]).is_file() and not Path(where[1]).is_relative_to(ROOT)


def test_installed_package_carries_the_status_page(installed: Path) -> None:
    """The page's templates, script and style are package data: the page renders from the
    wheel alone (a missing file would be a 500 in production, not in the tests)."""
    code = ("import asyncio, bootd.http.page as p\n"
            "from importlib import resources\n"
            "print(all((resources.files('bootd.http') / 'static' / n).is_file()"
            " for n in p._STATIC))\n"
            "html = p._env.get_template('boot_times.html.j2').render(storm=None)\n"
            "print('No node has joined yet' in html)\n"
            "print(p.__file__)\n")
    out = subprocess.run([str(installed / "python"), "-c", code], capture_output=True,
                         text=True, check=True, cwd=installed.parent).stdout.split()
    assert out[:2] == ["True", "True"] and not Path(out[2]).is_relative_to(ROOT)


def test_probe_help_from_an_installed_wheel(installed: Path) -> None:
    proc = run(installed, "probe", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--interface" in proc.stdout
    imports = subprocess.run([str(installed / "python"), "-c", "import scapy, tftpy"],
                             capture_output=True, text=True, check=False)
    assert imports.returncode == 0, imports.stderr


@pytest.mark.netns
def test_lab_dhcp_only_from_an_installed_wheel(installed: Path) -> None:
    require("udhcpc")
    proc = run(installed, "lab", "--dhcp-only")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "worker-1" in proc.stdout and "(no answer)" not in proc.stdout
    assert "removed namespaces" in proc.stdout
