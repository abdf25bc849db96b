"""Cluster-mode benchmark: DHCP exchanges/s with 1, 2 and 3 bootd members on one etcd and
on a 3-member etcd, the cost of one claim, and Kea's single-server figure, same run.

    python bench/cluster.py                          # as root: rates 500,1500, 8 s each
    python bench/cluster.py --rates 1000 --seconds 5 --members 1,3 --etcd 3
    python bench/cluster.py --members 1 --etcd 1 --profile /tmp/prof   # where m1's time goes

Every process sits in a namespace this script creates, cabled to one bridge:

    e1 e2 e3 (etcd 10.79.0.21-23)   m1 m2 m3 (bootd 10.79.0.11-13)   kea (10.79.0.30)
           \\____________________ sw: br0 ____________________/       c (perfdhcp)

perfdhcp broadcasts from the client namespace (its own address is the giaddr), so every
member hears every client and the owner answers; Kea runs alone for its reference run.
A claim is one compare-and-swap transaction; its cost is measured with the same client
library bootd uses (aetcd), one claim at a time, and from bootd's own histogram of a
batch's claims. Each run is bounded by perfdhcp's -p and a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.lab.netlab import NetLab, netns_available

_spec = importlib.util.spec_from_file_location("bench_dhcp", Path(__file__).with_name(
    "dhcp.py"))
assert _spec is not None and _spec.loader is not None
bench_dhcp = importlib.util.module_from_spec(_spec)
sys.modules["bench_dhcp"] = bench_dhcp  # its dataclasses look their module up
_spec.loader.exec_module(bench_dhcp)
sys.path[0] = str(Path(__file__).resolve().parents[1])  # it set this too; keep it so

SUBNET = "10.79.0.0/16"
CLIENT_IP = "10.79.0.2"
KEA_IP = "10.79.0.30"
FIRST, LAST = "10.79.1.0", "10.79.255.254"


def member_ip(n: int) -> str:
    return f"10.79.0.{10 + n}"


def etcd_ip(n: int) -> str:
    return f"10.79.0.{20 + n}"


@dataclass
class Run:
    label: str
    rate: int
    achieved: float
    sent: int
    received: int
    p99_ms: float
    claim_batch_ms: float | None = None
    bootd_cpu_us: float | None = None  # all members' CPU per completed exchange
    etcd_cpu_us: float | None = None

    @property
    def drop_pct(self) -> float:
        return 100.0 * (self.sent - self.received) / self.sent if self.sent else 100.0


class Lab:
    def __init__(self, lab: NetLab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.sw = lab.namespace("sw")
        lab.bridge(self.sw, "br0")
        self.ns: dict[str, str] = {}
        for name, address in [("c", CLIENT_IP), ("kea", KEA_IP),
                              *((f"m{n}", member_ip(n)) for n in (1, 2, 3)),
                              *((f"e{n}", etcd_ip(n)) for n in (1, 2, 3))]:
            ns = self.ns[name] = lab.namespace(name)
            lab.veth(self.sw, f"p{name}", ns, "srv0" if name != "c" else "cli0")
            lab.attach(self.sw, f"p{name}", "br0")
            lab.address(ns, "srv0" if name != "c" else "cli0", f"{address}/16")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start_etcd(self, count: int) -> list[str]:
        """A fresh etcd of `count` members; its client URLs."""
        names = [f"e{n}" for n in range(1, count + 1)]
        cluster = ",".join(f"{e}=http://{etcd_ip(int(e[1]))}:2380" for e in names)
        for e in names:
            ip = etcd_ip(int(e[1]))
            data = self.tmp / f"{e}-{count}.etcd"
            shutil.rmtree(data, ignore_errors=True)
            log = (self.tmp / f"{e}.log").open("ab")
            self.procs[e] = self.lab.spawn(self.ns[e], [
                "etcd", "--name", e, "--data-dir", str(data),
                "--listen-client-urls", f"http://{ip}:2379",
                "--advertise-client-urls", f"http://{ip}:2379",
                "--listen-peer-urls", f"http://{ip}:2380",
                "--initial-advertise-peer-urls", f"http://{ip}:2380",
                "--initial-cluster", cluster, "--initial-cluster-state", "new"],
                stdout=log, stderr=log)
        urls = [f"http://{etcd_ip(int(e[1]))}:2379" for e in names]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            put = self.lab.run(self.ns["c"], ["etcdctl", "--endpoints", ",".join(urls),
                                              "--command-timeout=2s", "put", "/ready", "1"],
                               check=False)
            if put.returncode == 0:
                return urls
            time.sleep(0.3)
        raise SystemExit("etcd did not become healthy")

    def start_members(self, count: int, urls: list[str]) -> None:
        """`count` members on a clean prefix (no leases left by the run before)."""
        self.lab.run(self.ns["c"], ["etcdctl", "--endpoints", ",".join(urls), "del",
                                    "--prefix", "/bootd/"])
        for n in range(1, count + 1):
            name = f"m{n}"
            state = self.tmp / name
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir()
            config = self.tmp / f"{name}.yaml"
            config.write_text(
                f"server: {{interfaces: [srv0], address: {member_ip(n)}, state_dir: {state},"
                f" api: {state}/api.sock}}\n"
                f"network: {{subnet: {SUBNET}, lease_time: 1h}}\n"
                f"cluster: {{member: {name}, etcd: {{endpoints: [{', '.join(urls)}]}}}}\n"
                f"pools:\n  - name: any\n    dynamic: {{range: {FIRST}-{LAST}}}\n")
            log = self.tmp / f"{name}.log"
            log.unlink(missing_ok=True)
            self.procs[name] = self.lab.start_bootd(self.ns[name], config, log, timeout=30)
        # every member registered and seeing all the others
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = [self.members_seen(f"m{n}") for n in range(1, count + 1)]
            if all(s == count for s in seen):
                return
            time.sleep(0.3)
        raise SystemExit(f"members did not see each other: {seen}")

    def members_seen(self, name: str) -> int:
        doc = self.api(name, "/api/v1/cluster")
        return len(doc["members"]) if doc and doc.get("registered") else 0

    def api(self, name: str, path: str) -> dict[str, object] | None:
        out = subprocess.run(["curl", "-s", "--unix-socket",
                              str(self.tmp / name / "api.sock"), f"http://bootd{path}"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        try:
            doc = json.loads(out)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def claim_batch_ms(self, names: list[str]) -> float | None:
        """Mean time of one batch's claims, from the members' own histograms."""
        total = count = 0.0
        for name in names:
            text = subprocess.run(["curl", "-s", "--unix-socket",
                                   str(self.tmp / name / "api.sock"), "http://bootd/metrics"],
                                  capture_output=True, text=True, timeout=10,
                                  check=False).stdout
            for line in text.splitlines():
                if line.startswith("bootd_cluster_claim_seconds_sum"):
                    total += float(line.split()[-1])
                elif line.startswith("bootd_cluster_claim_seconds_count"):
                    count += float(line.split()[-1])
        return 1000 * total / count if count else None

    def stop(self, *names: str) -> None:
        for name in names:
            proc = self.procs.pop(name, None)
            if proc is not None:
                self.lab.stop(proc)

    def cpu(self, prefix: str) -> float:
        return sum(bench_dhcp.cpu_seconds(proc.pid) for name, proc in self.procs.items()
                   if name.startswith(prefix) and proc.poll() is None)

    def perfdhcp(self, rate: int, seconds: int, clients: int, label: str,
                 server: str | None = None, profile: Path | None = None) -> Run:
        """Broadcast (every member hears every client), or to `server` alone (Kea: its
        UDP sockets are bound to its address). `profile`: py-spy samples m1 meanwhile."""
        spy = None
        if profile is not None and "m1" in self.procs:
            spy = subprocess.Popen([bench_dhcp.py_spy(), "record", "--pid",
                                    str(self.procs["m1"].pid), "--format", "raw", "--rate",
                                    "200", "--duration", str(seconds), "--nonblocking", "-o",
                                    str(profile / f"{label.replace(' ', '')}-{rate}.txt")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bootd0, etcd0 = self.cpu("m"), self.cpu("e")
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns["c"], "perfdhcp", "-4", "-l", "cli0",
             "-r", str(rate), "-R", str(clients), "-p", str(seconds), "-t", "1", "-x", "t",
             "-b", "mac=02:79:00:00:00:00", *([server] if server else [])],
            capture_output=True, text=True, timeout=seconds + 60, check=False).stdout
        bootd_cpu, etcd_cpu = self.cpu("m") - bootd0, self.cpu("e") - etcd0
        if spy is not None:
            spy.wait(timeout=60)
        achieved, sent, received, delays = bench_dhcp.parse_perfdhcp(out)
        delays.sort()
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))] if delays else float("nan")
        run = Run(label, rate, achieved, sent, received, p99)
        if received and server is None:
            run.bootd_cpu_us, run.etcd_cpu_us = (1e6 * bootd_cpu / received,
                                                 1e6 * etcd_cpu / received)
        return run


def claim_cost(lab: Lab, urls: list[str], count: int) -> tuple[float, float]:
    """p50 and p99 ms of `count` create-only compare-and-swap claims, one at a time, from
    the client namespace (etcd is reachable there and nowhere else)."""
    out = lab.lab.run(lab.ns["c"], [sys.executable, __file__, "--time-claims", urls[0],
                                    "--claims", str(count)], timeout=120).stdout
    times = sorted(json.loads(out))
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def time_claims(url: str, count: int) -> list[float]:
    """Run inside the client namespace: ms per claim."""
    import aetcd

    async def run() -> list[float]:
        parts = urllib.parse.urlsplit(url)
        client = aetcd.Client(host=parts.hostname or "", port=parts.port or 2379, timeout=5)
        tx = client.transactions
        times = []
        try:
            for i in range(count):
                key = f"/bench/claim/{time.time_ns()}-{i}".encode()
                began = time.perf_counter()
                await client.transaction(compare=[tx.mod(key) == 0],
                                         success=[tx.put(key, b'{"mac":"x"}')], failure=[])
                times.append((time.perf_counter() - began) * 1000)
        finally:
            await client.close()
        return times

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="500,1500")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--members", default="1,2,3")
    parser.add_argument("--etcd", default="1,3", help="etcd cluster sizes (default 1,3)")
    parser.add_argument("--claims", type=int, default=500, help="claims timed one by one")
    parser.add_argument("--no-kea", action="store_true")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="sample member m1 with py-spy in each run; a breakdown is "
                        "printed")
    parser.add_argument("--time-claims", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_claims:  # the claim timer, run by claim_cost inside the lab
        print(json.dumps(time_claims(args.time_claims, args.claims)))
        return 0
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    for tool in ("perfdhcp", "etcd", "etcdctl", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (scripts/install-deps)")
    kea = None if args.no_kea else bench_dhcp.kea_binary()
    rates = [int(r) for r in args.rates.split(",")]
    member_counts = [int(m) for m in args.members.split(",")]
    runs: list[Run] = []
    claims: dict[int, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bootd-bench-cluster-") as d, \
            NetLab("bcl") as netlab:
        lab = Lab(netlab, Path(d))
        if kea is not None:
            for rate in rates:
                proc = bench_dhcp.start_kea(netlab, lab.ns["kea"], Path(d), _KeaPlan())
                time.sleep(0.5)
                runs.append(lab.perfdhcp(rate, args.seconds, args.clients, "kea (1 server)",
                                         server=KEA_IP))
                netlab.stop(proc)
                print(f"  kea @ {rate}/s: {runs[-1].achieved:.0f}/s", flush=True)
        for size in (int(e) for e in args.etcd.split(",")):
            urls = lab.start_etcd(size)
            claims[size] = claim_cost(lab, urls, args.claims)
            for count in member_counts:
                names = [f"m{n}" for n in range(1, count + 1)]
                for rate in rates:
                    lab.start_members(count, urls)
                    run = lab.perfdhcp(rate, args.seconds, args.clients,
                                       f"bootd x{count}, etcd x{size}", profile=args.profile)
                    run.claim_batch_ms = lab.claim_batch_ms(names)
                    runs.append(run)
                    lab.stop(*names)
                    print(f"  {run.label} @ {rate}/s: {run.achieved:.0f}/s", flush=True)
            lab.stop(*(f"e{n}" for n in range(1, size + 1)))

    print()
    print(f"perfdhcp -r RATE -R {args.clients} -p {args.seconds}, broadcast on one segment "
          "(every member hears every client); 2 cores shared by everything")
    print(f"{'setup':22} {'rate':>6} {'achieved/s':>11} {'drop%':>6} {'p99 ms':>8} "
          f"{'claims/batch ms':>15} {'bootd us/x':>10} {'etcd us/x':>9} {'vs kea':>7}")
    kea_at = {r.rate: r.achieved for r in runs if r.label.startswith("kea")}
    for r in runs:
        batch = f"{r.claim_batch_ms:.1f}" if r.claim_batch_ms is not None else "-"
        ratio = (f"x{r.achieved / kea_at[r.rate]:.2f}" if r.rate in kea_at
                 and not r.label.startswith("kea") and kea_at[r.rate] else "")
        cpu = [f"{v:.0f}" if v is not None else "-" for v in (r.bootd_cpu_us, r.etcd_cpu_us)]
        print(f"{r.label:22} {r.rate:6} {r.achieved:11.1f} {r.drop_pct:6.2f} "
              f"{r.p99_ms:8.2f} {batch:>15} {cpu[0]:>10} {cpu[1]:>9} {ratio:>7}")
    print("\none claim (compare-and-swap, create-only), one at a time, aetcd:")
    for size, (p50, p99) in claims.items():
        print(f"  etcd x{size}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    if args.profile is not None:
        print("\nmember m1 (py-spy, share of samples):")
        for path in sorted(args.profile.glob("*.txt")):
            bench_dhcp.print_profile(path)
    return 0


class _KeaPlan:
    """bench/dhcp.py's plan, but on this lab's interface and subnet."""

    def __init__(self) -> None:
        self.relays = 0
        self.relay_namespaces: list[str] = []

    @property
    def interfaces(self) -> list[str]:
        return ["srv0"]

    def ranges(self) -> list[tuple[str, str, str]]:
        return [(SUBNET, FIRST, LAST)]


if __name__ == "__main__":
    raise SystemExit(main())
