#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris, libFuzzer) of what bootd parses from the network and
from operators: a crash is any exception other than the parser's own error.

    python bench/fuzz.py [--targets dhcp,tftp,http,config] [--runs 1000000]

- dhcp: a datagram through the whole DHCP service (decode -> decide -> persist ->
  encode), with reserved nodes, a catch-all range and relays; DhcpService.handle must
  answer or drop, never raise.
- tftp: parse_request, then option negotiation, then a whole transfer's first exchange
  with the same bytes as the client's ACK; TftpError is the only way to refuse.
- http: what the boot HTTP app parses itself: a MAC in any spelling (ValueError) and a
  path into the TFTP/boot file tree (NotFound, Forbidden), with hostile names.
- config: YAML text into the validated model; ConfigError is the only way to refuse.

Each target runs in its own process (libFuzzer exits when done) seeded with valid
inputs; the summary prints inputs run and crashes per target. tests/unit/test_fuzz.py
runs a short bounded version in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# the project root instead of bench/, whose http.py would shadow the standard library
ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

TARGETS = ("dhcp", "tftp", "http", "config")
SELFCHECK = "selfcheck"  # not a bootd target: checks that the harness reports a crash

CONFIG = """\
server: {interfaces: [br0], address: 10.0.0.1, state_dir: STATE}
networks:
  - {name: core, subnet: 10.0.0.0/24, gateway: 10.0.0.1, dns: [10.0.0.1], lease_time: 1h}
  - {name: rack1, subnet: 10.61.1.0/24, gateway: 10.61.1.1}
tftp: {root: STATE, fallback_dirs: []}
pools:
  - name: w
    nodes:
      - {name: n1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}
      - {name: r1, port: {relay: 10.61.1.1, circuit_id: "eth1/1"}, ip: 10.61.1.11}
  - name: any
    dynamic: {ranges: [10.0.0.100-10.0.0.110, 10.61.1.100-10.61.1.110]}
"""


def seeds(target: str, corpus: Path) -> None:
    """Valid inputs to start from: mutation finds the edges faster from inside."""
    from bootd.cli.explain import synthetic_discover
    from bootd.dhcp.packet import encode
    from bootd.tftp.protocol import encode_ack

    samples: list[bytes] = []
    if target == "dhcp":
        from ipaddress import IPv4Address

        for arch in ("bios", "efi64", "http"):
            samples.append(encode(synthetic_discover("02:00:00:00:00:01", arch, False)))
            samples.append(encode(synthetic_discover("52:54:00:00:00:09", arch, True)))
        samples.append(encode(synthetic_discover("52:54:00:00:00:09", "bios", False,
                                                 IPv4Address("10.61.1.1"), "eth1/1")))
    elif target == "tftp":
        samples += [b"\0\1undionly.kpxe\0octet\0blksize\x001468\0tsize\x000\0",
                    b"\0\1grub/grub.cfg-01-02-00-00-00-00-01\0netascii\0", encode_ack(1)]
    elif target == SELFCHECK:
        samples.append(b"crash!")
    elif target == "http":
        samples += [b"02:00:00:00:00:01\0undionly.kpxe", b"02-00-00-00-00-01\0/grub/x.cfg",
                    b"0200.0000.0001\0../../etc/passwd"]
    else:
        samples.append(CONFIG.encode())
        for path in (ROOT / "deploy").rglob("*.yaml"):
            text = path.read_text()
            if "server:" in text and "pools:" in text:
                samples.append(text.encode())
    for i, sample in enumerate(samples):
        (corpus / f"seed-{i}").write_bytes(sample)


Harness = tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]


