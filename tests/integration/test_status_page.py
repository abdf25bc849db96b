"""The status page in a real browser: Debian's headless Chromium, in the namespace of a
bootd whose admin API listens on that namespace's loopback, while udhcpc and curl boot a
node step by step (as firmware, iPXE, kernel, initramfs and join.sh would)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from bootd.ops.text import printable
from bootd.state.store import Store
from tests.browser import Browser, available, not_blank, save_artifact
from tests.integration.conftest import SERVER_IP, DhcpLab, require
from tests.integration.test_status import setup

pytestmark = pytest.mark.netns

API = "127.0.0.1:9090"
PAGE = f"http://{API}/"
URL = f"http://{SERVER_IP}:8080"
HOSTILE = '<script>document.title="owned"</script><b>bold</b>\x1b[2J\x1b]0;pwned\x07 & done'


def start(lab: DhcpLab, api: str | None = API) -> None:
    setup(lab, api)  # booty and idle in pool w, as the `bootd status` tests have them


def browser(lab: DhcpLab) -> Browser:
    why = available()
    if why:
        pytest.skip(why)
    return Browser(lab.tmp / "chromium", netns=lab.server_ns)


def cell(key: str) -> str:
    """A JS expression: the class of a node's cell in the overview grid."""
    return f"(document.querySelector('#grid a[data-k={json.dumps(key)}]') || {{}}).className"


def report(lab: DhcpLab, stage: str, message: str) -> None:
    lab.lab.run(lab.client_ns, ["curl", "-sS", "-f", "--max-time", "20", "-d",
                                json.dumps({"stage": stage, "message": message}),
                                f"{URL}/api/v1/events"])
    time.sleep(0.3)  # the per-node report rate limit


def fetch(lab: DhcpLab, url: str) -> None:
    lab.lab.run(lab.client_ns, ["curl", "-sS", "-f", "--max-time", "20", "-o", "/dev/null",
                                url])


def test_page_follows_a_boot_live_and_shows_node_text_as_text(dhcp_lab: DhcpLab) -> None:
    require("curl", "udhcpc")
    lab = dhcp_lab
    start(lab)
    with browser(lab) as b:
        b.goto(PAGE)
        b.wait_for("document.body.dataset.version !== undefined")  # the script took over
        b.wait_for("document.getElementById('live').textContent === 'live'")
        assert b.eval(cell("booty")) == "c s-never-seen"
        assert b.eval(cell("idle")) == "c s-never-seen"

        # a stage change reaches the open page within 2 s
        pxe = lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000")
        assert pxe is not None and pxe["boot_file"] == "undionly.kpxe"
        took = b.wait_for(f"{cell('booty')}.includes('s-dhcp-ack')", timeout=5)
        assert took < 2.0, f"the page saw the DHCP ACK after {took:.2f}s"

        lab.lab.address(lab.client_ns, "cli0", "10.77.0.2/24")
        fetch(lab, f"tftp://{SERVER_IP}/undionly.kpxe")
        assert lab.udhcpc("-x", "0x4d:" + b"iPXE".hex()) is not None
        for path in ("/nodes/02-00-00-00-00-01/boot.ipxe", "/images/k8s/kernel",
                     "/images/k8s/initrd", "/nodes/02-00-00-00-00-01/beacon"):
            fetch(lab, URL + path)
        b.wait_for(f"{cell('booty')}.includes('s-kernel-handoff')", timeout=5)
        time.sleep(1.2)  # the kernel booting: a gap the timeline shows
        assert lab.udhcpc() is not None
        fetch(lab, URL + "/images/k8s/rootfs")
        report(lab, "rootfs-mounted", "sha256 ok")
        fetch(lab, URL + "/nodes/02-00-00-00-00-01/join.sh")
        report(lab, "kubeadm", "joining")
        report(lab, "joined", "joined 10.77.0.10:6443")
        b.wait_for(f"{cell('booty')} === 'c s-joined'", timeout=5)
        b.wait_for("document.querySelector('#boot-times figure.hist[data-pool=w]')",
                   timeout=10)  # the histogram of this storm, refreshed after the join
        assert b.eval("[...document.querySelectorAll('#legend li')]"
                      ".map(li => li.textContent.trim())") == ["1 never-seen", "1 joined"]

        overview = b.screenshot(lab.tmp / "status-overview.png")
        assert not_blank(overview)
        save_artifact(overview)

        # the node's timeline: click its cell
        b.eval("document.querySelector('#grid a[data-k=\"booty\"]').click()")
        b.wait_for("!document.getElementById('panel').hidden && "
                   "document.querySelector('#panel svg.gantt')")
        phases = b.eval("[...document.querySelectorAll('#panel section.attempt')[0]"
                        ".querySelectorAll('rect.bar')].map(r => r.dataset.phase)")
        assert phases == ["DHCP", "TFTP", "DHCP", "iPXE script", "kernel", "initrd",
                          "initramfs", "DHCP", "rootfs", "join", "joined"]
        assert b.eval("document.querySelectorAll('#panel rect.gap').length") >= 1
        steps = b.eval("[...document.querySelectorAll('#panel table.steps tbody tr')]"
                       ".map(tr => tr.cells[1].textContent)")
        assert steps[0] == "dhcp-discover" and steps[-1] == "joined"
        timeline = b.screenshot(lab.tmp / "status-node-timeline.png")
        assert not_blank(timeline)
        save_artifact(timeline)

        # hostile text from a node: shown as text in the page, and in the terminal
        report(lab, "failed", HOSTILE)
        b.wait_for(f"{cell('booty')}.includes('s-failed')", timeout=5)
        shown = b.eval("document.querySelector('#errors td.msg').textContent")
        assert shown == printable(f"failed: {HOSTILE}")
        assert b.eval("document.scripts.length") == 1  # only status.js
        assert not b.eval("[...document.querySelectorAll('b')].some(e => e.textContent "
                          "=== 'bold')")  # the node's <b> is text, not an element
        assert b.eval("document.title") == "bootd: 2 nodes"
        row = b.eval("document.querySelector('#nodes tr[data-k=booty] td.msg').textContent")
        assert row == shown
        # the panel follows the node live, and its text is text there too
        b.wait_for("document.querySelector('#panel .facts dd.msg').textContent"
                   f" === {json.dumps(shown)}", timeout=5)

    table = lab.lab.run(lab.server_ns, [sys.executable, "-m", "bootd", "status", "--api", API,
                                        "-o", "wide", "-c", str(lab.tmp / "bootd.yaml")],
                        timeout=60)
    out = table.stdout
    assert "\x1b" not in out and "\\x1b[2J\\x1b]0;pwned\\x07" in out, repr(out)
    assert "<script>" in out  # a terminal shows markup as the text it is


