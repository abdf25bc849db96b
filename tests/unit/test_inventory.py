"""Inventory: merge order defaults < pool < pool tags < node < node tags; MAC lookup."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address
from pathlib import Path

from bootd.fleet.config import load_config, parse_config
from bootd.fleet.inventory import Inventory

ROOT = Path(__file__).resolve().parents[2]

CONFIG = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1}
    network: {subnet: 10.0.0.0/24}
    images:
      a: {kernel: /a/k, initrd: /a/i}
      b: {kernel: /b/k, initrd: /b/i}
    clusters:
      c1: {api_server: "https://10.0.0.10:6443", ca_cert_hash: "sha256:%s", token: {value: t}}
    defaults:
      image: a
      cluster: c1
      timezone: UTC
      kernel_args: [d]
      kernel_modules: [overlay]
      labels: {layer: defaults, d: "1"}
      taints: ["d=1:NoSchedule"]
      dhcp_options: {"42": 10.0.0.1}
      scripts: {s.sh: defaults}
    tags:
      pt1: {kernel_args: [pt1], labels: {layer: pt1}, timezone: Europe/Prague,
            dhcp_options: {"42": 10.0.0.2}, scripts: {t.sh: pt1}}
      pt2: {kernel_args: [pt2], labels: {layer: pt2, pt2: "y"}, taints: ["pt2=1:NoExecute"],
            boot: {efi64: ipxe.efi}}
      nt: {kernel_args: [nt], labels: {layer: nt}, image: b, scripts: {s.sh: nt},
           boot: {bios: custom.kpxe}}
    pools:
      - name: p
        tags: [pt1, pt2]
        kernel_args: [pool]
        labels: {layer: pool, pool: "x"}
        kernel_modules: [overlay, br_netfilter]
        nodes:
          - {name: n1, mac: ["02:00:00:00:00:01", "02:00:00:00:00:02"], ip: 10.0.0.5,
             kernel_args: [node], labels: {layer: node}, tags: [nt]}
          - {name: n2, mac: "02:00:00:00:00:03", ip: 10.0.0.6, timezone: Asia/Tokyo}
      - name: any
        tags: [pt2]
        dynamic: {range: 10.0.0.100-10.0.0.110, name: "x-{mac_hex}"}
    """ % ("0" * 64))


def inv() -> Inventory:
    return Inventory(parse_config(CONFIG))


def test_merge_order_and_accumulation() -> None:
    n1 = inv().reserved("02:00:00:00:00:01")
    assert n1 is not None
    assert n1.kernel_args == ("d", "pool", "pt1", "pt2", "node", "nt")
    assert n1.labels["layer"] == "nt"  # scalars: the last layer wins
    assert dict(n1.labels) == {"layer": "nt", "d": "1", "pool": "x", "pt2": "y"}
    assert n1.taints == ("d=1:NoSchedule", "pt2=1:NoExecute")
    assert n1.kernel_modules == ("overlay", "br_netfilter")  # appended without repeats
    assert n1.image == "b" and n1.cluster == "c1" and n1.timezone == "Europe/Prague"
    assert n1.dhcp_options == ((42, bytes([10, 0, 0, 2])),)
    assert n1.scripts == (("t.sh", "pt1"), ("s.sh", "nt"))  # overridden keys move to the end
    assert n1.boot.efi64 == "ipxe.efi" and n1.boot.bios == "custom.kpxe"
    assert n1.tags == ("pt1", "pt2", "nt")
    assert n1.pool == "p" and n1.ip == IPv4Address("10.0.0.5") and not n1.dynamic


def test_node_scalar_beats_pool_tag() -> None:
    n2 = inv().reserved("02:00:00:00:00:03")
    assert n2 is not None
    assert n2.timezone == "Asia/Tokyo"
    assert n2.boot.bios == "undionly.kpxe"


def test_two_macs_resolve_to_the_same_node() -> None:
    i = inv()
    a, b = i.resolve("02:00:00:00:00:01"), i.resolve("02:00:00:00:00:02")
    assert a is b and a is not None and a.name == "n1"
    assert a.macs == ("02:00:00:00:00:01", "02:00:00:00:00:02")


def test_catch_all_generates_name_and_has_no_ip() -> None:
    node = inv().resolve("52:54:00:ab:cd:ef")
    assert node is not None
    assert node.name == "x-525400abcdef"
    assert node.ip is None and node.dynamic and node.pool == "any"
    assert node.macs == ("52:54:00:ab:cd:ef",)
    assert node.boot.efi64 == "ipxe.efi"
    assert node.kernel_args == ("d", "pt2")


def test_catch_all_pool_bounds() -> None:
    pool = inv().catch_all
    assert pool is not None
    assert pool.size == 11
    assert IPv4Address("10.0.0.100") in pool and IPv4Address("10.0.0.111") not in pool


def test_unknown_mac_without_catch_all() -> None:
    i = Inventory(load_config(ROOT / "config" / "generic.yaml"))
    assert i.catch_all is None
    assert i.resolve("52:54:00:00:00:01") is None
    assert i.resolve("02:00:00:00:02:27") is not None


def test_reserved_ips_and_reverse_lookup() -> None:
    i = inv()
    assert i.reserved_ips == {IPv4Address("10.0.0.5"), IPv4Address("10.0.0.6")}
    node = i.by_ip(IPv4Address("10.0.0.6"))
    assert node is not None and node.name == "n2"
    assert i.by_ip(IPv4Address("10.0.0.7")) is None


def test_catch_all_profiles_cached_within_bound(monkeypatch: object) -> None:
    import bootd.fleet.inventory as module

    assert hasattr(monkeypatch, "setattr")
    monkeypatch.setattr(module, "DYNAMIC_CACHE_SIZE", 2)
    i = inv()
    a = i.resolve("52:54:00:00:00:01")
    assert i.resolve("52:54:00:00:00:01") is a
    i.resolve("52:54:00:00:00:02")
    c = i.resolve("52:54:00:00:00:03")
    assert len(i._dynamic_cache) == 2
    assert c is not None and c.name == "x-525400000003"
    again = i.resolve("52:54:00:00:00:01")
    assert again is not None and again == a and again is not a
