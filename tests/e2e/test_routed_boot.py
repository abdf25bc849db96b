"""Whole boots across a router: VMs on rack subnets, their DHCP relayed by Debian's
dhcrelay to bootd one hop away; TFTP and HTTP routed. The same lab `bootd lab --racks`
shows (bootd/lab/racks.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootd.lab.demo import vm_config
from bootd.lab.netlab import NetLab
from bootd.lab.racks import Racks, missing_for_racks
from bootd.lab.vms import OVMF_CODE, VmLab, build_test_image, missing_for_vms
from tests.e2e.vms import last_attempt_steps, wait_joined

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def image() -> Path:
    if (why := missing_for_vms() or missing_for_racks()) is not None:
        pytest.skip(why)
    return build_test_image()


@pytest.fixture
def racks(image: Path, tmp_path: Path) -> Iterator[VmLab]:
    with NetLab("bdrt") as lab:
        rack_lab = Racks(lab, tmp_path, 2)
        yield VmLab(lab, tmp_path, vm_config(tmp_path, image, "console=ttyS0 panic=-1",
                                             rack_lab), racks=rack_lab)


def test_bios_and_uefi_vms_in_two_racks_boot_through_the_relay(racks: VmLab) -> None:
    if not OVMF_CODE.exists():
        pytest.skip("needs ovmf")
    started = time.monotonic()
    racks.start_vm("52:54:00:b0:07:01", bridge="rack1")  # worker-1, reserved in rack1
    racks.start_vm("52:54:00:b0:07:02", bridge="rack2", uefi=True)  # unknown, rack2
    wait_joined(racks, "52:54:00:b0:07:01", timeout=300)
    wait_joined(racks, "52:54:00:b0:07:02", timeout=300)
    took = time.monotonic() - started
    nodes = {n["node"]: n for n in racks.nodes()}
    worker, other = nodes["worker-1"], nodes["node-52-54-00-b0-07-02"]
    assert (worker["ip"], worker["network"], worker["stage"]) == ("10.61.1.11", "rack1",
                                                                  "joined")
    assert other["network"] == "rack2" and str(other["ip"]).startswith("10.61.2.1")
    uefi = [s["stage"] for s in last_attempt_steps(racks.status("node-52-54-00-b0-07-02"))]
    assert "tftp" in uefi and "joined" in uefi  # snponly.efi crossed the router by TFTP
    print(f"routed BIOS + UEFI boots to joined: {took:.0f}s wall under TCG")
