"""The image recipes' own logic, without building or booting (tests/e2e does both).

The production initramfs script (`boot=bootd`) is run by sh with initramfs-tools'
functions and busybox replaced by recording fakes, in a private mount namespace whose
/proc/cmdline is the test's: every failure path a node can meet (no rootfs argument,
download failures and retries, a sha256 mismatch) and the mounts of a good boot.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "images"
PRODUCTION = IMAGES / "production"
TEST_IMAGE = ROOT / "bootd" / "lab" / "testimage"
BOOT_SCRIPT = PRODUCTION / "initramfs" / "etc" / "initramfs-tools" / "scripts" / "bootd"
UNITS = PRODUCTION / "rootfs" / "etc" / "systemd" / "system"
BUILD = IMAGES / "build-production-image.sh"

SHELL_SCRIPTS = [
    (TEST_IMAGE / "build.sh", "bash"),
    (BUILD, "bash"),
    (PRODUCTION / "customize.sh", "bash"),
    (PRODUCTION / "rootfs" / "usr" / "lib" / "bootd" / "join", "sh"),
    (PRODUCTION / "initramfs" / "etc" / "initramfs-tools" / "hooks" / "bootd", "sh"),
    (BOOT_SCRIPT, "sh"),
    (TEST_IMAGE / "init", "sh"),
    (TEST_IMAGE / "kubeadm", "sh"),
    (TEST_IMAGE / "udhcpc.script", "sh"),
]


@pytest.mark.parametrize(("script", "shell"), SHELL_SCRIPTS, ids=lambda v: str(v)[-40:])
def test_image_scripts_pass_shellcheck(script: Path, shell: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (scripts/install-deps installs it)")
    lint = subprocess.run(["shellcheck", "-S", "warning", "-s", shell, "-x", str(script)],
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_image_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs systemd-analyze and ssh-keygen")
    units = []
    for unit in sorted(p for p in UNITS.iterdir() if p.is_file()):
        text = unit.read_text().replace(  # the helper where this checkout has it
            "/usr/lib/bootd/join", str(PRODUCTION / "rootfs" / "usr" / "lib" / "bootd" / "join"))
        (tmp_path / unit.name).write_text(text)
        units.append(str(tmp_path / unit.name))
    assert len(units) == 4
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)


def test_join_unit_waits_for_network_and_containerd_but_not_for_kubelet() -> None:
    """kubeadm join restarts kubelet from inside this unit: ordering kubelet after it
    would deadlock the join."""
    text = (UNITS / "bootd-join.service").read_text()
    assert "After=network-online.target containerd.service" in text
    assert "Wants=network-online.target" in text and "kubelet" not in text


def test_node_is_online_when_any_nic_is() -> None:
    """An uncabled second port must not hold the join back until wait-online times out."""
    text = (UNITS / "systemd-networkd-wait-online.service.d" / "bootd.conf").read_text()
    assert "ExecStart=\nExecStart=/lib/systemd/systemd-networkd-wait-online --any" in text


def test_a_failed_join_is_retried_a_bounded_number_of_times() -> None:
    text = (UNITS / "bootd-join.service").read_text()
    for line in ("Restart=on-failure", "RestartSec=30s", "StartLimitBurst=5",
                 "StartLimitIntervalSec=15min"):
        assert line in text
    helper = (PRODUCTION / "rootfs" / "usr" / "lib" / "bootd" / "join").read_text()
    assert "kubeadm reset -f" in helper  # a half-done join would fail preflight otherwise


@pytest.mark.parametrize(("args", "message"), [
    (["--kubernetes-repo", "https://pkgs.k8s.io/core:/stable:/v1.31/deb/"],
     "--kubernetes-repo needs --kubernetes-key FILE"),
    (["--kubernetes-key", "/etc/hostname"], "--kubernetes-key without --kubernetes-repo"),
    (["--bogus"], "unknown argument --bogus"),
])
def test_build_script_refuses_bad_arguments(args: list[str], message: str) -> None:
    result = subprocess.run(["bash", str(BUILD), *args], capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr


def test_build_script_help() -> None:
    result = subprocess.run(["bash", str(BUILD), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--kubernetes-repo URL" in result.stdout


# --- the boot=bootd initramfs script --------------------------------------------------

FAKE_BUSYBOX = r"""#!/bin/sh
# records what the boot script asks of busybox; the rest goes to the host's tools
applet=$1; shift
case "$applet" in
    timeout) shift; exec "$@" ;;
    wget)
        out=""
        for a in "$@"; do
            case "$a" in
                --post-data=*) echo "report ${a#--post-data=}" >> "$FAKE_LOG"; exit 0 ;;
            esac
        done
        while [ $# -gt 0 ]; do [ "$1" = -O ] && out=$2; shift; done
        n=$(( $(cat "$FAKE_DIR/wgets" 2>/dev/null || echo 0) + 1 ))
        echo "$n" > "$FAKE_DIR/wgets"
        echo "wget $n" >> "$FAKE_LOG"
        [ "$n" -le "${FAKE_WGET_FAILURES:-0}" ] && exit 1
        cp "$FAKE_DIR/rootfs.squashfs" "$out" ;;
    mount) echo "mount $*" >> "$FAKE_LOG" ;;
    *) exec "$applet" "$@" ;;
