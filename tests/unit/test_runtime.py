"""Runtime.reload: valid configs apply to new requests, invalid ones change nothing."""

from __future__ import annotations

from pathlib import Path

from bootd.daemon import Runtime
from bootd.fleet.config import load_config
from bootd.ops.metrics import Metrics
from bootd.state.store import Store

BASE = """\
server: {{interfaces: [lo], address: 10.0.0.1, state_dir: {state}, http_port: {port}}}
network: {{subnet: 10.0.0.0/24}}
pools:
  - name: w
    nodes:
      - {{name: a, mac: "02:00:00:00:00:01", ip: 10.0.0.5}}
{extra}"""


def write(path: Path, tmp: Path, extra: str = "", port: int = 8080) -> None:
    path.write_text(BASE.format(state=tmp / "state", port=port, extra=extra))


def runtime(tmp: Path) -> tuple[Runtime, Path]:
    cfg = tmp / "bootd.yaml"
    write(cfg, tmp)
    config = load_config(cfg)
    return Runtime(cfg, config, Store.in_state_dir(tmp / "state"), Metrics()), cfg


def test_reload_adds_node_and_catch_all(tmp_path: Path) -> None:
    rt, cfg = runtime(tmp_path)
    assert rt.dhcp.ctx.inventory.resolve("02:00:00:00:00:02") is None
    write(cfg, tmp_path, extra='      - {name: b, mac: "02:00:00:00:00:02", ip: 10.0.0.6}\n'
          "  - name: any\n    dynamic: {range: 10.0.0.100-10.0.0.110}\n")
    result = rt.reload()
    assert result.ok and result.errors == [] and result.restart_required == []
    node = rt.dhcp.ctx.inventory.resolve("02:00:00:00:00:02")
    assert node is not None and node.name == "b"
    assert rt.dhcp.ctx.leases is not None
    assert rt.http.config is rt.config


def test_invalid_reload_keeps_running_config(tmp_path: Path) -> None:
    rt, cfg = runtime(tmp_path)
    before = rt.dhcp.ctx.inventory
    cfg.write_text(cfg.read_text().replace("10.0.0.5", "10.9.9.9"))
    result = rt.reload()
    assert not result.ok
    assert any("10.9.9.9 is outside network.subnet" in e for e in result.errors)
    assert rt.dhcp.ctx.inventory is before


def test_restart_only_settings_are_reported_and_kept(tmp_path: Path) -> None:
    rt, cfg = runtime(tmp_path)
    write(cfg, tmp_path, port=9090)
    result = rt.reload()
    assert result.ok and result.restart_required == ["server.http_port"]
    assert rt.config.server.http_port == 8080
    assert rt.http.url == "http://10.0.0.1:8080"
