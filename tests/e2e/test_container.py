"""bootd's container image, built here and run as deploy/kubernetes/ says (tests/e2e/pods.py
derives every podman argument from the Deployment): a QEMU VM PXE boots from the
containerized bootd to `joined`, the probes answer, SIGTERM drains and exits 0, and a
recreated pod keeps its leases and boot events.

The image is built by scripts/build-image with a local mmdebstrap base (no registry is
reachable here); podman's storage keeps the base and the layers, so a rerun rebuilds only
what changed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bootd.lab.netlab import NetLab
from bootd.lab.vms import VmLab, build_test_image, missing_for_vms
from tests.e2e.pods import ROOT, Manifests, PodRun, lab_config, podman, podman_env, stage_host
from tests.e2e.vms import last_attempt_steps, wait_joined

pytestmark = pytest.mark.netns

MANIFESTS = Manifests.load()
# The ConfigMap's reserved worker: the VM plays it.
WORKER_MAC, WORKER = "02:00:00:00:01:27", "m1c27"
VERSION = next(line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
               if line.startswith("version = "))


def missing_for_containers() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("podman", "runc", "mmdebstrap", "curl", "udhcpc"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"needs {tool} (scripts/install-deps installs it)"
    return missing_for_vms(uefi=True)


@pytest.fixture(scope="module")
def image() -> str:
    if (why := missing_for_containers()) is not None:
        pytest.skip(why)
    # the manifest names the release this checkout builds; the local build gets that tag
    images = {c["image"] for c in MANIFESTS.pod["containers"] + MANIFESTS.pod["initContainers"]}
    (manifest_image,) = images
    tag = manifest_image.rsplit(":", 1)[1]
    assert tag == VERSION, f"deployment.yaml runs {tag}, pyproject.toml is {VERSION}"
    name = f"localhost/bootd:{tag}"
    built = subprocess.run([str(ROOT / "scripts" / "build-image"), "--local-base",
                            "-t", name], capture_output=True, text=True, timeout=1200,
                           env=podman_env(), check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    return name


def run_in_image(image: str, *cmd: str) -> str:
    """`cmd` in a throw-away container of the image, with the manifest's capabilities (the
    interpreter does not start without them) and no network."""
    caps = MANIFESTS.container["securityContext"]["capabilities"]["add"]
    out = podman("run", "--rm", "--network", "none", *[f"--cap-add={c}" for c in caps],
                 "--entrypoint", cmd[0], image, *cmd[1:])
    return out.stdout


def test_image_holds_bootd_and_the_boot_binaries_and_nothing_to_build_with(image: str,
                                                                           ) -> None:
    config = podman("image", "inspect", "--format",
                    "{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}",
                    image).stdout.strip().split("|")
    assert config[0] == "10001:10001"
    assert yaml.safe_load(config[1]) == ["/opt/bootd/bin/bootd"]
    assert yaml.safe_load(config[2]) == MANIFESTS.container["args"]
    assert run_in_image(image, "/opt/bootd/bin/bootd", "--version").strip() == \
        f"bootd {VERSION}"
    found = run_in_image(image, "sh", "-c",
                         "for f in /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/snponly.efi "
                         "/usr/lib/grub/x86_64-efi/linux.mod /usr/bin/grub-mknetdir "
                         "/usr/bin/gcc /usr/bin/cc /opt/bootd/bin/pip /usr/bin/setcap "
                         "/root/.cache /src; do [ -e $f ] && echo $f; done; "
                         "ls /var/lib/apt/lists /var/cache/apt/archives | grep -c deb || true")
    assert found.split() == ["/usr/lib/ipxe/undionly.kpxe", "/usr/lib/ipxe/snponly.efi",
                             "/usr/lib/grub/x86_64-efi/linux.mod", "/usr/bin/grub-mknetdir",
                             "0"]
    # the file capabilities: exactly the three the manifest adds, on bootd's interpreter
    raw = run_in_image(image, "/opt/bootd/bin/python3", "-c",
                       "import os; print(os.getxattr('/opt/bootd/bin/python3.11', "
                       "'security.capability').hex())")
    _magic, permitted = struct.unpack_from("<II", bytes.fromhex(raw.strip()))
    names = {10: "NET_BIND_SERVICE", 12: "NET_ADMIN", 13: "NET_RAW"}
    assert {names.get(bit, str(bit)) for bit in range(32) if permitted >> bit & 1} == \
        set(MANIFESTS.container["securityContext"]["capabilities"]["add"])
    system = run_in_image(image, "/opt/bootd/bin/python3", "-c",
                          "import os; print(os.listxattr('/usr/bin/python3.11'))")
    assert "security.capability" not in system


# sha256 of every file of a bootd package tree but its bytecode, by relative path
TREE_DIGEST = """
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for top, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for name in files:
        path = os.path.join(top, name)
        with open(path, "rb") as f:
            out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
