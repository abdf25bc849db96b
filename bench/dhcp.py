#!/usr/bin/env python3
"""DHCP benchmark: perfdhcp against bootd, Kea and dnsmasq, same namespaces, same run.

    python bench/dhcp.py                      # as root: 250..4,000/s, 10 s each
    python bench/dhcp.py --rates 1000,4000 --seconds 10 --servers kea,bootd
    python bench/dhcp.py --relays 4           # relayed traffic from 4 rack subnets
    python bench/dhcp.py --servers bootd --profile /tmp/prof   # where bootd's time goes

For each server and rate it prints the achieved 4-way exchange rate, drops, median and p99
DISCOVER->OFFER and REQUEST->ACK latency, and the server's CPU seconds, then ratios of
bootd against Kea (the anchor: kea-dhcp4 2.2 with a persisted memfile) and dnsmasq (a
floor). perfdhcp acts as a relay (giaddr = its own address), so every server answers
unicast to it. With `--relays N` there are N relays: N client namespaces, each cabled to
the server on its own rack subnet and running its own perfdhcp at RATE/N (its address is
the giaddr), and every server serves the N rack subnets. (perfdhcp's own -J, one process
naming several giaddrs, is not used: its replies come back to addresses it does not
own.) Every run is bounded by
perfdhcp's -p and a timeout; traffic stays inside the namespaces this script creates.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.lab.netlab import NetLab, netns_available

SERVER_IP = "10.78.0.1"
CLIENT_IP = "10.78.0.2"
RANGE = ("10.78.1.0", "10.78.255.254")
ROOT = Path(__file__).resolve().parents[1]


def kea_binary() -> str | None:
    """kea-dhcp4 unpacked by scripts/install-deps (no service started), else installed."""
    unpacked = ROOT / ".cache" / "incumbents" / "usr" / "sbin" / "kea-dhcp4"
    return str(unpacked) if unpacked.exists() else shutil.which("kea-dhcp4")


@dataclass
class Plan:
    """The address plan every server gets: one /16, or N relayed rack /16s."""

    relays: int
    relay_namespaces: list[str] = field(default_factory=list)

    def racks(self) -> list[tuple[str, str, str, str]]:
        """(subnet, relay address = giaddr, first, last) per rack."""
        # a /16 each: a range must outlast -R clients at the highest rate
        return [(f"10.{80 + n}.0.0/16", f"10.{80 + n}.0.1", f"10.{80 + n}.1.0",
                 f"10.{80 + n}.255.254") for n in range(1, self.relays + 1)]

    def server_address(self, n: int) -> str:
        """The server's own address on rack n's leg: where that relay sends."""
        return f"10.{80 + n}.0.254"

    @property
    def interfaces(self) -> list[str]:
        """The server's DHCP interfaces: one leg, or one per relay."""
        return [f"rly{n}" for n in range(1, self.relays + 1)] if self.relays else ["srv0"]

    def ranges(self) -> list[tuple[str, str, str]]:
        """(subnet, first, last) of every range."""
        if not self.relays:
            return [("10.78.0.0/16", *RANGE)]
        return [(s, a, b) for s, _, a, b in self.racks()]


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


def start_bootd(lab: NetLab, ns: str, tmp: Path, plan: Plan) -> subprocess.Popen[bytes]:
    state = tmp / "bootd-state"
    shutil.rmtree(state, ignore_errors=True)
    config = tmp / "bootd.yaml"
    networks = "".join(f"  - {{name: rack{i + 1}, subnet: {s}, gateway: {g}, "
                       f"next_server: {plan.server_address(i + 1)}}}\n"
                       for i, (s, g, _, _) in enumerate(plan.racks()))
    ranges = ", ".join(f"{a}-{b}" for _, a, b in plan.ranges())
    config.write_text(
        f"server: {{interfaces: [{', '.join(plan.interfaces)}], address: {SERVER_IP}, "
        f"state_dir: {state}}}\n"
        "networks:\n  - {name: core, subnet: 10.78.0.0/16, lease_time: 1h}\n" + networks
        + f"pools:\n  - name: any\n    dynamic: {{ranges: [{ranges}]}}\n")
    log = tmp / "bootd.log"
    log.unlink(missing_ok=True)
    return lab.start_bootd(ns, config, log)


