#!/usr/bin/env python3
"""TFTP benchmark: bootd vs tftpd-hpa vs dnsmasq's TFTP, same namespaces, same run.

    sudo .venv/bin/python bench/tftp.py [--repeat 5] [--clients 50,200]

One 1 MiB transfer at blksize 512 and 1468, each with and without windowsize 16 (median
of --repeat runs), then for each --clients count that many concurrent transfers of the
same file, lock-step at blksize 512 and 1468 and windowed (16) at 1468; every received
file is checked by sha256. bootd's peak RSS (VmHWM) is printed after each server run.
Client: atftp (the one Debian client with RFC 7440 windowsize), driven from inside the
client namespace. Neither dnsmasq 2.90 nor tftpd-hpa implements windowsize: for them
those rows show lock-step speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.lab.netlab import NetLab, netns_available

ROOT_DIR = Path(__file__).resolve().parents[1]
SERVER_IP = "10.79.0.1"
SIZE = 1 << 20

# Runs inside the client namespace: starts atftp clients, times them, checks sha256.
DRIVER = r"""
import hashlib, json, subprocess, sys, time
args = json.loads(sys.argv[1])
cmds = []
for i in range(args["clients"]):
    out = f"{args['tmp']}/out-{i}"
    cmd = ["atftp", "--get", "-r", "file.bin", "-l", out, "--option", f"blksize {args['blksize']}"]
    if args["window"]:
        cmd += ["--option", f"windowsize {args['window']}"]
    cmds.append((cmd + [args["server"]], out))
t = time.perf_counter()
procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c, _ in cmds]
codes = [p.wait(timeout=300) for p in procs]
elapsed = time.perf_counter() - t
ok = 0
for (c, out), code in zip(cmds, codes):
    try:
        ok += code == 0 and hashlib.sha256(open(out, "rb").read()).hexdigest() == args["sha"]
    except OSError:
        pass
