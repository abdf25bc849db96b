"""sd_notify over a real unix datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bootd.ops.sdnotify import Notifier


def listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    return s


def test_ready_status_stopping(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with listener(path) as s:
        n = Notifier({"NOTIFY_SOCKET": path})
        assert n.enabled and n.ready("serving 3 nodes")
        assert s.recv(4096) == b"READY=1\nSTATUS=serving 3 nodes"
        assert n.reloading() and s.recv(4096) == b"RELOADING=1"
        assert n.stopping() and s.recv(4096) == b"STOPPING=1"
        assert n.watchdog() and s.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket() -> None:
    name = f"bootd-test-{os.getpid()}"
    with listener("\0" + name) as s:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("x")
        assert s.recv(4096) == b"STATUS=x"


def test_outside_systemd_is_a_no_op(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and n.watchdog_interval is None
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready("x")


def test_watchdog_interval() -> None:
    assert Notifier({"WATCHDOG_USEC": "20000000"}).watchdog_interval == 10.0
    other_pid = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}
    assert Notifier(other_pid).watchdog_interval is (None if os.getpid() != 1 else 10.0)
    assert Notifier({"WATCHDOG_USEC": "junk"}).watchdog_interval is None
