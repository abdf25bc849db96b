#!/usr/bin/env python3
"""DHCP benchmark: perfdhcp against bootd and dnsmasq, in the same namespaces, same run.

    sudo python bench/dhcp.py                 # 1,000/s for 10 s (10,000 clients), then a ramp
    sudo python bench/dhcp.py --rates 1000 --seconds 10

For each server and rate it prints the achieved 4-way exchange rate, drops, median and p99
DISCOVER->OFFER and REQUEST->ACK latency, and the server's CPU seconds, then bootd/dnsmasq
ratios. perfdhcp acts as a relay (giaddr = its own address), so both servers answer
unicast to it. Every run is bounded by perfdhcp's -p and a timeout; traffic stays inside
the namespaces this script creates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.lab.netlab import NetLab, netns_available

SERVER_IP = "10.78.0.1"
CLIENT_IP = "10.78.0.2"
RANGE = ("10.78.1.0", "10.78.255.254")


@dataclass
class Result:
    server: str
    rate: int
    achieved: float
    sent: int
    received: int
    median_ms: float
    p99_ms: float
    cpu_s: float

    @property
    def drops(self) -> int:
        return self.sent - self.received

    @property
    def drop_pct(self) -> float:
        return 100.0 * self.drops / self.sent if self.sent else 100.0


def per_exchange(r: Result) -> float:
    return r.cpu_s / r.received if r.received else float("inf")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process and its reaped children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def start_bootd(lab: NetLab, ns: str, tmp: Path) -> subprocess.Popen[bytes]:
    state = tmp / "bootd-state"
    shutil.rmtree(state, ignore_errors=True)
    config = tmp / "bootd.yaml"
    config.write_text(
        f"server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {state}}}\n"
        f"network: {{subnet: 10.78.0.0/16, lease_time: 1h}}\n"
        f"pools:\n  - name: any\n    dynamic: {{range: {RANGE[0]}-{RANGE[1]}}}\n")
    log = tmp / "bootd.log"
    log.unlink(missing_ok=True)
    return lab.start_bootd(ns, config, log)


def start_dnsmasq(lab: NetLab, ns: str, tmp: Path) -> subprocess.Popen[bytes]:
    leases = tmp / "dnsmasq.leases"
    leases.unlink(missing_ok=True)
    log = tmp / "dnsmasq.log"
    # Defaults a fleet operator would change for load: no ping-before-offer, a lease limit
    # that fits the test; DHCP transactions are logged as they are by default.
    proc = lab.spawn(ns, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=srv0",
        "--bind-interfaces", f"--dhcp-range={RANGE[0]},{RANGE[1]},255.255.0.0,1h",
        f"--dhcp-leasefile={leases}", "--dhcp-lease-max=200000", "--no-ping",
        "--dhcp-authoritative", "--log-facility=-", "--user=root", "--group=root",
        f"--pid-file={tmp / 'dnsmasq.pid'}"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for(log, "DHCP, IP range", proc)
    return proc


def wait_for(log: Path, marker: str, proc: subprocess.Popen[bytes], timeout: float = 15,
             ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and marker in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"server did not start: {log.read_text(errors='replace')[-2000:]}")


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    """`ip netns exec` execs the command, so the child PID is the server's."""
    return proc.pid


_TS = re.compile(r"sent / received: (\d+\.\d+) / (\d+\.\d+)")


def parse_perfdhcp(out: str) -> tuple[float, int, int, list[float]]:
    rate = re.search(r"Rate: ([\d.]+) 4-way", out)
    sent = [int(x) for x in re.findall(r"sent packets: (\d+)", out)]
    received = [int(x) for x in re.findall(r"received packets: (\d+)", out)]
    delays = [(float(b) - float(a)) * 1000 for a, b in _TS.findall(out)]
    if not rate or len(sent) < 2:
        raise SystemExit(f"cannot parse perfdhcp output:\n{out[-3000:]}")
    # a 4-way exchange completes when its ACK arrives: count REQUEST-ACK
    return float(rate.group(1)), sent[0], received[1], delays


