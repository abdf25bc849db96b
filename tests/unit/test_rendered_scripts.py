"""Everything rendered for the example configs: golden files, sh -n and shellcheck."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bootd.fleet.config import load_config
from bootd.fleet.images import BootImage
from bootd.fleet.inventory import Inventory
from bootd.fleet.render import (
    cloud_meta_data,
    cloud_network_config,
    cloud_user_data,
    grub_config,
    ipxe_node,
    join_script,
)

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
URL = "http://10.0.0.1:8080"
TOKEN = "abcdef.0123456789abcdef"
PEERS = ("http://10.0.0.3:8080", "http://10.0.0.2:8080")


def rendered() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("generic", "catch-all"):
        config = load_config(ROOT / "config" / f"{name}.yaml")
        inv = Inventory(config)
        nodes = list(inv.nodes)
        if inv.catch_all is not None:
            unknown = inv.resolve("52:54:00:12:34:56")
            assert unknown is not None
            nodes.append(unknown)
        for node in nodes:
            mac = node.macs[0]
            assert node.image is not None
            image = BootImage(node.image, None, config.images[node.image])
            cluster = config.clusters[node.cluster] if node.cluster else None
            key = f"{name}-{node.name}"
            out[f"{key}.ipxe"] = ipxe_node(node, mac, image, URL, "0" * 64)
            out[f"{key}.grub.cfg"] = grub_config(node, mac, image, "10.0.0.1", 8080)
            out[f"{key}.join.sh"] = join_script(node, mac, URL, cluster, TOKEN)
            out[f"{key}.user-data"] = cloud_user_data(node, mac, URL, cluster, TOKEN,
                                                      config.network.domain)
            out[f"{key}.meta-data"] = cloud_meta_data(node, mac)
            out[f"{key}.network-config"] = cloud_network_config(node)
            if key == "generic-g1":  # cluster mode: the other members as fallbacks
                out[f"{key}-cluster.ipxe"] = ipxe_node(node, mac, image, URL, "0" * 64, PEERS)
                out[f"{key}-cluster.join.sh"] = join_script(node, mac, URL, cluster, TOKEN,
                                                            PEERS)
                # a managed image: every URL names the version
                managed = BootImage(node.image, "0123456789ab", image.files)
                out[f"{key}-version.ipxe"] = ipxe_node(node, mac, managed, URL, "0" * 64)
                out[f"{key}-version.grub.cfg"] = grub_config(node, mac, managed, "10.0.0.1",
                                                             8080)
    return out


CASES = rendered()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_golden(name: str) -> None:
    path = GOLDEN / name
    if os.environ.get("BOOTD_UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(CASES[name])
    assert path.exists(), f"no golden file {path}; run with BOOTD_UPDATE_GOLDEN=1"
    assert CASES[name] == path.read_text()


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.endswith(".sh")))
def test_join_scripts_pass_sh_n_and_shellcheck(name: str, tmp_path: Path) -> None:
    script = tmp_path / name
    script.write_text(CASES[name])
    syntax = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (scripts/install-deps installs it)")
    lint = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True,
                          text=True)
    assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.endswith(".user-data")))
def test_user_data_passes_cloud_init_schema(name: str, tmp_path: Path) -> None:
    text = CASES[name]
    assert text.startswith("#cloud-config\n")
    data = yaml.safe_load(text)
    assert data["runcmd"] == [["sh", "/run/bootd/join.sh"]]
    join = next(f for f in data["write_files"] if f["path"] == "/run/bootd/join.sh")
    assert join["content"] == CASES[name.replace(".user-data", ".join.sh")]
    if shutil.which("cloud-init") is None:
        pytest.skip("cloud-init not installed (scripts/install-deps installs it)")
    path = tmp_path / "user-data"
    path.write_text(text)
    check = subprocess.run(["cloud-init", "schema", "--config-file", str(path)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "Valid cloud-config" in check.stdout, (
        check.stdout + check.stderr)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.endswith(".network-config")))
def test_network_config_v2_matches_every_mac(name: str) -> None:
    data = yaml.safe_load(CASES[name])
    assert data["version"] == 2
    assert all(e["dhcp4"] is True and "macaddress" in e["match"]
               for e in data["ethernets"].values())
