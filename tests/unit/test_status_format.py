"""`bootd status` rendering: ordering, colours only on a TTY, filters, timeline."""

from __future__ import annotations

from typing import Any

from bootd.cli.status import GREEN, RED, RESET, ago, duration, table, timeline


def row(node: str, stage: str, *, stalled: bool = False, pool: str = "w",
        error: str | None = None) -> dict[str, Any]:
    return {"node": node, "mac": "02:00:00:00:00:01", "ip": "10.0.0.5", "pool": pool,
            "stage": stage, "stalled": stalled, "since": 90.0, "first_seen": 10.0,
            "last_seen": 90.0, "attempts": 1, "last_error": error, "last_boot_time": 42.5}


ANSWER = {"now": 100.0, "nodes": [
    row("ok1", "joined"), row("slow", "initrd", stalled=True), row("busy", "rootfs"),
    row("bad", "failed", error="failed: kubeadm join failed"), row("new", "never-seen"),
    row("gpu1", "joined", pool="gpu"),
]}


def test_problems_first_then_in_progress_then_done() -> None:
    lines = table(ANSWER, wide=False, colour=False).splitlines()
    names = [line.split()[0] for line in lines[1:7]]
    assert names[:2] == ["bad", "slow"] and names[2] == "busy"
    assert set(names[3:]) == {"gpu1", "new", "ok1"}
    assert lines[0].split()[:5] == ["NAME", "MAC", "IP", "POOL", "STAGE"]
    assert "initrd (stalled)" in table(ANSWER, wide=False, colour=False)
    assert lines[-1] == "6 nodes: 1 failed, 2 joined, 1 never-seen, 1 rootfs, 1 stalled"


def test_colour_only_when_asked() -> None:
    plain = table(ANSWER, wide=False, colour=False)
    assert "\033[" not in plain
    coloured = table(ANSWER, wide=False, colour=True)
    assert f"{RED}bad" in coloured and f"{GREEN}ok1" in coloured and RESET in coloured


def test_filters_and_wide() -> None:
    assert "gpu1" in table(ANSWER, wide=False, colour=False, pool="gpu")
    assert "ok1" not in table(ANSWER, wide=False, colour=False, pool="gpu")
    stalled = table(ANSWER, wide=False, colour=False, stage="stalled")
    assert "slow" in stalled and "busy" not in stalled
    wide = table(ANSWER, wide=True, colour=False)
    assert "ATTEMPTS" in wide and "FIRST SEEN" in wide


def test_durations() -> None:
    assert duration(None) == "-" and duration(4.25) == "4.2s"
    assert duration(125) == "2m05s" and duration(7300) == "2h01m" and duration(200000) == "2d07h"
    assert ago(90.0, 100.0) == "10.0s ago" and ago(None, 1) == "-"


def test_timeline() -> None:
    answer = {**row("ok1", "joined"), "now": 100.0, "history": [{
        "number": 3, "started": 10.0, "outcome": "joined", "duration": 20.0,
        "steps": [{"stage": "dhcp-discover", "offset": 0.0, "duration": 0.1, "outcome": "ok",
                   "detail": {"firmware": "bios"}},
                  {"stage": "joined", "offset": 20.0, "duration": None, "outcome": "ok",
                   "detail": {}}]}]}
    text = timeline(answer)
    assert "attempt 3" in text and "joined" in text
    assert "+    0.000s  dhcp-discover        0.1s  firmware=bios" in text


def test_node_supplied_text_cannot_drive_the_terminal() -> None:
    """An event message with a clear-screen, colours and an OSC title is shown escaped."""
    from bootd.ops.text import printable

    evil = "boom\x1b[2J\x1b[31mred\x1b]0;owned\x07\x9b"
    row = {"node": "n\x1b[2J", "mac": "m", "ip": "1.2.3.4", "pool": "p", "stage": "failed",
           "stalled": False, "since": 0.0, "first_seen": 0.0, "last_seen": 0.0,
           "attempts": 1, "last_error": f"failed: {evil}", "last_boot_time": None}
    out = table({"now": 1.0, "nodes": [row]}, wide=True, colour=False)
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "boom\\x1b[2J\\x1b[31mred\\x1b]0;owned\\x07\\x9b" in out
    detail = {**row, "now": 1.0, "history": [{"number": 1, "started": 0.0, "outcome": "failed",
                                  "duration": 1.0, "steps": [{
                                      "stage": "failed", "offset": 0.0, "duration": None,
                                      "outcome": "error", "detail": {"message": evil}}]}]}
    text = timeline(detail)
    assert "\x1b" not in text and "\x07" not in text
    assert printable("tab\there") == "tab\\x09here"
