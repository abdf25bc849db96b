"""A whole boot across a member's death: three bootd members on one etcd (Debian's), a
QEMU VM PXE boots, and the member that answered its DHCP is killed (-9) right after it
served the VM's iPXE script. The VM must still reach `joined`: iPXE takes kernel and
initrd from the next member its script names, the initramfs takes DHCP from the member
that now owns it and the rootfs, join.sh and reports from the others. `bootd status VM`
on a surviving member then shows the whole timeline, each step with the member that
served it.

    vm: br0 -- tap0 (VM)   b1 b2 b3 (bootd 10.252.0.1-3)   e1 (etcd 10.252.0.9)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.lab.netlab import NetLab
from bootd.lab.vms import VmLab, build_test_image, missing_for_vms
from bootd.state.cluster import ranked
from tests.e2e.vms import last_attempt_steps, wait_joined
from tests.integration.conftest import require

pytestmark = pytest.mark.netns

MEMBERS = ("b1", "b2", "b3")
ETCD_IP = "10.252.0.9"
VM_MAC = "52:54:00:25:20:01"
TOKEN = "abcdef.0123456789abcdef"


def member_ip(name: str) -> str:
    return f"10.252.0.{name[1]}"


CONFIG = """\
server: {{interfaces: [srv0], address: {address}, state_dir: {state},
         api: {state}/api.sock, drain_timeout: 2s}}
network: {{subnet: 10.252.0.0/24, dns: [10.252.0.1]}}
tftp: {{root: {state}}}
cluster:
  member: {name}
  etcd: {{endpoints: ["http://{etcd}:2379"], timeout: 1s}}
  member_ttl: 2s
images:
  test: {{kernel: {image}/vmlinuz, initrd: {image}/initrd.img,
          rootfs: {image}/rootfs.squashfs, cmdline: "console=ttyS0 panic=-1"}}
clusters:
  lab: {{api_server: "https://10.252.0.10:6443", ca_cert_hash: "sha256:{ca}",
         token: {{value: {token}}}}}
defaults: {{image: test, cluster: lab}}
pools:
  - name: workers
    nodes: [{{name: vm1, mac: "{mac}", ip: 10.252.0.21}}]
"""


@pytest.fixture
def cluster_vmlab(tmp_path: Path) -> Iterator[tuple[VmLab, dict[str, subprocess.Popen[bytes]]]]:
    if (why := missing_for_vms()) is not None:
        pytest.skip(why)
    require("etcd", "etcdctl")
    image = build_test_image()
    with NetLab("bdcb") as lab:
        vmlab = VmLab(lab, tmp_path, None, "10.252.0.250/24")  # the switch for everyone
        procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, address in [("e1", ETCD_IP), *((m, member_ip(m)) for m in MEMBERS)]:
            ns = lab.namespace(name)
            lab.veth(vmlab.ns, f"p{name}", ns, "srv0")
            lab.attach(vmlab.ns, f"p{name}", "br0")
            lab.address(ns, "srv0", f"{address}/24")
        log = (tmp_path / "etcd.log").open("ab")
        procs["e1"] = lab.spawn(f"{lab.tag}-e1", [
            "etcd", "--name", "e1", "--data-dir", str(tmp_path / "e1.etcd"),
            "--listen-client-urls", f"http://{ETCD_IP}:2379",
            "--advertise-client-urls", f"http://{ETCD_IP}:2379",
            "--listen-peer-urls", f"http://{ETCD_IP}:2380"], stdout=log, stderr=log)
        for name in MEMBERS:
            state = tmp_path / name
            state.mkdir()
            config = tmp_path / f"{name}.yaml"
            config.write_text(CONFIG.format(
                address=member_ip(name), state=state, name=name, etcd=ETCD_IP, image=image,
                ca="d" * 64, token=TOKEN, mac=VM_MAC))
            procs[name] = lab.start_bootd(f"{lab.tag}-{name}", config,
                                          tmp_path / f"{name}.log", timeout=30)
        yield vmlab, procs


def status(tmp: Path, member: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootd", "status", *args, "-c",
                           str(tmp / f"{member}.yaml")], capture_output=True, text=True,
                          timeout=30, check=False)


def shared_timeline(lab: NetLab) -> str:
    """What etcd holds of vm1's timeline (cluster rule 7), asked from b3's namespace."""
    return lab.run(f"{lab.tag}-b3", ["etcdctl", "--endpoints", f"http://{ETCD_IP}:2379",
                                     "get", "--print-value-only", "/bootd/nodes/vm1"],
                   check=False).stdout


def script_server(lab: NetLab) -> str | None:
    """The member that served vm1's iPXE script, once etcd holds that step."""
    text = shared_timeline(lab).strip()
    events = json.loads(text) if text else []
    return next((str(e["detail"]["served_by"]) for e in events
                 if e["stage"] == "ipxe-script"), None)


