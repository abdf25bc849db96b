"""Config loading: every error names file, line and key path; cross-checks catch plans
that would break at boot time."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bootd.fleet.config import (
    ConfigError,
    check_hostname,
    load_config,
    parse_config,
    parse_duration,
    render_dynamic_name,
)
from bootd.fleet.mac import mac_dashed, mac_from_bytes, mac_to_bytes, normalize_mac

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
server:
  interfaces: [br0]
  address: 10.0.0.1
network:
  subnet: 10.0.0.0/24
  gateway: 10.0.0.1
"""


def errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "t.yaml")
    return [str(i) for i in info.value.issues]


# -- MACs


@pytest.mark.parametrize("text", [
    "aa:bb:cc:dd:ee:ff", "AA:BB:CC:DD:EE:FF", "AA-BB-CC-DD-EE-FF", "aabb.ccdd.eeff",
    "aabbccddeeff", " aa:bb:cc:dd:ee:ff ",
])
def test_mac_spellings_normalise(text: str) -> None:
    assert normalize_mac(text) == "aa:bb:cc:dd:ee:ff"


def test_mac_short_octets_are_zero_padded() -> None:
    assert normalize_mac("2:0:0:0:1:27") == "02:00:00:00:01:27"


@pytest.mark.parametrize("text", [
    "", "aa:bb:cc:dd:ee", "aa:bb:cc:dd:ee:ff:00", "gg:bb:cc:dd:ee:ff", "aa:bb-cc:dd:ee:ff",
    "aabb.ccdd.eef", "aabbccddeef", "aa::bb:cc:dd:ee",
])
def test_mac_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="malformed MAC"):
        normalize_mac(text)


def test_mac_bytes_round_trip() -> None:
    assert mac_from_bytes(mac_to_bytes("02-00-00-00-01-27")) == "02:00:00:00:01:27"
    assert mac_dashed("02:00:00:00:01:27") == "02-00-00-00-01-27"
    with pytest.raises(ValueError):
        mac_from_bytes(b"\x00" * 5)


# -- value types


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90.0), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0),
    ("1h30m", 5400.0), ("2d", 172800.0), ("1w", 604800.0), ("500ms", 0.5), ("1.5h", 5400.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "forever", "1x", "h", "-5", 0, "0s", True, "1h 2", [1]])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("name", ["a", "m1c27", "node-01", "a.b.c", "x" * 63])
def test_good_hostnames(name: str) -> None:
    assert check_hostname(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "a_b", "A1", "x" * 64, "a..b", "a b",
                                  "é", ("a" * 60 + ".") * 5])
def test_bad_hostnames(name: str) -> None:
    with pytest.raises(ValueError, match="invalid hostname"):
        check_hostname(name)


def test_dynamic_name_template() -> None:
    assert render_dynamic_name("node-{mac}", "52:54:00:12:34:56") == "node-52-54-00-12-34-56"
    assert render_dynamic_name("n{mac_hex}", "52:54:00:12:34:56") == "n525400123456"
    with pytest.raises(ValueError, match="only"):
        render_dynamic_name("node-{ip}", "52:54:00:12:34:56")
    with pytest.raises(ValueError, match="invalid hostname"):
        render_dynamic_name("Node_{mac}", "52:54:00:12:34:56")


# -- whole files


@pytest.mark.parametrize("name", ["generic.yaml", "catch-all.yaml"])
def test_example_configs_load(name: str) -> None:
    config = load_config(ROOT / "config" / name)
    assert config.pools


def test_minimal_config_defaults() -> None:
    config = parse_config(BASE)
    assert config.server.http_port == 8080
    assert config.server.tftp_port == 69
    assert config.server.dhcp_port == 67
    assert str(config.server.state_dir) == "/var/lib/bootd"
    assert config.network.lease_time == 3600


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml")


def test_yaml_syntax_error_has_line() -> None:
    assert errors(BASE + "pools: [\n  - a: b\n") [0].startswith("t.yaml:")


def test_empty_and_non_mapping() -> None:
    assert "empty" in errors("")[0]
    assert "mapping" in errors("- a\n- b\n")[0]


def test_missing_sections_are_named() -> None:
    out = errors("server:\n  interfaces: [br0]\n")
    assert any("server.address: Field required" in e for e in out)
    assert any("network: Field required" in e for e in out)


