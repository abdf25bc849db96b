"""`bootd explain` and `bootd nodes`: answers from the config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bootd.cli.explain import explain
from bootd.cli.main import main
from bootd.fleet.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_explain_reserved_node_uefi() -> None:
    text = explain(load_config(ROOT / "config" / "generic.yaml"), "02:00:00:00:03:02",
                   "efi64")
    assert "node      g2" in text
    assert "merged    defaults < pool gpu < tag gpu < tag edge < node g2 < tag debug" in text
    assert "address 10.0.0.62, next-server 10.0.0.1, boot file ipxe.efi" in text  # pool override
    assert "53 message-type           OFFER" in text
    assert "debug loglevel=7 bootd.url=http://10.0.0.1:8080 bootd.node=g2" in text
    assert "<token: served only to the node>" in text
    assert "nvidia.com/gpu=present:NoSchedule" in text


def test_explain_ipxe_and_catch_all() -> None:
    config = load_config(ROOT / "config" / "catch-all.yaml")
    text = explain(config, "52:54:00:aa:bb:cc", "bios", ipxe=True)
    assert "node-52-54-00-aa-bb-cc (catch-all: name from the MAC)" in text
    assert "boot file http://10.0.0.1:8080/boot.ipxe" in text
    assert "first free in the catch-all range" in text


def test_explain_unknown_mac() -> None:
    text = explain(load_config(ROOT / "config" / "generic.yaml"), "52:54:00:aa:bb:cc")
    assert "does not answer" in text


def test_explain_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "-c", str(ROOT / "config" / "generic.yaml"), "0200.0000.0127",
                 "--arch", "http"]) == 0
    out = capsys.readouterr().out
    assert "http://10.0.0.1:8080/boot/snponly.efi" in out and "HTTPClient" in out
    assert main(["explain", "-c", str(ROOT / "config" / "generic.yaml"), "nope"]) == 2


def test_nodes_cli_without_daemon(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text((ROOT / "config" / "generic.yaml").read_text().replace(
        "state_dir: /var/lib/bootd", f"state_dir: {tmp_path}"))
    assert main(["nodes", "-c", str(cfg), "--api", str(tmp_path / "none.sock"),
                 "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["node"] for r in rows] == ["m1c27", "m1c43", "m1c44", "g1", "g2"]
    assert rows[0]["macs"] == ["02:00:00:00:01:27", "02:00:00:00:02:27"]
    assert all(r["seen"] == "never" for r in rows)
