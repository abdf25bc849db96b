"""Test-side waits over the lab's VMs: the test image's console markers, deadlines and
the steps of a node's last boot attempt. Not product code: `bootd lab` judges a VM by
`bootd status` alone."""

from __future__ import annotations

import time

from bootd.lab.vms import VmLab
from bootd.state.events import FINISHED

# printed on the serial console by bootd/lab/testimage/init
JOINED_MARK = "BOOTD-E2E: joined"
FAILED_MARK = "BOOTD-E2E: FAILED"


def wait_joined(vmlab: VmLab, mac: str, timeout: float = 240) -> str:
    """The console once the test image says it joined; AssertionError on failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = vmlab.console(mac)
        if JOINED_MARK in text:
            return text
        if FAILED_MARK in text or vmlab.vms[mac][0].poll() is not None:
            break
        time.sleep(1)
    raise AssertionError(f"VM {mac} did not join. Console tail:\n"
                         + vmlab.console(mac)[-3000:]
                         + "\n\nbootd status:\n" + vmlab.status_text(mac))


def wait_finished(vmlab: VmLab, mac: str, node: str, timeout: float = 300,
                  ) -> dict[str, object]:
    """For images that print no test markers (the production image): poll `bootd status`
    until the node is joined or failed; its status detail is returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            detail = vmlab.status(node)
        except RuntimeError:  # no events for the node yet
            detail = {}
        if detail.get("stage") in FINISHED:
            return detail
        if vmlab.vms[mac][0].poll() is not None:
            break
        time.sleep(2)
    raise AssertionError(f"VM {mac} ({node}) neither joined nor failed. Console tail:\n"
                         + vmlab.console(mac)[-3000:]
                         + "\n\nbootd status:\n" + vmlab.status_text(node))


def last_attempt_steps(detail: dict[str, object]) -> list[dict[str, object]]:
    """The steps of a node's latest boot attempt, from `bootd status NODE -o json`."""
    history = detail["history"]
    assert isinstance(history, list)
    steps: list[dict[str, object]] = history[-1]["steps"]
    return steps
