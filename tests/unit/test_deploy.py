"""The ways bootd is run: the systemd unit and the Kubernetes manifests are checked by
the tools their users run them with."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bootd.fleet.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "bootd.service"
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's bootd, so that verify can
    check the binary exists."""
    bootd = Path(sys.executable).with_name("bootd")
    if not bootd.exists():
        found = shutil.which("bootd")
        if found is None:
            pytest.skip("bootd console script not installed")
        bootd = Path(found)
    unit = tmp_path / "bootd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/bootd", str(bootd)))
    return unit


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(["systemd-analyze", "verify", str(local_unit(tmp_path))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes",
                             str(local_unit(tmp_path))], capture_output=True, text=True)
    match = re.search(r"Overall exposure level for bootd.service: ([\d.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 2.0  # systemd rates 0-10; "OK" is below 3


def test_unit_settings() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "DynamicUser=yes",
                 "StateDirectory=bootd", "RuntimeDirectory=bootd", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_RAW CAP_NET_ADMIN"):
        assert line in text


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_kubernetes_schemas(path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_manifests_pass_yamllint() -> None:
    if shutil.which("yamllint") is None and not Path(sys.executable).with_name(
            "yamllint").exists():
        pytest.skip("yamllint not installed")
    exe = shutil.which("yamllint") or str(Path(sys.executable).with_name("yamllint"))
    result = subprocess.run([exe, "-s", "-c", str(ROOT / ".yamllint"),
                             str(ROOT / "deploy" / "kubernetes")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout


def test_configmap_holds_a_valid_bootd_config() -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    config = parse_config(cm["data"]["bootd.yaml"], "configmap.yaml")
    assert config.server.api == "127.0.0.1:9090"
    deployment = next(d for d in yaml.safe_load_all(
        (ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
        if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    probe = spec["containers"][0]["readinessProbe"]["httpGet"]
    assert (probe["host"], probe["port"], probe["path"]) == ("127.0.0.1", 9090, "/healthz")
    token = config.clusters["prod"].token.file
    mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    assert token is not None and str(token.parent) in mounts
