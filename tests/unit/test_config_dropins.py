"""Drop-in config files (`bootd.yaml.d/*.yaml`): nodes added to the config's pools, as
`bootd promote` writes them, checked as one config with each problem at its own file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bootd.fleet.config import ConfigError, load_config
from bootd.fleet.inventory import Inventory

MAIN = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1}
    network: {subnet: 10.0.0.0/24}
    pools:
      - name: w
        nodes:
          - {name: n1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}
      - name: any
        dynamic: {range: 10.0.0.100-10.0.0.110}
    """)


def write(tmp: Path, dropins: dict[str, str]) -> Path:
    config = tmp / "bootd.yaml"
    config.write_text(MAIN)
    (tmp / "bootd.yaml.d").mkdir()
    for name, text in dropins.items():
        (tmp / "bootd.yaml.d" / name).write_text(textwrap.dedent(text))
    return config


def test_dropin_nodes_join_their_pools(tmp_path: Path) -> None:
    config = write(tmp_path, {
        "promoted-a.yaml": 'nodes: [{pool: w, name: a, mac: "52:54:00:00:00:0a", '
                           'ip: 10.0.0.6}]\n',
        "promoted-b.yaml": 'nodes: [{pool: w, name: b, mac: "52:54:00:00:00:0b", '
                           'ip: 10.0.0.7, tags: []}]\n',
        "notes.txt": "not yaml, not read\n"})
    inventory = Inventory(load_config(config))
    assert [n.name for n in inventory.nodes] == ["n1", "a", "b"]
    node = inventory.reserved("52:54:00:00:00:0a")
    assert node is not None and node.pool == "w" and str(node.ip) == "10.0.0.6"


@pytest.mark.parametrize("text,where", [
    ('nodes: [{pool: nope, name: a, mac: "52:54:00:00:00:0a", ip: 10.0.0.6}]\n',
     "x.yaml:1: nodes.0.pool: no pool named 'nope' in the config"),
    ('nodes:\n  - {pool: w, name: a, mac: "52:54:00:00:00:0a",\n     ip: 10.0.0.5}\n',
     "x.yaml:3: nodes.0.ip: "),  # n1's address: the cross-check names the drop-in's line
    ('nodes:\n  - pool: w\n    name: a\n    mac: "zz"\n    ip: 10.0.0.6\n',
     "x.yaml:4: nodes.0.mac: "),
    ("pools: []\n", "x.yaml:1: (top): a drop-in holds only `nodes:`"),
])
def test_dropin_problems_are_reported_at_their_own_line(tmp_path: Path, text: str,
                                                        where: str) -> None:
    config = write(tmp_path, {"x.yaml": text})
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    shown = [str(issue) for issue in caught.value.issues]
    assert any(where in line and line.startswith(str(tmp_path / "bootd.yaml.d"))
               for line in shown), shown