def test_duplicate_yaml_key_reported_with_line() -> None:
    out = errors(BASE + "images: {}\nimages: {}\n")
    assert "t.yaml:8: images: duplicate key" in out[0]


def test_unknown_key_rejected_with_line() -> None:
    out = errors(BASE + "  colour: red\n")
    assert out == ["t.yaml:7: network.colour: Extra inputs are not permitted"]


def test_every_structural_error_listed_with_its_line() -> None:
    out = errors(BASE + """\
  lease_time: forever
tags:
  t: {taints: ["bad taint"], labels: {"bad key!": x}}
pools:
  - name: Workers
    nodes:
      - {name: a1, mac: "zz:00:00:00:00:01", ip: 10.0.0.5}
      - {name: a_2, mac: "02:00:00:00:00:02", ip: 300.0.0.1}
""")
    text = "\n".join(out)
    assert "t.yaml:7: network.lease_time: bad duration 'forever'" in text
    assert "t.yaml:9: tags.t.taints: invalid taint 'bad taint'" in text
    assert "t.yaml:9: tags.t.labels: invalid Kubernetes label key 'bad key!'" in text
    assert "t.yaml:11: pools.0.name: invalid hostname 'Workers'" in text
    assert "t.yaml:13: pools.0.nodes.0.mac: malformed MAC" in text
    assert "t.yaml:14: pools.0.nodes.1.name: invalid hostname 'a_2'" in text
    assert "t.yaml:14: pools.0.nodes.1.ip:" in text


def test_cross_checks() -> None:
    out = errors(BASE + """\
images:
  img: {kernel: /k, initrd: /i}
defaults:
  image: nope
  cluster: nope
pools:
  - name: w
    tags: [missing]
    nodes:
      - {name: a1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}
      - {name: a2, mac: "02-00-00-00-00-01", ip: 10.0.0.5, tags: [gone]}
      - {name: a1, mac: "02:00:00:00:00:03", ip: 10.0.1.7}
      - {name: a4, mac: ["02:00:00:00:00:04", "02:00:00:00:00:03"], ip: 10.0.0.255}
      - {name: a5, mac: "02:00:00:00:00:05", ip: 10.0.0.1}
""")
    text = "\n".join(out)
    assert "t.yaml:10: defaults.image: unknown image 'nope'" in text
    assert "t.yaml:11: defaults.cluster: unknown cluster 'nope'" in text
    assert "t.yaml:14: pools.0.tags.0: unknown tag 'missing'" in text
    assert ("t.yaml:17: pools.0.nodes.1.mac: duplicate MAC 02:00:00:00:00:01 (also node w/a1)"
            in text)
    assert "t.yaml:17: pools.0.nodes.1.ip: duplicate IP 10.0.0.5" in text
    assert "t.yaml:17: pools.0.nodes.1.tags.0: unknown tag 'gone'" in text
    assert "t.yaml:18: pools.0.nodes.2.name: duplicate node name 'a1'" in text
    assert "t.yaml:18: pools.0.nodes.2.ip: 10.0.1.7 is outside network.subnet 10.0.0.0/24" in text
    assert "t.yaml:19: pools.0.nodes.3.mac.1: duplicate MAC 02:00:00:00:00:03" in text
    assert "pools.0.nodes.3.ip: 10.0.0.255 is the network or broadcast address" in text
    assert "t.yaml:20: pools.0.nodes.4.ip: 10.0.0.1 is bootd's own server.address" in text


def test_node_mac_listed_twice_within_node() -> None:
    out = errors(BASE + """\
pools:
  - name: w
    nodes:
      - {name: a1, mac: ["02:00:00:00:00:01", "02-00-00-00-00-01"], ip: 10.0.0.5}
""")
    assert "same MAC is listed twice" in out[0]


@pytest.mark.parametrize(("rng", "message"), [
    ("10.0.0.100-10.0.1.10", "leaves the subnet"),
    ("10.0.0.0-10.0.0.10", "network or broadcast"),
    ("10.0.0.2-10.0.0.10", "overlaps reserved addresses 10.0.0.5 (w/a1)"),
    ("10.0.0.1-10.0.0.3", "contains server.address 10.0.0.1"),
    ("10.0.0.20-10.0.0.10", "FIRST <= LAST"),
    ("10.0.0.20", "FIRST-LAST"),
    ("10.0.0.x-10.0.0.9", "FIRST-LAST"),
])
def test_dynamic_range_checks(rng: str, message: str) -> None:
    out = errors(BASE + f"""\
pools:
  - name: w
    nodes:
      - {{name: a1, mac: "02:00:00:00:00:01", ip: 10.0.0.5}}
  - name: any
    dynamic: {{range: {rng}}}
""")
    assert any(message in e and "pools.1.dynamic.range" in e for e in out), out