def test_five_thousand_nodes_render_and_stay_live(dhcp_lab: DhcpLab) -> None:
    from tests.unit.test_status_page import fleet

    require("udhcpc")
    lab = dhcp_lab
    store = Store.in_state_dir(lab.tmp / "state")
    fleet(5000, store)  # a bootd that ran this storm left these events behind
    store.close()
    start(lab)
    with browser(lab) as b:
        started = time.monotonic()
        b.goto(PAGE, timeout=60)
        loaded = time.monotonic() - started
        b.wait_for("document.body.dataset.version !== undefined", timeout=60)
        live = time.monotonic() - started
        cells = b.eval("document.querySelectorAll('#grid a.c').length")
        assert cells == 5002  # the storm's nodes and the two configured ones
        timing = b.eval("""(() => {
            const nav = performance.getEntriesByType('navigation')[0];
            const api = performance.getEntriesByName(location.origin + '/api/v1/status')[0];
            return {page_bytes: nav.decodedBodySize, page_wire: nav.encodedBodySize,
                    first_byte_ms: Math.round(nav.responseStart - nav.startTime),
                    html_ms: Math.round(nav.responseEnd - nav.startTime),
                    dom_ms: Math.round(nav.domContentLoadedEventEnd - nav.startTime),
                    load_ms: Math.round(nav.loadEventEnd - nav.startTime),
                    status_bytes: api ? api.decodedBodySize : null,
                    status_wire: api ? api.encodedBodySize : null};
        })()""")
        # one stage change among 5,000 nodes still reaches the page within 2 s
        assert lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001") is not None
        took = b.wait_for(f"{cell('booty')}.includes('s-dhcp-ack')", timeout=5)
        assert took < 2.0
        shot = b.screenshot(lab.tmp / "status-5000-nodes.png")
        assert not_blank(shot)
        save_artifact(shot)
    figures = {"nodes": cells, "navigate_s": round(loaded, 2), "live_s": round(live, 2),
               "update_s": round(took, 2), **timing}
    Path(lab.tmp / "page-5000.json").write_text(json.dumps(figures))
    print("status page, 5,000 nodes:", json.dumps(figures))


def test_status_web_serves_the_page_of_a_unix_socket_api(dhcp_lab: DhcpLab) -> None:
    """`bootd status --web` with the default unix-socket API: a loopback port a browser
    can open, forwarding to the socket (the live stream included)."""
    lab = dhcp_lab
    start(lab, api=None)
    assert lab.udhcpc("-V", "PXEClient:Arch:00000:UNDI:002001") is not None
    proc = subprocess.Popen([sys.executable, "-m", "bootd", "status", "--web", "--listen",
                             "127.0.0.1:0", "-c", str(lab.tmp / "bootd.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first, hint = proc.stdout.readline(), proc.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", first)
        assert found, first + (proc.stderr.read() if proc.poll() is not None else "")
        url = found.group()
        assert "ssh -L" in hint and str(lab.tmp / "state" / "api.sock") in hint
        with urllib.request.urlopen(url, timeout=10) as resp:
            page = resp.read().decode()
        assert 'data-k="booty"' in page and "s-dhcp-ack" in page
        with urllib.request.urlopen(url + "api/v1/status/stream?since=0&at=0",
                                    timeout=10) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            lines = [stream.readline() for _ in range(4)]
        assert any(line.startswith(b"event: nodes") for line in lines), lines
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
