"""The production image (images/build-production-image.sh), built here and PXE booted.

Two images are built with mmdebstrap from Debian's packages (cloud kernel, to keep them
small): one plain, as this machine kind builds it without the Kubernetes repository, and
one with --kubernetes-repo pointed at a fake signed repository on loopback whose kubeadm
is the test double (tests/e2e/fake_kubernetes_repo.py). Both boot in QEMU through iPXE (the
first from SeaBIOS, the second from OVMF's native PXE and snponly.efi):
initramfs-tools' `boot=bootd` script fetches and checks the squashfs, systemd starts
containerd, networkd, sshd and bootd-join.service, which runs the node's join.sh. Then
the test logs in over SSH with the key bootd's config gave the node.

BOOTD_E2E_PRODUCTION_IMAGES=DIR reuses DIR/plain and DIR/kubernetes when they exist (and
builds them there otherwise), for quicker reruns while working on the tests.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.lab.netlab import NetLab
from bootd.lab.vms import VmLab, missing_for_vms
from tests.e2e import fake_kubernetes_repo
from tests.e2e.vms import last_attempt_steps, wait_finished

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "images" / "build-production-image.sh"
SERVER = "10.252.0.1"
TOKEN = "abcdef.0123456789abcdef"
CA_HASH = "sha256:" + "e" * 64
K8S_MAC, PLAIN_MAC = "52:54:00:12:35:01", "52:54:00:12:35:02"
K8S_IP, PLAIN_IP = "10.252.0.21", "10.252.0.22"


def _build(out: Path, *extra: str) -> Path:
    if (out / "rootfs.squashfs").exists():
        return out
    # niced: it runs in the background while the rest of the suite runs (see below)
    build = subprocess.Popen(["nice", "-n", "19", "bash", str(BUILD), "--kernel",
                              "linux-image-cloud-amd64", "--out", str(out), *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    _RUNNING.add(build)
    try:
        stdout, stderr = build.communicate(timeout=1800)
    finally:
        _RUNNING.discard(build)
    assert build.returncode == 0, stderr[-4000:]
    assert stdout.strip().splitlines()[-1] == str(out)
    return out


_RUNNING: set[subprocess.Popen[str]] = set()


@atexit.register
def _end_builds() -> None:
    """A session that ends early (-x, Ctrl-C) ends the builds it started, by their PID."""
    for build in list(_RUNNING):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGTERM)


def _build_both(base: Path, scratch: Path) -> dict[str, Path]:
    plain = _build(base / "plain")
    if (base / "kubernetes" / "rootfs.squashfs").exists():
        return {"plain": plain, "kubernetes": base / "kubernetes"}
    scratch.mkdir(parents=True, exist_ok=True)
    repo, key = fake_kubernetes_repo.build(Path(tempfile.mkdtemp(dir=scratch)))
    with fake_kubernetes_repo.serve(repo) as url:
        kubernetes = _build(base / "kubernetes", "--kubernetes-repo", url,
                            "--kubernetes-key", str(key))
    return {"plain": plain, "kubernetes": kubernetes}


class _Prebuild:
    """The two builds take ~5 minutes, mostly waiting on Debian's mirror and mksquashfs;
    tests/conftest.py starts them (niced) when the session begins and runs this module's
    tests last, so that the rest of the suite runs meanwhile (CI's 30-minute budget)."""

    thread: threading.Thread | None = None
    result: dict[str, Path] | None = None
    error: BaseException | None = None

    @classmethod
    def start(cls) -> None:
        if cls.thread is not None or missing_for_vms(uefi=True) is not None:
            return
        base = Path(tempfile.mkdtemp(prefix="bootd-production-images-"))
        atexit.register(shutil.rmtree, base, True)

        def run() -> None:
            try:
                cls.result = _build_both(base, base / "scratch")
            except BaseException as exc:  # reported by the fixture, in the test's report
                cls.error = exc

        cls.thread = threading.Thread(target=run, name="production-images", daemon=True)
        cls.thread.start()


start_prebuild = _Prebuild.start


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if (why := missing_for_vms(uefi=True)) is not None:
        pytest.skip(why)
    for tool in ("mmdebstrap", "apt-ftparchive", "gpg", "dpkg-deb", "ssh", "ssh-keygen",
                 "unsquashfs"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (scripts/install-deps installs it)")
    reuse = os.environ.get("BOOTD_E2E_PRODUCTION_IMAGES")
    if _Prebuild.thread is not None and not reuse:
        _Prebuild.thread.join()
        if _Prebuild.error is not None:
            raise _Prebuild.error
        assert _Prebuild.result is not None
        return _Prebuild.result
    base = Path(reuse) if reuse else tmp_path_factory.mktemp("production-images")
    return _build_both(base, tmp_path_factory.mktemp("fake-kubernetes-repo"))


CONFIG = """\
server: {{interfaces: [br0], address: {server}, state_dir: {tmp}/state,
         api: {tmp}/state/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.252.0.0/24, gateway: {server}, dns: [{server}]}}
tftp: {{root: {tmp}}}
images:
  kubernetes: {{kernel: {k8s}/vmlinuz, initrd: {k8s}/initrd.img,
                rootfs: {k8s}/rootfs.squashfs, cmdline: "boot=bootd console=ttyS0 panic=-1"}}
  plain: {{kernel: {plain}/vmlinuz, initrd: {plain}/initrd.img,
           rootfs: {plain}/rootfs.squashfs, cmdline: "boot=bootd console=ttyS0 panic=-1"}}
clusters:
  lab: {{api_server: "https://10.252.0.10:6443", ca_cert_hash: "{ca_hash}",
         token: {{value: {token}}}}}
defaults: {{cluster: lab, ssh_authorized_keys: ["{ssh_key}"]}}
pools:
  - name: workers
    labels: {{node.kubernetes.io/pool: workers}}
    taints: ["dedicated=batch:NoSchedule"]
    nodes:
      - {{name: prod1, mac: "{k8s_mac}", ip: {k8s_ip}, image: kubernetes}}
      - {{name: prod2, mac: "{plain_mac}", ip: {plain_ip}, image: plain}}
"""


class Booted:
    def __init__(self, vmlab: VmLab, ssh_key: Path) -> None:
        self.vmlab, self.ssh_key = vmlab, ssh_key
        self.detail: dict[str, dict[str, object]] = {}

    def ssh(self, ip: str, command: str, wait: float = 180) -> str:
        """Run `command` as root on the node; sshd may still be making its host keys
        (RSA under TCG takes a while), so a refused connection is retried for `wait` s."""
        deadline = time.monotonic() + wait
        while True:
            out = self.vmlab.lab.run(self.vmlab.ns, [
                "ssh", "-i", str(self.ssh_key), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR", f"root@{ip}", command],
                timeout=120, check=False)
            refused = out.returncode == 255 and "Connection refused" in out.stderr
            if not refused or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        return str(out.stdout)


@pytest.fixture(scope="module")
def booted(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Booted]:
    """Both images booted at once, each on its own VM, until joined or failed."""
    tmp = tmp_path_factory.mktemp("production-boot")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True)
    config = CONFIG.format(
        server=SERVER, tmp=tmp, k8s=images["kubernetes"], plain=images["plain"],
        ca_hash=CA_HASH, token=TOKEN, ssh_key=(tmp / "id_ed25519.pub").read_text().strip(),
        k8s_mac=K8S_MAC, k8s_ip=K8S_IP, plain_mac=PLAIN_MAC, plain_ip=PLAIN_IP)
    with NetLab("bdprod") as lab:
        vmlab = VmLab(lab, tmp, config, f"{SERVER}/24")
        booted = Booted(vmlab, key)
        # BIOS: SeaBIOS + QEMU's iPXE ROM; a second port with no DHCP behind it
        vmlab.start_vm(K8S_MAC, memory_mib=1024, dead_nic=True)
        # UEFI: OVMF's own PXE -> snponly.efi over TFTP -> iPXE -> the EFI stub kernel
        vmlab.start_vm(PLAIN_MAC, uefi=True, memory_mib=1024)
        booted.detail["prod1"] = wait_finished(vmlab, K8S_MAC, "prod1", timeout=600)
        booted.detail["prod2"] = wait_finished(vmlab, PLAIN_MAC, "prod2", timeout=600)
        yield booted


def _messages(detail: dict[str, object], stage: str) -> list[str]:
    return [str(s["detail"].get("message", ""))  # type: ignore[attr-defined]
            for s in last_attempt_steps(detail) if s["stage"] == stage]


def test_image_with_kubernetes_repo_boots_and_joins(booted: Booted,
                                                   images: dict[str, Path]) -> None:
    detail = booted.detail["prod1"]
    assert detail["stage"] == "joined", booted.vmlab.status_text("prod1")
    assert detail["ip"] == K8S_IP
    seen = [s["stage"] for s in last_attempt_steps(detail)]
    for stage in ("ipxe-script", "kernel", "initrd", "kernel-handoff", "initramfs", "rootfs",
                  "rootfs-mounted", "join-script", "kubeadm", "joined"):
        assert stage in seen, (stage, seen)
    # the initramfs checked the squashfs bootd served against the sha256 bootd gave it
    mounted = _messages(detail, "rootfs-mounted")[0]
    digest = hashlib.sha256((images["kubernetes"] / "rootfs.squashfs").read_bytes()).hexdigest()
    assert mounted.startswith(f"sha256 {digest}"), mounted
    kubeadm = next(m for m in _messages(detail, "kubeadm") if "--token" in m)
    token_digest = hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
    assert f"--token token-sha256:{token_digest}" in kubeadm
    assert f"--discovery-token-ca-cert-hash {CA_HASH}" in kubeadm
    assert "--node-name prod1" in kubeadm
    assert "--node-labels=node.kubernetes.io/pool=workers" in kubeadm
    assert "--register-with-taints=dedicated=batch:NoSchedule" in kubeadm
    # what kubeadm would rely on: containerd up, kubelet state on tmpfs
    assert "runtime: containerd" in kubeadm and "/var/lib/kubelet: tmpfs" in kubeadm


def test_node_runs_from_ram_with_its_services(booted: Booted) -> None:
    """Over SSH, with the key bootd's config gave the node through join.sh."""
    out = booted.ssh(K8S_IP, "hostname; findmnt -n -o FSTYPE /; "
                     "findmnt -n -o FSTYPE /var/lib/containerd; "
                     "findmnt -n -o FSTYPE /var/lib/kubelet; "
                     "systemctl is-active containerd ssh systemd-networkd bootd-join kubelet; "
                     "grep -c SystemdCgroup.=.true /etc/containerd/config.toml; "
                     "dpkg-query -W -f '${Status}\\n' kubeadm; "
                     "systemctl show -p Result --value systemd-networkd-wait-online; "
                     "ls /sys/class/net | grep -c '^en'; "
                     "/lib/systemd/systemd-networkd-wait-online --timeout=5 >/dev/null 2>&1;"
                     " echo $?")
    lines = out.split()
    assert lines[0] == "prod1"  # join.sh named the node
    assert lines[1:4] == ["overlay", "tmpfs", "tmpfs"]
    assert lines[4:9] == ["active"] * 5
    assert lines[9] == "1"
    assert " ".join(lines[10:13]) == "hold ok installed"
    # two NICs, one with no DHCP behind it: online anyway, without waiting it out; waiting
    # for every NIC (wait-online's default) would still be waiting
    assert lines[13:16] == ["success", "2", "1"]


def test_nodes_get_their_own_identity(booted: Booted) -> None:
    """The image ships no SSH host keys and no machine id: each node makes its own."""
    ids = {ip: booted.ssh(ip, "cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub")
           for ip in (K8S_IP, PLAIN_IP)}
    assert ids[K8S_IP] != ids[PLAIN_IP]
    for text in ids.values():
        machine_id, key = text.splitlines()[:2]
        assert len(machine_id) == 32 and key.startswith("ssh-ed25519 ")


def test_image_without_kubernetes_repo_says_kubeadm_is_missing(booted: Booted,
                                                              images: dict[str, Path]
                                                              ) -> None:
    """What this machine kind builds by default: it boots, runs join.sh, and tells bootd
    plainly why it cannot join."""
    detail = booted.detail["prod2"]
    assert detail["stage"] == "failed"
    firmware = [s["detail"].get("firmware")  # type: ignore[attr-defined]
                for s in last_attempt_steps(detail) if s["stage"] == "dhcp-discover"]
    assert firmware[:2] == ["efi64", "ipxe"], firmware  # booted through UEFI
    assert "kubeadm is not installed in this image" in str(detail["last_error"])
    assert "rootfs-mounted" in [s["stage"] for s in last_attempt_steps(detail)]
    packages = (images["plain"] / "packages.txt").read_text().split("\n")
    names = {line.split(" ")[0] for line in packages if line}
    assert {"systemd", "openssh-server", "containerd", "busybox"} <= names
    assert not names & {"kubeadm", "kubelet", "kubectl"}
    listing = subprocess.run(["unsquashfs", "-l", str(images["plain"] / "rootfs.squashfs")],
                             capture_output=True, text=True, check=True).stdout
    assert "/etc/ssh/ssh_host_" not in listing and "/boot/vmlinuz" not in listing


def test_bootd_lab_boots_a_production_image(images: dict[str, Path]) -> None:
    """`bootd lab --image DIR`: an operator's own image in the lab VMs before the fleet."""
    proc = subprocess.run([sys.executable, "-m", "bootd", "lab", "--vms", "1",
                           "--image", str(images["kubernetes"])],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "boot=bootd panic=30 console=tty0 console=ttyS0,115200n8" in proc.stdout
    assert "VM 52:54:00:b0:07:01: joined" in proc.stdout
