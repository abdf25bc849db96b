"""A stand-in for a netbooting machine behind a lab BMC, for rollout tests without QEMU.

From its reserved address it does what iPXE and the test image's initramfs do over HTTP:
fetch its iPXE script, then the kernel, initrd and rootfs the script names, check the
rootfs against the script's sha256, and report `joined` with the image its command line
names, or `failed` when the rootfs is a broken build (it starts with b"BROKEN"). Then it
exits, as the test image powers off. Several `--server`s (cluster mode): the first that
answers, and every URL the script names is tried in the order it gives, as iPXE's `||`
and the initramfs's peer list do. `--pause-at-script F`: wait after the script until
file F exists (a promote can happen mid-boot). Prints what it did on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True, action="append",
                   help="a bootd member; several: tried in turn (cluster mode)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--ip", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--pause-at-script", type=Path)
    args = p.parse_args()

    def get(url: str) -> bytes:
        host, _, path = url.removeprefix("http://").partition("/")
        name, _, port = host.partition(":")
        conn = http.client.HTTPConnection(name, int(port or 80), timeout=10,
                                          source_address=(args.ip, 0))
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: {resp.status} {body[:200]!r}")
        return body

    def first(urls: list[str]) -> bytes:
        """As iPXE's `a || b` and the initramfs's peer list: the first that answers."""
        errors = []
        for url in urls:
            try:
                return get(url)
            except (OSError, RuntimeError) as exc:
                errors.append(f"{url}: {exc}")
        raise RuntimeError("; ".join(errors))

    servers = [f"http://{s}:{args.port}" for s in args.server]
    script = first([f"{s}/nodes/{args.mac.replace(':', '-')}/boot.ipxe"
                    for s in servers]).decode()
    print("script:", script.splitlines()[2], flush=True)
    if args.pause_at_script is not None:
        while not args.pause_at_script.exists():
            time.sleep(0.05)
    kernels = re.findall(r"kernel --name vmlinuz (http://\S+)", script)
    initrds = re.findall(r"initrd --name initrd (http://\S+)", script)
    rootfs = re.search(r"bootd\.rootfs=(http://[^/]+)(\S+)", script)
    peers = re.search(r"bootd\.peers=(\S+)", script)
    sha = re.search(r"bootd\.rootfs_sha256=(\w+)", script)
    image = re.search(r"bootd\.image=(\S+)", script)
    if not (kernels and initrds and rootfs and sha and image):
        print("not a boot script", flush=True)
        return 1
    bases = [rootfs.group(1), *(peers.group(1).split(",") if peers else [])]

    def report(stage: str, message: str, ref: str) -> None:
        body = json.dumps({"stage": stage, "message": message, "image": ref})
        for base in bases:
            host, _, port = base.removeprefix("http://").partition(":")
            try:
                conn = http.client.HTTPConnection(host, int(port or 80), timeout=10,
                                                  source_address=(args.ip, 0))
                conn.request("POST", "/api/v1/events", body,
                             {"Content-Type": "application/json"})
                conn.getresponse().read()
                return
            except OSError:
                continue

    first(kernels)
    first(initrds)
    data = first([base + rootfs.group(2) for base in bases])
    if hashlib.sha256(data).hexdigest() != sha.group(1):
        report("failed", "rootfs sha256 mismatch", image.group(1))
        return 1
    if data.startswith(b"BROKEN"):
        report("failed", "cannot mount rootfs", image.group(1))
        print("failed on", image.group(1), flush=True)
        return 1
    report("joined", "joined (fake node)", image.group(1))
    print("joined on", image.group(1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