def test_a_vm_joins_although_the_member_that_answered_it_died_mid_boot(
        cluster_vmlab: tuple[VmLab, dict[str, subprocess.Popen[bytes]]]) -> None:
    vmlab, procs = cluster_vmlab
    tmp = vmlab.tmp
    # all three registered and seeing each other before the VM starts
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = []
        for name in MEMBERS:
            answer = subprocess.run([sys.executable, "-m", "bootd", "cluster", "status",
                                     "-o", "json", "-c", str(tmp / f"{name}.yaml")],
                                    capture_output=True, text=True, timeout=30, check=False)
            seen.append(len(json.loads(answer.stdout)["members"])
                        if answer.returncode == 0 else 0)
        if seen == [3, 3, 3]:
            break
        time.sleep(0.5)
    vmlab.start_vm(VM_MAC)
    # the script is fetched (and shared with the others): now its server dies. That is
    # the VM's owner, unless the firmware's DISCOVER said it had waited past
    # takeover_after and every member answered (cluster rule 3): then whoever it chose.
    deadline = time.monotonic() + 120
    while (first := script_server(vmlab.lab)) is None:
        assert time.monotonic() < deadline, (
            "the VM never fetched its script\n" + vmlab.console(VM_MAC)[-2000:])
        time.sleep(0.1)
    survivors = [m for m in ranked(VM_MAC, list(MEMBERS)) if m != first]
    killed_at = time.monotonic()
    vmlab.lab.stop(procs.pop(first), signal.SIGKILL)
    console = wait_joined(vmlab, VM_MAC)
    joined_after = time.monotonic() - killed_at
    answer = status(tmp, survivors[0], "vm1", "-o", "json")
    assert answer.returncode == 0, answer.stderr
    detail = json.loads(answer.stdout)
    steps = last_attempt_steps(detail)
    story = [(str(s["stage"]), str(s["detail"].get("served_by"))) for s in steps]
    served = dict(story[::-1])  # the first member to serve each stage
    assert detail["stage"] == "joined", story
    for stage in ("dhcp-ack", "ipxe-script", "kernel", "initrd", "rootfs",
                  "rootfs-mounted", "join-script", "kubeadm", "joined"):
        assert stage in served, (stage, served)
    assert served["ipxe-script"] == first, story
    assert served["kernel"] in survivors and served["rootfs"] in survivors
    assert served["joined"] in survivors
    # the other survivor tells the same story
    other = json.loads(status(tmp, survivors[1], "vm1", "-o", "json").stdout)
    assert other["stage"] == "joined"
    assert "fetch http://" + member_ip(first) in console  # the dead member was tried first
    # the write rate of one whole boot: the node's timeline key's version counts its writes
    written = vmlab.lab.run(f"{vmlab.lab.tag}-b1" if first != "b1" else f"{vmlab.lab.tag}-b2",
                            ["etcdctl", "--endpoints", f"http://{ETCD_IP}:2379", "get", "-w",
                             "json", "/bootd/nodes/vm1"]).stdout
    versions = json.loads(written)["kvs"][0]["version"]
    print(f"\ncluster whole boot: {first} killed after the iPXE script; joined "
          f"{joined_after:.1f} s later, rest served by {sorted(set(served.values()) - {first})};"
          f" {len(steps)} events, {versions} timeline writes to etcd, no lease writes "
          "(a reserved node)")
