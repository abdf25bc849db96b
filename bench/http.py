#!/usr/bin/env python3
"""HTTP benchmark: bootd vs nginx (sendfile on), same namespaces, same run.

    sudo .venv/bin/python bench/http.py [--mib 512] [--streams 20] [--seconds 5]

Per server: one stream of the rootfs, --streams concurrent streams of it (curl, to
/dev/null), requests/s for a per-node iPXE script (wrk; nginx serves the same bytes as a
static file, bootd renders it once per config load and records a boot event per
request), and the server's peak RSS (VmHWM; nginx: master plus workers). Client and
server share 2 cores: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bootd.fleet.config import parse_config
from bootd.fleet.images import BootImage
from bootd.fleet.inventory import Inventory
from bootd.fleet.render import ipxe_node
from bootd.lab.netlab import NetLab, netns_available

ROOT_DIR = Path(__file__).resolve().parents[1]
SERVER_IP = "10.80.0.1"
MAC = "02:00:00:00:00:01"
SCRIPT_PATH = "/nodes/02-00-00-00-00-01/boot.ipxe"

DRIVER = r"""
import json, subprocess, sys, time
url, n = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
procs = [subprocess.Popen(["curl", "-sS", "--max-time", "600", "-o", "/dev/null", "-w",
                           "%{size_download}", url], stdout=subprocess.PIPE) for _ in range(n)]
sizes = [int(p.communicate()[0] or 0) for p in procs]
print(json.dumps({"elapsed": time.perf_counter() - t, "bytes": sum(sizes),
                  "ok": sum(p.returncode == 0 for p in procs)}))
"""


def find_nginx() -> Path:
    for candidate in (shutil.which("nginx"), ROOT_DIR / ".cache/incumbents/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise SystemExit("needs nginx (scripts/install-deps unpacks it)")


def config_text(img: Path, tmp: Path) -> str:
    return (f"server: {{interfaces: [srv0], address: {SERVER_IP}, state_dir: {tmp / 'st'}, "
            f"api: {tmp / 'st' / 'api.sock'}}}\n"
            "network: {subnet: 10.80.0.0/24}\n"
            f"tftp: {{root: {tmp}}}\n"
            f"images: {{k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, "
            f"rootfs: {img}/rootfs, cmdline: 'console=ttyS0'}}}}\n"
            "defaults: {image: k8s, kernel_args: [quiet]}\n"
            f"pools: [{{name: w, nodes: [{{name: n1, mac: '{MAC}', ip: 10.80.0.2}}]}}]\n")


def wait_http(lab: NetLab, ns: str, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = lab.run(ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                    check=False)
        if r.stdout == "200":
            return
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"server not answering at {url} ({r.stdout} {r.stderr.strip()}):\n"
                     f"{log.read_text(errors='replace')[-2000:]}")


def start_bootd(lab: NetLab, ns: str, tmp: Path, img: Path) -> subprocess.Popen[bytes]:
    cfg = tmp / "bootd.yaml"
    cfg.write_text(config_text(img, tmp))
    log = tmp / "bootd.log"
    proc = lab.spawn(ns, [sys.executable, "-m", "bootd", "serve", "-c", str(cfg),
                          "--log-format", "json", "--log-level", "warning"],
                     stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    wait_http(lab, ns, f"http://{SERVER_IP}:8080{SCRIPT_PATH}", proc, log)
    return proc


def start_nginx(lab: NetLab, ns: str, tmp: Path, img: Path) -> subprocess.Popen[bytes]:
    prefix = tmp / "nginx"
    (prefix / "www" / "nodes" / "02-00-00-00-00-01").mkdir(parents=True, exist_ok=True)
    inv = Inventory(parse_config(config_text(img, tmp)))
    node = inv.resolve(MAC)
    assert node is not None
    config = parse_config(config_text(img, tmp))
    (prefix / "www" / SCRIPT_PATH.lstrip("/")).write_text(
        ipxe_node(node, MAC, BootImage("k8s", None, config.images["k8s"]),
                  f"http://{SERVER_IP}:8080", "0" * 64))
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
user root; daemon off; worker_processes 2; error_log {prefix}/error.log; pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  sendfile on; tcp_nopush on; access_log off; default_type application/octet-stream;
  client_body_temp_path {prefix}/tmp; proxy_temp_path {prefix}/tmp;
  fastcgi_temp_path {prefix}/tmp; uwsgi_temp_path {prefix}/tmp; scgi_temp_path {prefix}/tmp;
  server {{
    listen {SERVER_IP}:8080;
    root {prefix}/www;
    location /images/k8s/ {{ alias {img}/; }}
  }}
}}
""")
    (prefix / "tmp").mkdir(exist_ok=True)
    (img / "kernel").unlink(missing_ok=True)
    (img / "kernel").symlink_to(img / "vmlinuz")
    log = tmp / "nginx.log"
    proc = lab.spawn(ns, [str(find_nginx()), "-p", str(prefix), "-c", str(conf)],
                     stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_http(lab, ns, f"http://{SERVER_IP}:8080{SCRIPT_PATH}", proc, log)
    return proc


def peak_rss_mib(pid: int) -> float:
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    total = 0
    for p in pids:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"VmHWM:\s+(\d+) kB", status)
        total += int(m.group(1)) if m else 0
    return total / 1024


