"""Image versions and rollouts in cluster mode, with real etcd, three bootd members and
real IPMI BMCs (OpenIPMI's ipmi_sim, bootd.lab.bmc) in front of stand-in machines
(tests/integration/fake_node.py, which try the members and the script's fallbacks in
turn, as iPXE and the initramfs do).

    e1 (etcd 10.80.0.21)   b1 b2 b3 (bootd 10.80.0.1-3)   c (nodes .11-.13, BMCs .111-.113)
           \\_______________________ sw: br0 ________________________/

One test, in steps that share the boots: a version added on one member reaches the
others; a rollout started on one member is driven by one member and seen by all; the
runner is killed (SIGKILL) mid-rollout and another member finishes it; pause and
resume from a member that does not drive it; a broken version halts at the canary and
the pool points back everywhere; prune deletes the copies on every member.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bootd.lab.bmc import USERNAME, LabBmc
from bootd.lab.netlab import NetLab
from tests.integration.conftest import require
from tests.integration.test_rollout import FAKE_NODE, PASSWORD, build

pytestmark = pytest.mark.netns

MEMBERS = ("b1", "b2", "b3")
ETCD_IP = "10.80.0.21"
TTL = 2.0
NODES = {"n1": ("02:00:00:80:01:11", "10.80.0.11"), "n2": ("02:00:00:80:01:12", "10.80.0.12"),
         "n3": ("02:00:00:80:01:13", "10.80.0.13")}


def member_ip(name: str) -> str:
    return f"10.80.0.{name[1]}"


@dataclass
class Lab:
    lab: NetLab
    tmp: Path
    client_ns: str
    namespaces: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def config(self, name: str) -> Path:
        state = self.tmp / name
        state.mkdir(exist_ok=True)
        nodes = "\n".join(f"      - {{name: {n}, mac: \"{m}\", ip: {i}}}"
                          for n, (m, i) in NODES.items())
        path = self.tmp / f"{name}.yaml"
        path.write_text(textwrap.dedent(f"""\
            server: {{interfaces: [srv0], address: {member_ip(name)}, state_dir: {state},
                     api: {state}/api.sock, drain_timeout: 1s}}
            network: {{subnet: 10.80.0.0/24, lease_time: 1h}}
            cluster:
              member: {name}
              etcd: {{endpoints: [http://{ETCD_IP}:2379], prefix: /bootd/, timeout: 2s}}
              member_ttl: {TTL}s
            defaults:
              image: k8s
              power: {{ipmi: {{host: "10.80.0.1{{ip_last}}", username: {USERNAME},
                             password: {{file: {self.tmp}/bmc.pw}}}}, timeout: 20s}}
            pools:
              - name: w
                nodes:
            """) + nodes + "\n")
        return path

    def start(self, name: str) -> None:
        self.procs[name] = self.lab.start_bootd(
            self.namespaces[name], self.config(name), self.tmp / f"{name}.log",
            extra=["--log-level", "debug"], timeout=30)

    def cli(self, name: str, *args: str, timeout: float = 60,
            ) -> subprocess.CompletedProcess[str]:
        """`bootd ARGS` as run on member `name` (in its namespace: the BMCs are there)."""
        started = time.monotonic()
        out = subprocess.run(["ip", "netns", "exec", self.namespaces[name], sys.executable,
                              "-m", "bootd", *args, "-c", str(self.tmp / f"{name}.yaml")],
                             capture_output=True, text=True, timeout=timeout, check=False)
        print(f"{name}: bootd {' '.join(args)}: {time.monotonic() - started:.1f}s")
        return out

    def api(self, name: str, path: str) -> Any:
        out = subprocess.run(["curl", "-sS", "-f", "--unix-socket",
                              str(self.tmp / name / "api.sock"), f"http://bootd{path}"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def status(self, name: str) -> dict[str, dict[str, Any]]:
        return {str(r["node"]): r for r in self.api(name, "/api/v1/status")["nodes"]}

    def versions(self, name: str) -> dict[str, dict[str, Any]]:
        return {d["version"]: d for d in self.api(name, "/api/v1/images")["images"]}

    def add(self, member: str, tag: str, broken: bool = False) -> str:
        out = self.cli(member, "image", "add", "k8s", str(build(self.tmp, tag, broken)))
        assert out.returncode == 0, out.stdout + out.stderr
        assert "published to the cluster" in out.stdout, out.stdout
        return out.stdout.split("@", 1)[1].split(":", 1)[0]

    def log_has(self, name: str, text: str) -> bool:
        return text in (self.tmp / f"{name}.log").read_text()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - started


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require("etcd", "etcdctl", "ipmi_sim", "ipmitool")
    with NetLab("bdr") as net:
        sw = net.namespace("sw")
        net.bridge(sw, "br0")
        env = Lab(net, tmp_path, net.namespace("c"))
        net.veth(sw, "pc", env.client_ns, "cli0")
        net.attach(sw, "pc", "br0")
        for name in ("e1", *MEMBERS):
            ns = env.namespaces[name] = net.namespace(name)
            net.veth(sw, f"p{name}", ns, "srv0")
            net.attach(sw, f"p{name}", "br0")
            net.address(ns, "srv0", f"{ETCD_IP if name == 'e1' else member_ip(name)}/24")
        etcd_log = (tmp_path / "e1.log").open("ab")
        env.procs["e1"] = net.spawn(env.namespaces["e1"], [
            "etcd", "--name", "e1", "--data-dir", str(tmp_path / "e1.etcd"),
            "--listen-client-urls", f"http://{ETCD_IP}:2379",
            "--advertise-client-urls", f"http://{ETCD_IP}:2379",
            "--listen-peer-urls", f"http://{ETCD_IP}:2380",
            "--initial-advertise-peer-urls", f"http://{ETCD_IP}:2380",
            "--initial-cluster", f"e1=http://{ETCD_IP}:2380"], stdout=etcd_log,
            stderr=etcd_log)
        deadline = time.monotonic() + 30
        while net.run(env.namespaces["e1"], ["etcdctl", "--endpoints", f"http://{ETCD_IP}:2379",
                                      "put", "/health", "ok"], check=False,
                      timeout=10).returncode != 0:
            assert time.monotonic() < deadline, "etcd did not start"
            time.sleep(0.3)
        yield env
        for name in MEMBERS:
            if name in env.procs:
                net.stop(env.procs.pop(name))


def test_versions_and_rollouts_across_members(lab: Lab) -> None:
    (lab.tmp / "bmc.pw").write_text(PASSWORD + "\n")
    pause = lab.tmp / "go"
    pause.touch()
    bmcs: dict[str, LabBmc] = {}
    servers = [arg for m in MEMBERS for arg in ("--server", member_ip(m))]
    try:
        for name, (mac, ip) in NODES.items():
            bmc_ip = f"10.80.0.1{ip.rsplit('.', 1)[1]}"
            lab.lab.address(lab.client_ns, "cli0", f"{ip}/24")
            lab.lab.address(lab.client_ns, "cli0", f"{bmc_ip}/24")
            machine = [sys.executable, str(FAKE_NODE), *servers, "--ip", ip, "--mac", mac]
            if name == "n1":
                machine += ["--pause-at-script", str(pause)]
            bmcs[name] = LabBmc(lab.lab, lab.client_ns, bmc_ip, lab.tmp / f"bmc-{name}",
                                machine, PASSWORD, name=f"bmc-{name}")
        for name in MEMBERS:
            lab.start(name)

        # a version added on b1 is published, promoted (the first) and fetched by all
        v1 = lab.add("b1", "v1")
        took = wait_for("v1 on every member", lambda: lab.versions("b3").get(v1, {}).get(
            "held_by") == list(MEMBERS))
        size = sum(f.stat().st_size for f in (lab.tmp / "build-v1").iterdir())
        print(f"a {size / 1e6:.1f} MB version reached the other two members in {took:.1f}s")
        assert lab.versions("b2")[v1]["promoted"]
        for name in MEMBERS:  # a copy verified against the record, in each member's store
            assert (lab.tmp / name / "images" / "k8s" / v1 / "rootfs").is_file()

        out = lab.cli("b2", "power", "--pool", "w", "pxe")
        assert out.returncode == 0 and out.stdout.count("ok, power on") == 3, out.stdout
        wait_for("three nodes joined on v1", lambda: all(
            r["stage"] == "joined" and r["image"] == f"k8s@{v1}"
            for r in lab.status("b3").values()))

        # v2, added on b2, is promoted on b3 only once every member holds it
        v2 = lab.add("b2", "v2")
        wait_for("v2 on every member", lambda: lab.versions("b1").get(v2, {}).get(
            "held_by") == list(MEMBERS))
        listed = lab.cli("b3", "image", "list", "k8s")
        assert listed.returncode == 0 and "3/3" in listed.stdout, listed.stdout

        # a rollout started on b3: one member drives it, every member sees it
        started = time.monotonic()
        out = lab.cli("b3", "rollout", "start", "w", "--image", f"k8s@{v2}",
                      "--max-unavailable", "2", "--timeout", "60s", "--wait", timeout=180)
        took = time.monotonic() - started
        assert out.returncode == 0, out.stdout + out.stderr
        assert "canary: n1" in out.stdout and "wave 1: n2, n3" in out.stdout, out.stdout
        print(f"3-node rollout across a 3-member cluster: {took:.1f}s")
        for name in MEMBERS:
            rows = lab.status(name)
            assert {r["image"] for r in rows.values()} == {f"k8s@{v2}"}, name
            assert not any(r["drift"] for r in rows.values())
            assert lab.versions(name)[v2]["pools"] == ["w"]
        assert all(b.events().count("on boot=pxe") == 2 for b in bmcs.values())

        # v3: the canary waits at its script; its runner is killed; another member
        # takes over and finishes; pause and resume come from a member not driving it
        v3 = lab.add("b3", "v3")
        wait_for("v3 on every member", lambda: lab.versions("b1").get(v3, {}).get(
            "held_by") == list(MEMBERS))
        pause.unlink()
        out = lab.cli("b1", "rollout", "start", "w", "--image", f"k8s@{v3}",
                      "--max-unavailable", "2", "--timeout", "90s")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for("the canary's power cycle confirmed", lambda: any(
            n["powered"] for n in lab.api("b2", "/api/v1/rollout")["current"]["nodes"]))
        runner = lab.api("b2", "/api/v1/rollout")["runner"]
        assert runner in MEMBERS
        killed = time.monotonic()
        lab.lab.stop(lab.procs.pop(runner), signal.SIGKILL)
        rest = [m for m in MEMBERS if m != runner]
        took = wait_for("another member drives the rollout", lambda: lab.api(
            rest[0], "/api/v1/rollout").get("runner") in rest, timeout=30)
        print(f"runner {runner} killed: taken over after {took:.1f}s (member_ttl {TTL}s)")
        successor = lab.api(rest[0], "/api/v1/rollout")["runner"]
        bystander = next(m for m in rest if m != successor)
        out = lab.cli(bystander, "rollout", "pause")
        assert out.returncode == 0, out.stderr
        assert lab.api(successor, "/api/v1/rollout")["current"]["phase"] == "paused"
        assert lab.cli(bystander, "rollout", "resume").returncode == 0
        pause.touch()
        out = lab.cli(successor, "rollout", "status", "--wait", timeout=120)
        assert out.returncode == 0 and "COMPLETED" in out.stdout, out.stdout
        assert f"took over the rollout from {runner}" in out.stdout, out.stdout
        print(f"rollout finished {time.monotonic() - killed:.1f}s after its runner died")
        rows = lab.status(bystander)
        assert {r["image"] for r in rows.values()} == {f"k8s@{v3}"}
        # n1's cycle was confirmed before the kill: not cycled again by the successor
        assert bmcs["n1"].events().count("on boot=pxe") == 3

        # the killed member comes back, still holding every version
        lab.start(runner)
        wait_for(f"{runner} back", lambda: lab.versions(runner).get(v3, {}).get(
            "held_by") == list(MEMBERS), timeout=30)

        # a broken v4 halts at the canary; the pool points back at v3 on every member
        v4 = lab.add(bystander, "v4", broken=True)
        wait_for("v4 on every member", lambda: lab.versions(runner).get(v4, {}).get(
            "held_by") == list(MEMBERS))
        before = {n: b.events().count("on boot=pxe") for n, b in bmcs.items()}
        started = time.monotonic()
        out = lab.cli(runner, "rollout", "start", "w", "--image", f"k8s@{v4}",
                      "--timeout", "60s", "--wait", timeout=180)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "HALTED: canary n1 failed: reported failed" in out.stdout, out.stdout
        wait_for("n1 back on v3", lambda: lab.status(runner)["n1"]["image"] == f"k8s@{v3}"
                 and lab.status(runner)["n1"]["stage"] == "joined")
        print(f"halt at the canary and revert in a cluster: {time.monotonic() - started:.1f}s")
        for name in MEMBERS:
            assert lab.versions(name)[v3]["pools"] == ["w"], name
            assert {r["desired_image"] for r in lab.status(name).values()} == {f"k8s@{v3}"}
        assert {n: b.events().count("on boot=pxe") for n, b in bmcs.items()} == {
            "n1": before["n1"] + 2, "n2": before["n2"], "n3": before["n3"]}

        # prune: what no node runs and nothing points at goes, on every member
        out = lab.cli(successor, "image", "prune", "k8s", "--keep", "0")
        assert out.returncode == 0, out.stdout + out.stderr
        assert v2 in out.stdout and v4 in out.stdout and v3 not in out.stdout, out.stdout
        assert v1 not in out.stdout  # still the promoted version
        wait_for("pruned copies deleted everywhere", lambda: not any(
            (lab.tmp / m / "images" / "k8s" / v).exists() for m in MEMBERS for v in (v2, v4)))
        assert set(lab.versions(runner)) == {v1, v3}
        wait_for("every member says it holds two versions", lambda: lab.cli(
            runner, "cluster", "status").stdout.count("k8s 2") == 3)
        assert {m["name"]: m["versions"] for m in lab.api(runner, "/api/v1/cluster")[
            "members"]} == {m: {"k8s": sorted([v1, v3])} for m in MEMBERS}
        for name in MEMBERS:
            assert not lab.log_has(name, "Traceback"), name
    finally:
        for bmc in bmcs.values():
            bmc.close()