print(json.dumps({"elapsed": elapsed, "ok": ok}))
"""


def wait_port(lab: NetLab, ns: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        out = lab.run(ns, ["ss", "-uln"], check=False).stdout
        if f"{SERVER_IP}:69 " in out or "0.0.0.0:69 " in out:
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise SystemExit(f"server did not listen:\n{log.read_text(errors='replace')[-2000:]}")


def start(server: str, lab: NetLab, ns: str, tmp: Path, root: Path) -> subprocess.Popen[bytes]:
    log = tmp / f"{server}.log"
    if server == "bootd":
        config = tmp / "bootd.yaml"
        config.write_text(
            f"server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {tmp / 'st'}}}\n"
            # every client of the bench shares one address: no per-address cap, as the
            # incumbents have none
            f"network: {{subnet: 10.79.0.0/24}}\n"
            f"tftp: {{root: {root}, max_transfers_per_client: 100000}}\n")
        cmd = [sys.executable, "-m", "bootd", "serve", "-c", str(config), "--log-format", "json"]
    elif server == "tftpd-hpa":
        cmd = [str(find_in_tftpd()), "--foreground", "--listen", "--address",
               f"{SERVER_IP}:69", "--secure", "--user", "root", str(root)]
    else:
        cmd = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--enable-tftp",
               f"--tftp-root={root}", "--interface=srv0", "--bind-interfaces",
               "--tftp-max=1000", "--user=root", "--group=root", "--log-facility=-",
               f"--pid-file={tmp / 'dnsmasq.pid'}"]
    proc = lab.spawn(ns, cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_port(lab, ns, proc, log)
    return proc


def find_in_tftpd() -> Path:
    for candidate in (shutil.which("in.tftpd"),
                      ROOT_DIR / ".cache/incumbents/usr/sbin/in.tftpd"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise SystemExit("needs tftpd-hpa's in.tftpd (scripts/install-deps unpacks it)")


def drive(lab: NetLab, ns: str, tmp: Path, sha: str, blksize: int, window: int,
          clients: int) -> dict[str, float]:
    work = tmp / "client"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    args = {"clients": clients, "tmp": str(work), "blksize": blksize, "window": window,
            "server": SERVER_IP, "sha": sha}
    out = lab.run(ns, [sys.executable, "-c", DRIVER, json.dumps(args)], timeout=400)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", default="50,200",
                        help="concurrent client counts, comma-separated")
    parser.add_argument("--servers", default="tftpd-hpa,dnsmasq,bootd")
    args = parser.parse_args()
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    for tool in ("atftp", "dnsmasq", "ss"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (scripts/install-deps)")
    servers = args.servers.split(",")
    singles = [(512, 0), (512, 16), (1468, 0), (1468, 16)]
    counts = [int(c) for c in args.clients.split(",")]
    many = [(c, b, 0) for c in counts for b in (512, 1468)] + [(c, 1468, 16) for c in counts]
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bootd-bench-tftp-") as d, NetLab("bdt") as lab:
        tmp = Path(d)
        root = tmp / "root"
        root.mkdir()
        data = os.urandom(SIZE)
        (root / "file.bin").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        srv, cli = lab.namespace("s"), lab.namespace("c")
        lab.veth(srv, "srv0", cli, "cli0")
        lab.address(srv, "srv0", f"{SERVER_IP}/24")
        lab.address(cli, "cli0", "10.79.0.2/24")
        for server in servers:
            proc = start(server, lab, srv, tmp, root)
            row: dict[str, object] = {}
            for blksize, window in singles:
                times = []
                for _ in range(args.repeat):
                    r = drive(lab, cli, tmp, sha, blksize, window, 1)
                    if r["ok"] != 1:
                        raise SystemExit(f"{server}: single transfer failed")
                    times.append(r["elapsed"])
                row[f"{blksize}/{window}"] = statistics.median(times)
            for clients, blksize, window in many:
                row[f"many/{clients}/{blksize}/{window}"] = drive(
                    lab, cli, tmp, sha, blksize, window, clients)
            if server == "bootd":
                status = Path(f"/proc/{bootd_pid(proc)}/status").read_text()
                row["rss"] = int(status.split("VmHWM:")[1].split()[0]) / 1024
            lab.stop(proc)
            rows[server] = row
            print(f"  {server}: done", flush=True)

    mb = SIZE / 1e6
    print(f"\n1 MiB file; single transfers: median of {args.repeat} (ms, MB/s); atftp "
          "client; 2 cores shared by clients and server")
    print(f"{'server':10}" + "".join(f"{f'blk {b} win {w or 1}':>18}" for b, w in singles))
    for server, row in rows.items():
        line = f"{server:10}"
        for b, w in singles:
            t = float(str(row[f"{b}/{w}"]))
            line += f"{t * 1000:9.1f} {mb / t:6.1f}".rjust(18)
        print(line)
    print("\nconcurrent clients, MB/s (all clients' bytes over the wall time)")
    labels = [f"{c}x blk{b}" + (f" w{w}" if w else "") for c, b, w in many]
    print(f"{'server':10}" + "".join(f"{label:>18}" for label in labels))
    for server, row in rows.items():
        line = f"{server:10}"
        for c, b, w in many:
            m = row[f"many/{c}/{b}/{w}"]
            assert isinstance(m, dict)
            ok = "" if m["ok"] == c else f" ({m['ok']:.0f} ok)"
            line += f"{c * mb / m['elapsed']:.1f}{ok}".rjust(18)
        print(line)
    if "bootd" in rows:
        b = rows["bootd"]
        print(f"\nbootd peak RSS {float(str(b['rss'])):.1f} MiB")
        print("ratios bootd/other (speed: higher is better)")
        for other in (s for s in rows if s != "bootd"):
            o = rows[other]
            parts = []
            for bl, w in singles:
                ratio = float(str(o[f"{bl}/{w}"])) / float(str(b[f"{bl}/{w}"]))
                parts.append(f"blk {bl} win {w or 1} x{ratio:.2f}")
            for c, bl, w in many:
                bm, om = b[f"many/{c}/{bl}/{w}"], o[f"many/{c}/{bl}/{w}"]
                assert isinstance(bm, dict) and isinstance(om, dict)
                parts.append(f"{c}x blk{bl} {'win 16' if w else 'lock-step'} "
                             f"x{om['elapsed'] / bm['elapsed']:.2f}")
            print(f"  vs {other}: " + ", ".join(parts))
        lock = float(str(b["1468/0"]))
        win = float(str(b["1468/16"]))
        print(f"  bootd windowsize 16 vs lock-step, one transfer at blksize 1468: "
              f"x{lock / win:.2f}")
    return 0


def bootd_pid(proc: subprocess.Popen[bytes]) -> int:
    """`ip netns exec` execs the command: the spawned PID is bootd's own."""
    return proc.pid


if __name__ == "__main__":
    raise SystemExit(main())
