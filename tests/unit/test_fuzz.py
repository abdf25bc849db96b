"""A short, bounded run of bench/fuzz.py (coverage-guided, atheris): the DHCP service,
the TFTP request parser, the boot HTTP app's path and MAC parsing and the config loader
see mutated inputs and may only refuse them with their own errors. The long run (10^6
inputs per target) is `python bench/fuzz.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "bench" / "fuzz.py"

pytest.importorskip("atheris")


def fuzz(targets: str, runs: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FUZZ), "--targets", targets, "--runs",
                           str(runs), "--max-seconds", "120"], capture_output=True,
                          text=True, timeout=600, check=False)


def test_parsers_survive_mutated_inputs() -> None:
    for targets, runs in (("dhcp,tftp,http", 5000), ("config", 1000)):
        proc = fuzz(targets, runs)
        assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
        results = json.loads(proc.stdout.splitlines()[-1])
        for target in targets.split(","):
            assert results[target] == {**results[target], "inputs": runs, "crash": False}


def test_a_crash_is_reported() -> None:
    """The harness can fail: a planted crash makes it exit 1 and say so."""
    proc = fuzz("selfcheck", 1000)
    assert proc.returncode == 1
    assert "selfcheck" in proc.stdout and "CRASH" in proc.stdout
