"""The CLI as an operator meets it: exit codes and messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootd.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_check_ok_prints_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(ROOT / "config" / "catch-all.yaml")]) == 0
    out = capsys.readouterr().out
    assert ": OK" in out
    assert "pools    2: control (1 nodes), catch-all (0 nodes, catch-all)" in out
    assert "dynamic  10.0.0.100-10.0.0.199 (100 addresses)" in out


def test_check_errors_exit_1_with_file_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  interfaces: [br0]\n  address: 10.0.0.1\nnetwork:\n"
                   "  subnet: 10.0.0.0/24\npools:\n  - name: p\n    nodes:\n"
                   "      - {name: a, mac: nope, ip: 10.0.0.5}\n")
    assert main(["check", "-c", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:9: pools.0.nodes.0.mac: malformed MAC address 'nope'" in err
    assert "1 error(s)" in err


def test_serve_with_bad_config_exits_1(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "-c", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_serve_with_unusable_state_dir_exits_1(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{interfaces: [lo], address: 10.0.0.1, state_dir: "
                   f"{tmp_path / 'file' / 'state'}}}\nnetwork: {{subnet: 10.0.0.0/24}}\n")
    assert main(["serve", "-c", str(cfg)]) == 1
    assert "cannot open state database" in capsys.readouterr().err


def test_serve_on_missing_interface_exits_1(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"server: {{interfaces: [nosuchif0], address: 10.0.0.1, dhcp_port: 6767, "
                   f"state_dir: {tmp_path / 'state'}}}\nnetwork: {{subnet: 10.0.0.0/24}}\n")
    assert main(["serve", "-c", str(cfg), "--log-format", "json"]) == 1
    assert "cannot listen for DHCP on nosuchif0:6767" in capsys.readouterr().err


def test_probe_without_its_client_libraries_says_so_in_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tftpy", None)  # as if it were not installed
    assert main(["probe", "-i", "lo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot import tftpy" in err and "Traceback" not in err