def start_kea(lab: NetLab, ns: str, tmp: Path, plan: Plan) -> subprocess.Popen[bytes]:
    """kea-dhcp4 as Debian configures it (memfile, persisted; INFO logging), UDP sockets
    since every client here is relayed."""
    leases = tmp / "kea-leases4.csv"
    for old in tmp.glob("kea-leases4.csv*"):
        old.unlink()
    log = tmp / "kea.log"
    log.unlink(missing_ok=True)
    config = tmp / "kea-dhcp4.conf"
    config.write_text(json.dumps({"Dhcp4": {
        "interfaces-config": {"interfaces": plan.interfaces, "dhcp-socket-type": "udp"},
        "lease-database": {"type": "memfile", "persist": True, "name": str(leases),
                           "lfc-interval": 0},
        "valid-lifetime": 3600, "authoritative": True,
        "subnet4": [{"id": i + 1, "subnet": s, "pools": [{"pool": f"{a} - {b}"}]}
                    for i, (s, a, b) in enumerate(plan.ranges())],
        "loggers": [{"name": "kea-dhcp4", "severity": "INFO",
                     "output_options": [{"output": str(log)}]}],
    }}))
    kea = kea_binary()
    assert kea is not None
    proc = lab.spawn(ns, ["env", f"KEA_PIDFILE_DIR={tmp}", f"KEA_LOCKFILE_DIR={tmp}",
                          kea, "-c", str(config)],
                     stdout=subprocess.DEVNULL, stderr=(tmp / "kea.err").open("wb"))
    wait_for(log, "DHCP4_STARTED", proc)
    return proc


