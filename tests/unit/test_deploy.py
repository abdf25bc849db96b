"""The ways bootd is run: the systemd unit and the Kubernetes manifests are checked by
the tools their users run them with."""

from __future__ import annotations

import os
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
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("**/*.yaml"))


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


def test_the_deployment_translates_to_podman_arguments(tmp_path: Path) -> None:
    """tests/e2e/pods.py: what the container test runs is what the manifest says."""
    from tests.e2e.pods import Manifests, PodRun

    if os.geteuid() != 0:
        pytest.skip("the Secret's files are given to group fsGroup as the kubelet does")
    manifests = Manifests.load()
    (tmp_path / "srv/bootd").mkdir(parents=True)  # the images hostPath (type Directory)
    pod = PodRun(manifests, "localhost/bootd:test", "ns1", tmp_path)
    args = pod.args(manifests.container, "bootd")
    text = " ".join(args)
    for expected in ("--network ns:/run/netns/ns1", "--user 10001:10001", "--group-add 10001",
                     "--read-only --read-only-tmpfs=false", "--cap-drop=ALL",
                     "--cap-add=NET_BIND_SERVICE", "--cap-add=NET_RAW", "--cap-add=NET_ADMIN",
                     f"--memory {256 << 20}", "--stop-timeout 45",
                     f"{tmp_path}/pod-volumes/config/bootd.yaml:/etc/bootd/bootd.yaml:ro",
                     f"{tmp_path}/var/lib/bootd:/var/lib/bootd"):
        assert expected in text, expected
    assert "no-new-privileges" not in text  # file capabilities need privilege escalation
    # the state hostPath is made as the kubelet makes it: root's, hence the init container
    state = tmp_path / "var/lib/bootd"
    assert state.stat().st_uid == 0 and state.stat().st_mode & 0o777 == 0o755
    (init,) = manifests.pod["initContainers"]
    init_args = " ".join(pod.args(init, "init"))
    assert "--user 0:" in init_args and "--cap-add=CHOWN" in init_args
    assert pod.command(init) == ["10001:10001", "/var/lib/bootd"]
    # the Secret's token: group fsGroup, readable by the group only (kubelet's ownership)
    token = tmp_path / "pod-volumes/join-token/token"
    assert token.stat().st_gid == 10001 and token.stat().st_mode & 0o777 == 0o440
    assert pod.host_path("/etc/bootd/secrets/token") == token
    assert pod.host_path("/opt/bootd") is None


def test_a_manifest_field_the_translation_does_not_know_fails(tmp_path: Path) -> None:
    from tests.e2e.pods import Manifests, PodRun, UnsupportedField

    if os.geteuid() != 0:
        pytest.skip("the Secret's files are given to group fsGroup as the kubelet does")
    manifests = Manifests.load()
    (tmp_path / "srv/bootd").mkdir(parents=True)
    pod = PodRun(manifests, "img", "ns1", tmp_path)
    container = {**manifests.container, "env": [{"name": "X", "value": "1"}]}
    with pytest.raises(UnsupportedField, match="env"):
        pod.args(container, "bootd")
    manifests.pod["hostPID"] = True
    try:
        with pytest.raises(UnsupportedField, match="hostPID"):
            PodRun(manifests, "img", "ns1", tmp_path)
    finally:
        del manifests.pod["hostPID"]


def test_the_ha_variant_gives_each_member_its_name_and_address(tmp_path: Path) -> None:
    """deploy/kubernetes/ha: one ConfigMap for every member; the DaemonSet's environment
    fills in what differs per host, and the config it makes is a valid cluster member's."""
    from bootd.fleet.config import ConfigError, load_config

    ha = ROOT / "deploy" / "kubernetes" / "ha"
    cm = next(d for d in yaml.safe_load_all((ha / "configmap.yaml").read_text())
              if d["kind"] == "ConfigMap")
    daemonset = next(yaml.safe_load_all((ha / "daemonset.yaml").read_text()))
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}
    path = tmp_path / "bootd.yaml"
    path.write_text(cm["data"]["bootd.yaml"])
    with pytest.raises(ConfigError) as missing:
        load_config(path, env={})
    assert "NODE_NAME is not set" in str(missing.value)
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (tmp_path / name).write_text("x")
    text = path.read_text().replace("/etc/bootd/etcd", str(tmp_path))
    path.write_text(text)
    config = load_config(path, env={"NODE_NAME": "cp2", "NODE_IP": "10.0.0.12"})
    assert config.cluster is not None and config.cluster.member == "cp2"
    assert str(config.server.address) == "10.0.0.12"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/etc/bootd/etcd" in mounts