esac
"""

HARNESS = r"""
configure_networking() {
    echo "network BOOTIF=$BOOTIF" >> "$FAKE_LOG"
    DEVICE=ens3
    IPV4ADDR=10.0.0.5
}
panic() { echo "panic $*" >> "$FAKE_LOG"; exit 1; }
rootmnt=/root-of-node
. "$BOOT_SCRIPT"
mountroot
echo "mountroot returned" >> "$FAKE_LOG"
"""

ROOTFS = b"pretend squashfs" * 4096
GOOD_SHA = hashlib.sha256(ROOTFS).hexdigest()


def run_boot_script(tmp_path: Path, cmdline: str, wget_failures: int = 0) -> list[str]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /run and /proc/cmdline")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "busybox").write_text(FAKE_BUSYBOX)
    (fake_bin / "mount").write_text('#!/bin/sh\necho "mount $*" >> "$FAKE_LOG"\n')
    (fake_bin / "sleep").write_text('#!/bin/sh\necho "sleep $*" >> "$FAKE_LOG"\n')
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    (tmp_path / "rootfs.squashfs").write_bytes(ROOTFS)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "harness.sh").write_text(HARNESS)
    log = tmp_path / "log"
    log.touch()
    env = {"PATH": f"{fake_bin}:/usr/sbin:/usr/bin:/sbin:/bin", "FAKE_LOG": str(log),
           "FAKE_DIR": str(tmp_path), "FAKE_WGET_FAILURES": str(wget_failures),
           "BOOT_SCRIPT": str(BOOT_SCRIPT)}
    # A private mount namespace: the script's /run/bootd and the test's /proc/cmdline
    # never touch the host's.
    inner = (f"/bin/mount -t tmpfs tmpfs /run && "
             f"/bin/mount --bind {tmp_path}/cmdline /proc/cmdline && "
             f"exec sh {tmp_path}/harness.sh")
    subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
                   env=env, timeout=60, check=False)
    return log.read_text().splitlines()


URL = "http://10.0.0.1:8080"
BASE = (f"boot=bootd bootd.url={URL} bootd.node=n1 bootd.mac=52:54:00:12:34:56 "
        f"bootd.rootfs={URL}/images/debian/rootfs")


def test_boot_script_mounts_a_verified_rootfs_under_an_overlay(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"{BASE} bootd.rootfs_sha256={GOOD_SHA}")
    assert log[0] == "network BOOTIF=01-52-54-00-12-34-56"  # the NIC iPXE booted from
    assert log[1].startswith('report {"stage":"initramfs","message":"network up: ens3 10.0.0.5"')
    mounts = [line for line in log if line.startswith("mount ")]
    assert mounts[0] == "mount -t tmpfs -o mode=0700,size=90% bootd-image /run/bootd/image"
    assert mounts[1] == f"mount -o remount,ro,size={len(ROOTFS) // 1024 + 1024}k /run/bootd/image"
    assert mounts[2] == ("mount -t squashfs -o loop,ro /run/bootd/image/rootfs.squashfs "
                         "/run/bootd/lower")
    assert mounts[3] == "mount -t tmpfs -o mode=0755,size=50% bootd-rw /run/bootd/rw"
    assert mounts[4] == ("mount -t overlay -o lowerdir=/run/bootd/lower,"
                         "upperdir=/run/bootd/rw/upper,workdir=/run/bootd/rw/work "
                         "bootd-root /root-of-node")
    assert f'"stage":"rootfs-mounted","message":"sha256 {GOOD_SHA}' in log[-2]
    assert log[-1] == "mountroot returned"
    assert not any(line.startswith("panic") for line in log)


def test_boot_script_retries_downloads_then_boots(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"{BASE} bootd.rootfs_sha256={GOOD_SHA}", wget_failures=2)
    assert [line for line in log if line.startswith(("wget", "sleep"))] == [
        "wget 1", "sleep 5", "wget 2", "sleep 10", "wget 3"]
    assert log[-1] == "mountroot returned"


def test_boot_script_gives_up_after_its_attempts(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"{BASE} bootd.rootfs_attempts=3", wget_failures=99)
    assert [line for line in log if line.startswith("wget")] == ["wget 1", "wget 2", "wget 3"]
    assert log[-2].startswith('report {"stage":"failed","message":"initramfs: rootfs download')
    assert log[-1] == f"panic bootd: rootfs download from {URL}/images/debian/rootfs failed 3 times"


def test_boot_script_refuses_a_rootfs_with_the_wrong_sha256(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"{BASE} bootd.rootfs_sha256={'0' * 64}")
    assert log[-1].startswith(f"panic bootd: rootfs sha256 {GOOD_SHA} is not {'0' * 64}")
    assert '"stage":"failed"' in log[-2]
    assert not any("squashfs" in line for line in log if line.startswith("mount"))


def test_boot_script_without_a_rootfs_argument_says_what_is_missing(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"boot=bootd bootd.url={URL} bootd.mac=52:54:00:12:34:56")
    assert log == ["panic bootd: no bootd.rootfs= on the kernel command line "
                   "(give the image a rootfs in bootd's config)"]


def test_boot_script_overlay_size_from_the_command_line(tmp_path: Path) -> None:
    log = run_boot_script(tmp_path, f"{BASE} bootd.overlay_size=2g")
    assert "mount -t tmpfs -o mode=0755,size=2g bootd-rw /run/bootd/rw" in log
    assert log[-1] == "mountroot returned"  # no sha256 given: nothing to compare


# --- `bootd lab --image DIR` ----------------------------------------------------------

def test_lab_takes_the_cmdline_from_the_built_image(tmp_path: Path) -> None:
    from bootd.lab.demo import image_cmdline

    assert image_cmdline(tmp_path) == "boot=bootd console=ttyS0"  # nothing to go by
    (tmp_path / "bootd-image.yaml").write_text(
        'images:\n  debian: {kernel: k, initrd: i, rootfs: r,\n'
        '           cmdline: "boot=bootd panic=30 console=ttyS0,115200n8"}\n')
    assert image_cmdline(tmp_path) == "boot=bootd panic=30 console=ttyS0,115200n8"
    (tmp_path / "bootd-image.yaml").write_text(
        'images:\n  debian: {kernel: k, initrd: i, cmdline: "boot=bootd quiet"}\n')
    assert image_cmdline(tmp_path) == "boot=bootd quiet console=ttyS0"  # the lab reads it


def test_lab_refuses_an_image_directory_without_the_image(tmp_path: Path) -> None:
    import io

    from bootd.lab.demo import run_vm_lab
    from bootd.lab.vms import missing_for_vms

    if missing_for_vms() is not None:
        pytest.skip("the lab checks its own prerequisites first")
    (tmp_path / "vmlinuz").write_bytes(b"k")
    out = io.StringIO()
    assert run_vm_lab(1, image=tmp_path, out=out) == 2
    assert f"{tmp_path} has no initrd.img, rootfs.squashfs" in out.getvalue()