def harness(target: str, state: Path) -> Harness:
    """The function atheris calls per input, and what it may raise without a crash."""
    if target == "dhcp":
        from bootd.dhcp.service import DhcpService
        from bootd.fleet.config import parse_config
        from bootd.fleet.images import ImageHashes
        from bootd.ops.metrics import Metrics
        from bootd.runtime import build_snapshot
        from bootd.state.recorder import EventPolicy, Recorder
        from bootd.state.store import Store

        store = Store(state / "fuzz.sqlite3")
        snapshot = build_snapshot(parse_config(CONFIG.replace("STATE", str(state))), store,
                                  hashes=ImageHashes())
        metrics = Metrics()
        service = DhcpService(lambda: snapshot.dhcp, store, metrics,
                              Recorder(None, EventPolicy(600, 3), metrics=metrics))
        clock = [1_000_000.0]

        def one(data: bytes) -> None:
            clock[0] += 0.5
            service.is_known(data)
            service.handle(data, "br0", clock[0])
        return one, ()
    if target == "tftp":
        from bootd.fleet.filetree import BytesSource
        from bootd.tftp.protocol import (
            Limits,
            ReadTransfer,
            TftpError,
            negotiate,
            parse_request,
        )

        def one(data: bytes) -> None:
            request = parse_request(data)
            negotiated = negotiate(request.options, 70_000, Limits())
            transfer = ReadTransfer(BytesSource(b"x" * 70_000), negotiated, Limits(), 0.0)
            transfer.datagrams_to_send()
            transfer.receive_datagram(data, 0.1)
            transfer.handle_timer(5.0)
            transfer.datagrams_to_send()
        return one, (TftpError,)
    if target == "http":
        from ipaddress import IPv4Address

        from bootd.fleet.filetree import FileTree, Forbidden, NotFound
        from bootd.fleet.mac import normalize_mac

        root = state / "tftproot"
        (root / "grub").mkdir(parents=True, exist_ok=True)
        (root / "undionly.kpxe").write_bytes(b"ipxe")
        tree = FileTree(root, ())

        def one(data: bytes) -> None:
            mac, _, path = data.partition(b"\0")
            with contextlib.suppress(ValueError):
                normalize_mac(mac.decode("utf-8", "surrogateescape"))
            tree.locate(path.decode("utf-8", "surrogateescape"), IPv4Address("10.0.0.5"), 0.0)
        return one, (NotFound, Forbidden)
    if target == SELFCHECK:  # proves a crash is reported: an input seeded to raise
        def one(data: bytes) -> None:
            if data.startswith(b"crash"):
                raise RuntimeError("the self-check's planted crash")
        return one, ()
    from bootd.fleet.config import ConfigError, parse_config

    def one(data: bytes) -> None:
        parse_config(data.decode("utf-8", "replace"))
    return one, (ConfigError,)


def run_one(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with tempfile.TemporaryDirectory(prefix=f"bootd-fuzz-{target}-") as d:
        with atheris.instrument_imports(include=["bootd"]):
            call, allowed = harness(target, Path(d))

        def test_one(data: bytes) -> None:
            with contextlib.suppress(*allowed):
                call(data)

        atheris.Setup([sys.argv[0], *libfuzzer_args], test_one)
        atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":  # the child: libFuzzer's own flags
        run_one(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--max-seconds", type=int, default=1800,
                        help="time bound per target (libFuzzer -max_total_time)")
    args = parser.parse_args()
    results = {}
    failed = False
    for target in args.targets.split(","):
        if target not in (*TARGETS, SELFCHECK):
            parser.error(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
        with tempfile.TemporaryDirectory(prefix="bootd-corpus-") as corpus:
            seeds(target, Path(corpus))
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, __file__, "--one", target, f"-runs={args.runs}",
                 f"-max_total_time={args.max_seconds}", "-max_len=2048",
                 f"-artifact_prefix={tempfile.gettempdir()}/bootd-fuzz-{target}-", corpus],
                capture_output=True, text=True, check=False,
                env={**os.environ, "PYTHONHASHSEED": "0"})
            took = time.monotonic() - started
        done = [line for line in proc.stderr.splitlines() if line.startswith("Done ")]
        runs = int(done[-1].split()[1]) if done else None
        crashed = proc.returncode != 0
        failed |= crashed
        results[target] = {"inputs": runs, "seconds": round(took, 1),
                           "crash": crashed, "exit": proc.returncode}
        print(f"{target:7} {runs if runs is not None else '?':>9} inputs in {took:7.1f}s"
              f"  {'CRASH' if crashed else 'no crash'}", flush=True)
        if crashed:
            print("\n".join(proc.stderr.splitlines()[-40:]), file=sys.stderr)
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