def test_only_one_catch_all() -> None:
    out = errors(BASE + """\
pools:
  - {name: a, dynamic: {range: 10.0.0.100-10.0.0.110}}
  - {name: b, dynamic: {range: 10.0.0.120-10.0.0.130}}
""")
    assert "pools.1.dynamic: only one catch-all pool" in out[0]


def test_dynamic_name_template_validated_at_load() -> None:
    out = errors(BASE + "pools:\n  - {name: a, dynamic: {range: 10.0.0.100-10.0.0.110, "
                 "name: 'x_{mac}'}}\n")
    assert "pools.0.dynamic.name: invalid hostname" in out[0]


def test_gateway_outside_subnet() -> None:
    out = errors(BASE.replace("gateway: 10.0.0.1", "gateway: 192.0.2.1"))
    assert "network.gateway: 192.0.2.1 is outside network.subnet" in out[0]


@pytest.mark.parametrize(("options", "message"), [
    ('{"53": 1}', "managed by bootd"),
    ('{"999": x}', "outside 1..254"),
    ('{frobnicate: x}', "unknown DHCP option name"),
    ('{"42": "not-an-ip"}', "option 42"),
    ('{mtu: big}', "option 26"),
    ('{"19": maybe}', "boolean"),
    ('{"200": "hex:zz"}', "bad hex"),
    ('{"3": []}', "at least one"),
])
def test_bad_dhcp_options(options: str, message: str) -> None:
    out = errors(BASE + f"tags:\n  t:\n    dhcp_options: {options}\n")
    assert any("tags.t.dhcp_options" in e and message in e for e in out), out


@pytest.mark.parametrize(("section", "message"), [
    ("token: {value: a, file: /b}", "exactly one of value, file or command"),
    ("token: {}", "exactly one"),
])
def test_cluster_token_sources(section: str, message: str) -> None:
    out = errors(BASE + f"""\
clusters:
  c:
    api_server: https://10.0.0.10:6443
    ca_cert_hash: sha256:{'a' * 64}
    {section}
""")
    assert any(message in e for e in out), out


def test_cluster_fields_validated() -> None:
    out = errors(BASE + """\
clusters:
  c:
    api_server: http://10.0.0.10:6443
    ca_cert_hash: md5:abc
    token: {value: abc}
""")
    text = "\n".join(out)
    assert "clusters.c.api_server: api_server must be https://" in text
    assert "clusters.c.ca_cert_hash: ca_cert_hash must be sha256:" in text


@pytest.mark.parametrize(("key", "ok"), [
    ("foo", True), ("example.com/foo", True), ("topology.kubernetes.io/zone", True),
    ("node.kubernetes.io/pool", True), ("kubelet.kubernetes.io/x", True),
    ("node-role.kubernetes.io/worker", False), ("kubernetes.io/foo", False),
    ("k8s.io/foo", False), ("x.k8s.io/foo", False), ("kubernetes.io/hostname", True),
])
def test_labels_the_kubelet_may_set(key: str, ok: bool) -> None:
    text = BASE + f"defaults:\n  labels: {{{key}: v}}\n"
    if ok:
        parse_config(text)
    else:
        assert "NodeRestriction" in errors(text)[0]


@pytest.mark.parametrize(("field", "value"), [
    ("kernel_args", '["two words"]'),
    ("kernel_modules", '["bad/module"]'),
    ("scripts", '{"../evil.sh": "x"}'),
    ("labels", '{a: "bad value!"}'),
])
def test_profile_field_checks(field: str, value: str) -> None:
    out = errors(BASE + f"defaults:\n  {field}: {value}\n")
    assert any(f"defaults.{field}" in e for e in out), out


def test_server_interface_checks() -> None:
    out = errors(BASE.replace("[br0]", "[br0, br0]"))
    assert "server.interfaces: an interface is listed twice" in out[0]
    out = errors(BASE.replace("[br0]", "[]"))
    assert "server.interfaces" in out[0]
