#!/usr/bin/env python3
"""The container image: its size, how long it takes to build, and a PXE boot from the
containerized bootd next to the same boot from `bootd serve` (run as root).

    python bench/container.py [--runs 2] [--no-cold]

Builds (scripts/build-image --local-base) from a copy of this checkout's tracked files,
so nothing in the work tree is touched: cold (no base, no layers: mmdebstrap included,
unless --no-cold), warm (nothing changed) and after a one-line source edit. Then, per
run and alternating, one UEFI QEMU VM (OVMF PXE -> snponly.efi over TFTP -> iPXE -> kernel,
initrd, rootfs over HTTP -> join) boots to `joined` from the Deployment run under podman
(tests/e2e/pods.py) and from `bootd serve` on the same config, each on a fresh namespace
and state. Prints the seconds from power-on to the joined mark, and bootd's peak RSS.
The incumbent for this is bootd itself outside a container: the ratio is the cost of
the container.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import yaml

from bootd.lab.netlab import NetLab
from bootd.lab.vms import VmLab, build_test_image, missing_for_vms
from tests.e2e.pods import ROOT, Manifests, PodRun, lab_config, podman, podman_env, stage_host
from tests.e2e.vms import wait_joined

WORKER_MAC = "02:00:00:00:01:27"
LOCAL_BASE = "localhost/debian:bookworm-slim"


def build(checkout: Path, tag: str, env: dict[str, str]) -> float:
    began = time.monotonic()
    subprocess.run([str(checkout / "scripts" / "build-image"), "--local-base", "-t", tag],
                   check=True, capture_output=True, env=env, timeout=1800)
    return time.monotonic() - began


def builds(tag: str, cold: bool) -> dict[str, float]:
    """Build times in a throw-away podman store (cold means cold, and the machine's own
    store and cache are left alone), from a copy of the tracked files."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        checkout = tmp / "bootd"
        checkout.mkdir()
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                               check=True).stdout
        subprocess.run(f"tar -C {ROOT} --null -T - -c | tar -C {checkout} -x", shell=True,
                       input=files, check=True)
        env = podman_env()
        if cold:
            storage = tmp / "storage.conf"
            storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp}/graph"\n'
                               f'runroot = "{tmp}/run"\n')
            env["CONTAINERS_STORAGE_CONF"] = str(storage)
        try:
            if cold:
                out["cold (base with mmdebstrap + image)"] = build(checkout, tag, env)
            out["warm (nothing changed)"] = build(checkout, tag, env)
            with (checkout / "bootd" / "__init__.py").open("a") as f:
                f.write("# a source edit\n")
            out["after a source edit"] = build(checkout, tag, env)
        finally:
            if cold:
                subprocess.run(["podman", "system", "reset", "--force"], env=env,
                               capture_output=True, check=False)
    # the image the boots below run: this checkout's, in the machine's store
    build(ROOT, tag, podman_env())
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def boot(manifests: Manifests, image: str | None) -> tuple[float, float]:
    """One VM boot to joined: (seconds, bootd's peak RSS in MiB). `image` None: `bootd
    serve` on the host with the same config, its paths pointing where the pod's volumes
    are on the host."""
    config, _interface, cidr = lab_config(manifests)
    with tempfile.TemporaryDirectory() as tmp_name, NetLab("bdbench") as lab:
        tmp = Path(tmp_name)
        host = stage_host(tmp / "host", build_test_image())
        vmlab = VmLab(lab, tmp, None, cidr)
        pod = PodRun(manifests, image or "", vmlab.ns, host, config_text=config)
        try:
            if image is not None:
                pod.start()
                pod.wait_ready()
                pid = pod.pid()
            else:
                native = yaml.safe_load(config)
                rewrite_paths(native, pod)
                vmlab.config.write_text(yaml.safe_dump(native))
                vmlab.bootd = lab.start_bootd(vmlab.ns, vmlab.config, vmlab.log)
                pid = vmlab.bootd.pid
            began = time.monotonic()
            vmlab.start_vm(WORKER_MAC, uefi=True)
            wait_joined(vmlab, WORKER_MAC, timeout=300)
            took = time.monotonic() - began
            rss = peak_rss_mib(pid)
            if image is not None:
                pod.stop()
            return took, rss
        finally:
            pod.remove()


def rewrite_paths(node: object, pod: PodRun) -> None:
    """Every absolute path in the config that the pod finds in a volume, as the host path
    of that volume (in place)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) \
        if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, str) and value.startswith("/"):
            if (where := pod.host_path(value)) is not None:
                node[key] = str(where)  # type: ignore[index]
        else:
            rewrite_paths(value, pod)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--no-cold", action="store_true")
    args = parser.parse_args()
    if (why := missing_for_vms(uefi=True)) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    manifests = Manifests.load()
    tag = "localhost/bootd:" + manifests.container["image"].rsplit(":", 1)[1]

    print("image builds (scripts/build-image --local-base):")
    for what, seconds in builds(tag, cold=not args.no_cold).items():
        print(f"  {what:40} {seconds:6.1f} s")
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    base = int(podman("image", "inspect", "--format", "{{.Size}}", LOCAL_BASE).stdout)
    print(f"  size: {size / 1e6:.0f} MB ({size / 2**20:.0f} MiB), of which the Debian base "
          f"{base / 1e6:.0f} MB")

    results: dict[str, list[tuple[float, float]]] = {"container": [], "bootd serve": []}
    for run in range(args.runs):
        for name, image in (("container", tag), ("bootd serve", None)):
            took, rss = boot(manifests, image)
            results[name].append((took, rss))
            print(f"  run {run + 1}: {name:12} joined after {took:5.1f} s, "
                  f"bootd peak RSS {rss:5.1f} MiB", flush=True)
    print("\nUEFI PXE boot to joined (median of runs):")
    medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
    for name, runs in results.items():
        print(f"  {name:12} {medians[name]:5.1f} s   peak RSS "
              f"{max(r for _, r in runs):5.1f} MiB")
    print(f"  ratio container / bootd serve: {medians['container'] / medians['bootd serve']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