def measure(lab: NetLab, cli: str, srv_proc: subprocess.Popen[bytes], streams: int,
            seconds: int, size: int) -> dict[str, float]:
    rootfs = f"http://{SERVER_IP}:8080/images/k8s/rootfs"
    one = json.loads(lab.run(cli, [sys.executable, "-c", DRIVER, rootfs, "1"],
                             timeout=700).stdout)
    many = json.loads(lab.run(cli, [sys.executable, "-c", DRIVER, rootfs, str(streams)],
                              timeout=700).stdout)
    if one["bytes"] != size or many["bytes"] != size * streams or many["ok"] != streams:
        raise SystemExit(f"incomplete downloads: {one} {many}")
    wrk = lab.run(cli, ["wrk", "-t1", "-c16", f"-d{seconds}s",
                        f"http://{SERVER_IP}:8080{SCRIPT_PATH}"], timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", wrk)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", wrk)
    if rps is None or non2xx is not None:
        raise SystemExit(f"wrk failed:\n{wrk}")
    return {"one_mbs": size / one["elapsed"] / 1e6, "many_mbs": many["bytes"] /
            many["elapsed"] / 1e6, "rps": float(rps.group(1)),
            "rss": peak_rss_mib(srv_proc.pid)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="rootfs size (default 512)")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration")
    args = parser.parse_args()
    if (why := netns_available()) is not None:
        raise SystemExit(why)
    for tool in ("curl", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (scripts/install-deps)")
    size = args.mib << 20
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bootd-bench-http-") as d, NetLab("bdh") as lab:
        tmp = Path(d)
        img = tmp / "img"
        img.mkdir()
        (img / "vmlinuz").write_bytes(os.urandom(8 << 20))
        (img / "initrd.img").write_bytes(os.urandom(32 << 20))
        with (img / "rootfs").open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        srv, cli = lab.namespace("s"), lab.namespace("c")
        lab.veth(srv, "srv0", cli, "cli0", mac_b=MAC)
        lab.address(srv, "srv0", f"{SERVER_IP}/24")
        lab.address(cli, "cli0", "10.80.0.2/24")
        for name, start in (("nginx", start_nginx), ("bootd", start_bootd)):
            proc = start(lab, srv, tmp, img)
            results[name] = measure(lab, cli, proc, args.streams, args.seconds, size)
            lab.stop(proc)
            print(f"  {name}: done", flush=True)

    print(f"\n{args.mib} MiB rootfs; {args.streams} concurrent curl streams; wrk -t1 -c16 "
          f"for {args.seconds}s on the per-node iPXE script; 2 cores shared")
    print(f"{'server':8}{'1 stream MB/s':>15}{f'{args.streams} streams MB/s':>18}"
          f"{'script req/s':>14}{'peak RSS MiB':>14}")
    for name, r in results.items():
        print(f"{name:8}{r['one_mbs']:15.0f}{r['many_mbs']:18.0f}{r['rps']:14.0f}"
              f"{r['rss']:14.1f}")
    b, n = results["bootd"], results["nginx"]
    print(f"\nratios bootd/nginx: 1 stream x{b['one_mbs'] / n['one_mbs']:.2f}, "
          f"{args.streams} streams x{b['many_mbs'] / n['many_mbs']:.2f}, "
          f"script req/s x{b['rps'] / n['rps']:.2f}, peak RSS x{b['rss'] / n['rss']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