print(json.dumps(out))
"""


def test_image_holds_this_checkouts_bootd(image: str) -> None:
    """A rebuild after a source edit must not keep the old bootd (a layer cache keyed on
    anything but the source's content would)."""
    inside = json.loads(run_in_image(image, "/opt/bootd/bin/python3", "-c", TREE_DIGEST,
                                     "/opt/bootd/lib/python3.11/site-packages/bootd"))
    here = json.loads(subprocess.run([sys.executable, "-c", TREE_DIGEST, str(ROOT / "bootd")],
                                     capture_output=True, text=True, check=True).stdout)
    assert {p for p in here if p.endswith(".py")} <= set(inside)
    assert inside == {p: here.get(p) for p in inside}


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return stage_host(tmp_path / "host", build_test_image())


@pytest.fixture
def pod_lab(image: str, host: Path, tmp_path: Path) -> Iterator[tuple[VmLab, PodRun]]:
    config, interface, cidr = lab_config(MANIFESTS)
    assert interface == "br0"  # VmLab's bridge
    with NetLab("bdpod") as lab:
        vmlab = VmLab(lab, tmp_path, None, cidr)
        pod = PodRun(MANIFESTS, image, vmlab.ns, host, config_text=config)
        vmlab.status_command = ["podman", "exec", pod.name, "/opt/bootd/bin/bootd",
                                "status", "-c", "/etc/bootd/bootd.yaml"]
        try:
            yield vmlab, pod
        finally:
            pod.remove()


class Client:
    """busybox udhcpc on a cable to the boot network's bridge."""

    def __init__(self, vmlab: VmLab) -> None:
        self.lab, self.tmp = vmlab.lab, vmlab.tmp
        self.ns = vmlab.lab.namespace("cli")
        vmlab.lab.veth(self.ns, "cli0", vmlab.ns, "cli0p")
        vmlab.lab.attach(vmlab.ns, "cli0p", "br0")

    def lease(self, mac: str) -> str | None:
        self.lab.set_mac(self.ns, "cli0", mac)
        out = self.tmp / f"udhcpc-{time.monotonic_ns()}.env"
        script = self.tmp / "udhcpc.sh"
        script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && echo "$ip" > {out}\nexit 0\n')
        script.chmod(0o755)
        self.lab.run(self.ns, ["udhcpc", "-i", "cli0", "-f", "-q", "-n", "-t", "5", "-T",
                               "1", "-A", "1", "-s", str(script)], check=False, timeout=30)
        return out.read_text().strip() if out.exists() else None


def test_the_deployment_pxe_boots_a_vm_and_a_recreated_pod_keeps_its_state(
        pod_lab: tuple[VmLab, PodRun]) -> None:
    vmlab, pod = pod_lab
    pod.start()
    pod.wait_ready()
    for kind, url in pod.probe_urls().items():
        assert pod.probe_from_namespace(url) == 200, kind
        assert pod.probe_from_container(url) == 200, kind

    # UEFI: OVMF's own PXE fetches the image's snponly.efi over TFTP, then iPXE goes on
    vmlab.start_vm(WORKER_MAC, uefi=True)
    wait_joined(vmlab, WORKER_MAC, timeout=300)
    detail = vmlab.status(WORKER)
    assert detail["stage"] == "joined" and detail["ip"] == "10.0.0.27"
    steps = last_attempt_steps(detail)
    seen = [s["stage"] for s in steps]
    assert next(s["detail"]["file"] for s in steps if s["stage"] == "tftp") == "snponly.efi"
    for stage in ("dhcp-ack", "ipxe-script", "kernel", "initrd", "rootfs",
                  "join-script", "kubeadm", "joined"):
        assert stage in seen, (stage, seen)
    # the join token is the Secret's, read from where the manifest mounts it
    token = MANIFESTS.secrets["bootd-join-token"]["stringData"]["token"]
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    assert any(f"--token token-sha256:{digest}" in str(s["detail"]) for s in steps
               if s["stage"] == "kubeadm")
    assert token not in pod.logs()

    client = Client(vmlab)
    first = client.lease("02:00:00:00:0a:01")
    assert first is not None and ipaddress.ip_address(first) in \
        ipaddress.ip_network("10.0.0.0/24")

    # SIGTERM drains and exits 0, well inside the grace period
    code, took = pod.stop()
    assert code == 0, pod.logs()[-2000:]
    assert took < MANIFESTS.pod["terminationGracePeriodSeconds"]
    assert '"bootd draining"' in pod.logs() and '"bootd stopped"' in pod.logs()

    # a new pod on the same host: the leases and the boot events are still there
    pod.start()
    pod.wait_ready()
    assert json.loads(next(line for line in pod.logs().splitlines()
                           if '"leases restored"' in line))["count"] == 1
    again = vmlab.status(WORKER)
    assert again["stage"] == "joined"
    assert last_attempt_steps(again) == steps
    assert client.lease("02:00:00:00:0a:02") not in (None, first)  # first is still held
    assert client.lease("02:00:00:00:0a:01") == first
    code, _ = pod.stop()
    assert code == 0
