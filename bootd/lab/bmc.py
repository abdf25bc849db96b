"""A real IPMI BMC in front of a lab machine: OpenIPMI's ipmi_sim with chassis control.

ipmi_sim speaks IPMI over LAN (RMCP+, port 623) like a server's BMC. For power and boot
device it runs a `chassis_control` program (`PROG get power boot`, `PROG set power 1`,
`PROG set reset 1`, `PROG set boot pxe`); ours starts the machine's command on power on,
kills it on power off, does both on reset, and records the boot device, which a power-on
consumes (a one-time boot device, as `bootd power NODE pxe` asks for). Every power-on is
appended to `events` with the boot device it used. QEMU's own `ipmi-bmc-extern` route
cannot set a boot device (../shared/LAB.md), hence this one.

The machine runs in its own session; `close()` ends it by the PID it recorded.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from bootd.lab.netlab import LabError, NetLab

USERNAME = "admin"

_CONTROL = """#!/bin/sh
# chassis_control for ipmi_sim (written by bootd.lab.bmc): power is whether the machine
# runs; a power-on consumes the one-time boot device
dir={dir}
running() {{ [ -s "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; }}
start() {{
    running && return 0
    boot=$(cat "$dir/bootdev" 2>/dev/null || echo default)
    echo "$(date +%s.%N) on boot=$boot" >> "$dir/events"
    echo default > "$dir/bootdev"
    setsid sh "$dir/machine.sh" </dev/null >>"$dir/machine.log" 2>&1 &
    echo $! > "$dir/pid"
}}
stop() {{
    running || return 0
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    rm -f "$dir/pid"
    echo "$(date +%s.%N) off" >> "$dir/events"
}}
op=$1; shift
case "$op" in
get)
    for p in "$@"; do
        case "$p" in
        power) if running; then echo "power:1"; else echo "power:0"; fi ;;
        boot) echo "boot:$(cat "$dir/bootdev" 2>/dev/null || echo default)" ;;
        esac
    done ;;
set)
    while [ $# -ge 2 ]; do
        case "$1" in
        power) if [ "$2" = 1 ]; then start; else stop; fi ;;
        reset) stop; start ;;
        boot) echo "$2" > "$dir/bootdev" ;;
        esac
        shift 2
    done ;;
esac
exit 0
"""

_LAN = """name "{name}"
set_working_mc 0x20
  startlan 1
    addr {address} 623
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid a123456789abcdefa123456789abcdef
  endlan
  chassis_control "{control}"
  user 2 true "{user}" "{password}" admin 10 none md2 md5 straight
"""

_EMU = """mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
mc_enable 0x20
"""


class LabBmc:
    """ipmi_sim at `address`:623 in `ns`, powering `machine` (a command run in `ns`)."""

    def __init__(self, lab: NetLab, ns: str, address: str, workdir: Path,
                 machine: Sequence[str], password: str, name: str = "bmc") -> None:
        self.lab, self.ns, self.address, self.dir = lab, ns, address, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "state").mkdir(exist_ok=True)
        control = workdir / "chassis_control"
        control.write_text(_CONTROL.format(dir=shlex.quote(str(workdir))))
        control.chmod(0o755)
        (workdir / "machine.sh").write_text("exec " + shlex.join(machine) + "\n")
        (workdir / "lan.conf").write_text(_LAN.format(name=name, address=address,
                                                      control=control, user=USERNAME,
                                                      password=password))
        (workdir / "bmc.emu").write_text(_EMU)
        self.proc = lab.spawn(ns, ["ipmi_sim", "-c", str(workdir / "lan.conf"),
                                   "-f", str(workdir / "bmc.emu"),
                                   "-s", str(workdir / "state"), "-n"],
                              stdout=(workdir / "ipmi_sim.log").open("wb"),
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"ipmi_sim did not start: "
                               f"{(workdir / 'ipmi_sim.log').read_text()[-500:]}")
            time.sleep(0.1)

    def _listening(self) -> bool:
        out = self.lab.run(self.ns, ["ss", "-uln"], check=False).stdout
        return f"{self.address}:623" in out

    def events(self) -> list[str]:
        """Every power-on ("on boot=pxe") and power-off seen, oldest first."""
        try:
            return [line.split(" ", 1)[1] for line in
                    (self.dir / "events").read_text().splitlines()]
        except FileNotFoundError:
            return []

    def running(self) -> bool:
        try:
            pid = int((self.dir / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        """The machine (by the PID it recorded), then ipmi_sim."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.dir / "pid").read_text()), signal.SIGKILL)
        self.lab.stop(self.proc)