def start_dnsmasq(lab: NetLab, ns: str, tmp: Path, plan: Plan) -> subprocess.Popen[bytes]:
    leases = tmp / "dnsmasq.leases"
    leases.unlink(missing_ok=True)
    log = tmp / "dnsmasq.log"
    ranges = [f"--dhcp-range={a},{b},255.255.0.0,1h" for _, a, b in plan.ranges()]
    # Defaults a fleet operator would change for load: no ping-before-offer, a lease limit
    # that fits the test; DHCP transactions are logged as they are by default.
    proc = lab.spawn(ns, [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
        *(f"--interface={name}" for name in plan.interfaces),
        "--bind-interfaces", *ranges,
        f"--dhcp-leasefile={leases}", "--dhcp-lease-max=200000", "--no-ping",
        "--dhcp-authoritative", "--log-facility=-", "--user=root", "--group=root",
        f"--pid-file={tmp / 'dnsmasq.pid'}"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_for(log, "DHCP, IP range", proc)
    return proc


STARTERS = {"bootd": start_bootd, "kea": start_kea, "dnsmasq": start_dnsmasq}


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
    """`ip netns exec` (and `env`) exec the command, so the child PID is the server's."""
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
            seconds: int, clients: int, plan: Plan, profile: Path | None = None) -> Result:
    proc = STARTERS[server](lab, srv_ns, tmp, plan)
    pid = server_pid(proc)
    time.sleep(0.5)
    spy = None
    if profile is not None and server == "bootd":
        # py-spy samples the running daemon from outside (no instrumentation to skew it)
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--format", "raw",
                                "--rate", "200", "--duration", str(seconds), "--nonblocking",
                                "-o", str(profile / f"bootd-{rate}.txt")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0 = cpu_seconds(pid)
    # one perfdhcp per relay, at the same time, each with its share of rate and clients
    legs = ([(ns, plan.server_address(n)) for n, ns in enumerate(plan.relay_namespaces, 1)]
            or [(cli_ns, SERVER_IP)])
    runs = [lab.spawn(ns, [
        "perfdhcp", "-4", "-g", "single", "-l", "cli0", "-r", str(max(1, rate // len(legs))),
        "-R", str(clients // len(legs)), "-p", str(seconds), "-t", "1", "-x", "t",
        "-b", f"mac=02:{0x10 + i:02x}:00:00:00:00", target],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for i, (ns, target) in enumerate(legs)]
    outs = [run.communicate(timeout=seconds + 60)[0].decode() for run in runs]
    cpu = cpu_seconds(pid) - cpu0
    if spy is not None:
        spy.wait(timeout=60)
    lab.stop(proc)
    parsed = [parse_perfdhcp(out) for out in outs]
    achieved = sum(p[0] for p in parsed)
    sent, received = sum(p[1] for p in parsed), sum(p[2] for p in parsed)
    delays = [d for p in parsed for d in p[3]]
    delays.sort()
    median = statistics.median(delays) if delays else float("nan")
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))] if delays else float("nan")
    return Result(server, rate, achieved, sent, received, median, p99, cpu)


def py_spy() -> str:
    found = Path(sys.executable).with_name("py-spy")
    if found.exists():
        return str(found)
    if (which := shutil.which("py-spy")) is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return which


# where a sample of bootd's DHCP path is counted: the first of these on its stack (leaf
# first), else "other" (asyncio, TFTP/HTTP idle work, the event flusher, GC)
BUCKETS = (("encode reply", "packet.py", "encode"), ("decode request", "packet.py", "decode"),
           ("lease store commit", "service.py", "_persist"),
           ("log lines", "service.py", "_log"), ("boot events", "service.py", "_record"),
           ("metrics", "values.py", ""), ("decide", "decide.py", "decide"),
           ("sendto + ARP", "transport.py", "send"),
           ("event flush to SQLite", "recorder.py", "flush"),
           ("read socket, sort", "transport.py", "_drain"))


def print_profile(path: Path) -> None:
    """Where bootd's samples went: by step of the data path, and the top leaf functions."""
    steps: dict[str, int] = {}
    leaves: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        # a frame is "function (path/file.py:line)"
        frames = [(f.split(" (")[0], f.rsplit("/", 1)[-1].split(":")[0])
                  for f in stack.split(";")]
        bucket = next((label for label, file, function in BUCKETS
                       if any(fi == file and fu.endswith(function) for fu, fi in frames)),
                      "other")
        steps[bucket] = steps.get(bucket, 0) + count
        leaf = f"{frames[-1][1]}:{frames[-1][0]}"
        leaves[leaf] = leaves.get(leaf, 0) + count
    if not total:
        print(f"  (no samples in {path})")
        return
    print(f"  {path.name}: {total} samples")
    for label, count in sorted(steps.items(), key=lambda kv: -kv[1]):
        print(f"    {label:24} {100 * count / total:5.1f} %")
    print("    top functions (self):")
    for name, count in sorted(leaves.items(), key=lambda kv: -kv[1])[:12]:
        print(f"      {name:40} {100 * count / total:5.1f} %")


def relay_setup(lab: NetLab, srv: str, plan: Plan) -> None:
    """N relay namespaces, each cabled to the server on its own rack subnet: the server's
    leg is rlyN (10.(80+N).0.254), the relay's cli0 is 10.(80+N).0.1, perfdhcp's giaddr."""
    for n, (subnet, relay, _, _) in enumerate(plan.racks(), start=1):
        ns = lab.namespace(f"r{n}")
        lab.veth(srv, f"rly{n}", ns, "cli0")
        prefix = subnet.split("/")[1]
        lab.address(srv, f"rly{n}", f"10.{80 + n}.0.254/{prefix}")
        lab.address(ns, "cli0", f"{relay}/{prefix}")
        plan.relay_namespaces.append(ns)


def print_ratios(results: list[Result], mine: str, other: str, rates: list[int],
                 seconds: int) -> None:
    print()
    print(f"ratios {mine}/{other} (exchange rate: higher is better; latency, CPU: lower)")
    for rate in rates:
        b = next(r for r in results if r.server == mine and r.rate == rate)
        d = next(r for r in results if r.server == other and r.rate == rate)
        completed = (b.received / d.received) if d.received else float("inf")
        print(f"  @ {rate:5}/s: completed exchanges x{completed:.2f}, "
              f"median latency x{b.median_ms / d.median_ms:.3g}, "
              f"p99 x{b.p99_ms / d.p99_ms:.3g}, "
              f"cpu per exchange x{per_exchange(b) / per_exchange(d):.2f}")
    peak = {s: max(r.received / seconds for r in results if r.server == s)
            for s in (mine, other)}
    clean = {s: max((r.received / seconds for r in results
                     if r.server == s and r.drops == 0), default=0.0) for s in (mine, other)}
    print(f"  peak completed exchanges/s: {mine} {peak[mine]:.0f}, {other} {peak[other]:.0f},"
          f" ratio x{peak[mine] / max(peak[other], 1):.2f}")
    print(f"  highest tested rate with zero drops: {mine} {clean[mine]:.0f}/s, "
          f"{other} {clean[other]:.0f}/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="250,1000,2000,4000",
                        help="comma-separated target exchange rates (default 250,1000,2000,4000)")
    parser.add_argument("--seconds", type=int, default=10, help="per run (default 10)")
    parser.add_argument("--clients", type=int, default=10000,
                        help="distinct client MACs (default 10,000)")
    parser.add_argument("--servers", default="kea,dnsmasq,bootd")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample bootd with py-spy during its runs; the raw stacks go "
                        "to DIR and a breakdown by step is printed")
    parser.add_argument("--relays", type=int, default=0,
                        help="spread exchanges over N relays (rack subnets; default 0: one "
                        "subnet, perfdhcp's own address as giaddr)")
    args = parser.parse_args()
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    servers = args.servers.split(",")
    needed = {"perfdhcp": "kea-admin", "dnsmasq": "dnsmasq-base"}
    for tool, package in needed.items():
        if shutil.which(tool) is None and (tool != "dnsmasq" or "dnsmasq" in servers):
            raise SystemExit(f"needs {tool} (apt-get install {package})")
    if "kea" in servers and kea_binary() is None:
        raise SystemExit("needs kea-dhcp4 (scripts/install-deps unpacks it into .cache/)")
    rates = [int(r) for r in args.rates.split(",")]
    plan = Plan(args.relays)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bootd-bench-") as d, NetLab("bdb") as lab:
        tmp = Path(d)
        srv, cli = lab.namespace("s"), lab.namespace("c")
        lab.veth(srv, "srv0", cli, "cli0")
        lab.address(srv, "srv0", f"{SERVER_IP}/16")
        lab.address(cli, "cli0", f"{CLIENT_IP}/16")
        if plan.relays:
            relay_setup(lab, srv, plan)
        for rate in rates:
            for server in servers:
                r = run_one(lab, server, srv, cli, tmp, rate, args.seconds, args.clients,
                            plan, args.profile)
                results.append(r)
                print(f"  {server:8} @ {rate:5}/s: {r.achieved:8.1f} exch/s, "
                      f"{r.drops} drops", flush=True)

    print()
    where = (f"{plan.relays} relays (rack /24s)" if plan.relays
             else "one relay (perfdhcp's own address)")
    print(f"perfdhcp -r RATE -R {args.clients} -p {args.seconds}, {where}, "
          "2 cores shared with the client")
    print(f"{'server':8} {'rate':>6} {'achieved/s':>11} {'sent':>7} {'drops':>6} {'drop%':>6} "
          f"{'median ms':>10} {'p99 ms':>8} {'cpu s':>6} {'cpu us/exch':>11}")
    for r in results:
        per_k = per_exchange(r) * 1e6
        print(f"{r.server:8} {r.rate:6} {r.achieved:11.1f} {r.sent:7} {r.drops:6} "
              f"{r.drop_pct:6.2f} {r.median_ms:10.3f} {r.p99_ms:8.3f} {r.cpu_s:6.2f} "
              f"{per_k:11.1f}")
    for other in ("kea", "dnsmasq"):
        if {"bootd", other} <= set(servers):
            print_ratios(results, "bootd", other, rates, args.seconds)
    if args.profile is not None and "bootd" in servers:
        print("\nbootd profile (py-spy, 200 samples/s, share of samples):")
        for rate in rates:
            print_profile(args.profile / f"bootd-{rate}.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