def run_one(lab: NetLab, server: str, srv_ns: str, cli_ns: str, tmp: Path, rate: int,
            seconds: int, clients: int) -> Result:
    proc = (start_bootd if server == "bootd" else start_dnsmasq)(lab, srv_ns, tmp)
    pid = server_pid(proc)
    time.sleep(0.5)
    cpu0 = cpu_seconds(pid)
    out = lab.run(cli_ns, [
        "perfdhcp", "-4", "-g", "single", "-l", "cli0", "-r", str(rate), "-R", str(clients),
        "-p", str(seconds), "-t", "1", "-x", "t", SERVER_IP],
        check=False, timeout=seconds + 60).stdout
    cpu = cpu_seconds(pid) - cpu0
    lab.stop(proc)
    achieved, sent, received, delays = parse_perfdhcp(out)
    delays.sort()
    median = statistics.median(delays) if delays else float("nan")
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))] if delays else float("nan")
    return Result(server, rate, achieved, sent, received, median, p99, cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="250,1000,2000,4000",
                        help="comma-separated target exchange rates (default 250,1000,2000,4000)")
    parser.add_argument("--seconds", type=int, default=10, help="per run (default 10)")
    parser.add_argument("--clients", type=int, default=10000,
                        help="distinct client MACs (default 10,000)")
    parser.add_argument("--servers", default="dnsmasq,bootd")
    args = parser.parse_args()
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    for tool in ("perfdhcp", "dnsmasq"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (apt-get install kea-admin dnsmasq-base)")
    rates = [int(r) for r in args.rates.split(",")]
    servers = args.servers.split(",")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bootd-bench-") as d, NetLab("bdb") as lab:
        tmp = Path(d)
        srv, cli = lab.namespace("s"), lab.namespace("c")
        lab.veth(srv, "srv0", cli, "cli0")
        lab.address(srv, "srv0", f"{SERVER_IP}/16")
        lab.address(cli, "cli0", f"{CLIENT_IP}/16")
        for rate in rates:
            for server in servers:
                r = run_one(lab, server, srv, cli, tmp, rate, args.seconds, args.clients)
                results.append(r)
                print(f"  {server:8} @ {rate:5}/s: {r.achieved:8.1f} exch/s, "
                      f"{r.drops} drops", flush=True)

    print()
    print(f"perfdhcp -r RATE -R {args.clients} -p {args.seconds}, relay mode, "
          "2 cores shared with the client")
    print(f"{'server':8} {'rate':>6} {'achieved/s':>11} {'sent':>7} {'drops':>6} {'drop%':>6} "
          f"{'median ms':>10} {'p99 ms':>8} {'cpu s':>6} {'cpu us/exch':>11}")
    for r in results:
        per_k = per_exchange(r) * 1e6
        print(f"{r.server:8} {r.rate:6} {r.achieved:11.1f} {r.sent:7} {r.drops:6} "
              f"{r.drop_pct:6.2f} {r.median_ms:10.3f} {r.p99_ms:8.3f} {r.cpu_s:6.2f} "
              f"{per_k:11.1f}")
    if {"bootd", "dnsmasq"} <= set(servers):
        print()
        print("ratios bootd/dnsmasq (exchange rate: higher is better; latency, CPU: lower)")
        for rate in rates:
            b = next(r for r in results if r.server == "bootd" and r.rate == rate)
            d = next(r for r in results if r.server == "dnsmasq" and r.rate == rate)
            completed = (b.received / d.received) if d.received else float("inf")
            print(f"  @ {rate:5}/s: completed exchanges x{completed:.2f}, "
                  f"median latency x{b.median_ms / d.median_ms:.3g}, "
                  f"p99 x{b.p99_ms / d.p99_ms:.3g}, "
                  f"cpu per exchange x{per_exchange(b) / per_exchange(d):.2f}")
        peak = {s: max(r.received / args.seconds for r in results if r.server == s)
                for s in servers}
        clean = {s: max((r.received / args.seconds for r in results
                         if r.server == s and r.drops == 0), default=0.0) for s in servers}
        print(f"  peak completed exchanges/s: bootd {peak['bootd']:.0f}, dnsmasq "
              f"{peak['dnsmasq']:.0f}, ratio x{peak['bootd'] / max(peak['dnsmasq'], 1):.2f}")
        print(f"  highest tested rate with zero drops: bootd {clean['bootd']:.0f}/s, "
              f"dnsmasq {clean['dnsmasq']:.0f}/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
