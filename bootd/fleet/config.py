"""The configuration contract: one YAML file, validated once into typed data.

Every error names the file, the line and the key path, so `bootd check` reads like a
compiler. Structural checks are pydantic's; cross-references (tags, images, clusters,
duplicate MACs/IPs, address plans) are checked here after the structure is sound.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bootd.dhcp.options import OptionValue, encode_option_value, option_code
from bootd.fleet.mac import mac_dashed, normalize_mac

DEFAULT_CONFIG_PATH = Path("/etc/bootd/bootd.yaml")

# ---------------------------------------------------------------------------- value types

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    """`90`, `"90s"`, `"1h30m"`, `"2d"` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 1h or 12h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise ValueError(f"bad duration {value!r} (expected e.g. 30s, 10m, 1h, 12h, 1d)")
    else:
        raise ValueError("expected a duration such as 30s, 1h or 12h")
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_hostname(name: str) -> str:
    """RFC 1123 host name, lower case (Kubernetes node names must be)."""
    if not name or len(name) > 253:
        raise ValueError(f"invalid hostname {name!r}: must be 1-253 characters")
    if name != name.lower():
        raise ValueError(f"invalid hostname {name!r}: must be lower case (Kubernetes node name)")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValueError(
                f"invalid hostname {name!r}: each label must be 1-63 of a-z, 0-9 and '-', "
                "not starting or ending with '-' (RFC 1123)"
            )
    return name


def _mac(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"malformed MAC address {value!r}")
    return normalize_mac(value)


def _mac_list(value: object) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("a node needs at least one MAC address")
    macs = [_mac(v) for v in items]
    if len(set(macs)) != len(macs):
        raise ValueError("the same MAC is listed twice")
    return macs


Duration = Annotated[float, BeforeValidator(parse_duration)]
Hostname = Annotated[str, BeforeValidator(lambda v: check_hostname(str(v)))]
MacList = Annotated[list[str], BeforeValidator(_mac_list)]

_TAINT = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?(=[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
    r":(NoSchedule|PreferNoSchedule|NoExecute)$"
)
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SCRIPT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# Labels in the kubernetes.io / k8s.io namespaces that a kubelet may set on its own node
# (NodeRestriction); any other there makes `kubelet --node-labels` refuse to start.
_KUBELET_LABELS = frozenset({
    "kubernetes.io/hostname", "kubernetes.io/os", "kubernetes.io/arch",
    "beta.kubernetes.io/os", "beta.kubernetes.io/arch", "beta.kubernetes.io/instance-type",
    "node.kubernetes.io/instance-type", "failure-domain.beta.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone", "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
})
_KUBELET_LABEL_NAMESPACES = ("kubelet.kubernetes.io", "node.kubernetes.io")


def kubelet_may_set(key: str) -> bool:
    prefix = key.split("/", 1)[0] if "/" in key else ""
    reserved = any(prefix == d or prefix.endswith("." + d) for d in ("kubernetes.io", "k8s.io"))
    if not reserved or key in _KUBELET_LABELS:
        return True
    return any(prefix == ns or prefix.endswith("." + ns) for ns in _KUBELET_LABEL_NAMESPACES)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- sections


class ServerConfig(_Model):
    interfaces: list[str] = Field(min_length=1)
    address: IPv4Address
    http_port: int = Field(default=8080, ge=1, le=65535)
    tftp_port: int = Field(default=69, ge=1, le=65535)
    dhcp_port: int = Field(default=67, ge=1, le=65535)
    api: str = "/run/bootd/api.sock"
    state_dir: Path = Path("/var/lib/bootd")
    # where `bootd image add` keeps image versions (default: <state_dir>/images)
    images_dir: Path | None = None
    # on SIGTERM: how long transfers and downloads in flight may take to finish
    drain_timeout: Duration = 30.0

    @property
    def image_store(self) -> Path:
        return self.images_dir if self.images_dir is not None else self.state_dir / "images"

    @field_validator("api")
    @classmethod
    def _api_not_on_boot_network(cls, v: str) -> str:
        if v.startswith("/"):
            return v
        host, sep, port = v.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("api must be a unix socket path or loopback HOST:PORT")
        if host != "localhost":
            try:
                loopback = ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError(f"api must listen on loopback or a unix socket, not {host!r}"
                                 " (the admin API never goes on the boot network)")
        return v

    @field_validator("interfaces")
    @classmethod
    def _interface_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name or len(name) > 15 or "/" in name or " " in name:
                raise ValueError(f"invalid interface name {name!r}")
        if len(set(v)) != len(v):
            raise ValueError("an interface is listed twice")
        return v


class NetworkConfig(_Model):
    """`network:`, the one-network shorthand: the subnet bootd's interfaces are on."""

    subnet: IPv4Network
    gateway: IPv4Address | None = None
    dns: list[IPv4Address] = []
    domain: str | None = None
    lease_time: Duration = 3600.0
    # bootd's address as this subnet reaches it (siaddr, server id, URLs); default
    # server.address
    next_server: IPv4Address | None = None

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        return None if v is None else check_hostname(v.rstrip("."))


class NamedNetworkConfig(NetworkConfig):
    """One entry of `networks:`: a subnet served directly or behind DHCP relays."""

    name: Hostname


DEFAULT_NETWORK = "default"  # the name `network:` gets


class ImageConfig(_Model):
    kernel: Path
    initrd: Path
    rootfs: Path | None = None
    cmdline: str = ""


class TokenConfig(_Model):
    value: str | None = None
    file: Path | None = None
    command: str | None = None
    refresh: Duration = 12 * 3600.0
    timeout: Duration = 30.0
    # per_node: `command` mints a token for each node and boot attempt (with {node},
    # {mac} and {ip} in the command and BOOTD_NODE/MAC/IP in its environment); it is
    # revoked by `revoke` ({token_id}, {token}, {node}, ...) after the node reports
    # joined or failed, when its next attempt mints another, or after `ttl`
    per_node: bool = False
    revoke: str | None = None
    ttl: Duration = 900.0
    max_catch_all: int = Field(default=20, ge=0, le=100000)  # outstanding, catch-all nodes

    @model_validator(mode="after")
    def _exactly_one(self) -> TokenConfig:
        given = [k for k in ("value", "file", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("token needs exactly one of value, file or command")
        if self.per_node and self.command is None:
            raise ValueError("per_node tokens are minted by a command")
        if self.revoke is not None and not self.per_node:
            raise ValueError("revoke is for per_node tokens")
        return self


# what a BMC address may be templated from, per node: `host: "10.0.9.{ip_last}"`
POWER_FIELDS = frozenset({"name", "mac", "ip", "ip_last", "pool"})


def _check_template(v: str) -> str:
    for _, field_name, _, _ in string.Formatter().parse(v):
        if field_name is not None and field_name not in POWER_FIELDS:
            raise ValueError(f"unknown placeholder {{{field_name}}} (known: "
                             + ", ".join(sorted(POWER_FIELDS)) + ")")
    return v


class SecretConfig(_Model):
    """A credential: inline (`value`) or read from a file when used (`file`)."""

    value: str | None = Field(default=None, repr=False)
    file: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> SecretConfig:
        if (self.value is None) == (self.file is None):
            raise ValueError("a password needs exactly one of value or file")
        return self


class IpmiConfig(_Model):
    host: Annotated[str, AfterValidator(_check_template)]
    port: int = Field(default=623, ge=1, le=65535)
    username: str
    password: SecretConfig


class RedfishConfig(_Model):
    url: Annotated[str, AfterValidator(_check_template)]  # https://BMC (the service root)
    username: str
    password: SecretConfig
    verify_tls: bool = True
    ca: Path | None = None  # a CA bundle to verify the BMC's certificate with
    system: str | None = None  # the ComputerSystem's id; default: the BMC's only one

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/.*)?", v):
            raise ValueError(f"url must be http(s)://host[:port], got {v!r}")
        return v.rstrip("/")


class PowerConfig(_Model):
    """How bootd reaches a node's BMC: IPMI (pyghmi) or Redfish (sushy)."""

    ipmi: IpmiConfig | None = None
    redfish: RedfishConfig | None = None
    timeout: Duration = 30.0  # per BMC and action

    @model_validator(mode="after")
    def _one(self) -> PowerConfig:
        if (self.ipmi is None) == (self.redfish is None):
            raise ValueError("power needs exactly one of ipmi or redfish")
        return self


class ClusterConfig(_Model):
    api_server: str
    ca_cert_hash: str
    token: TokenConfig

    @field_validator("api_server")
    @classmethod
    def _api(cls, v: str) -> str:
        if not re.fullmatch(r"https://[^\s/]+(:\d+)?/?", v):
            raise ValueError(f"api_server must be https://host[:port], got {v!r}")
        return v.rstrip("/")

    @field_validator("ca_cert_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", v):
            raise ValueError("ca_cert_hash must be sha256:<64 lower-case hex digits>")
        return v


class EtcdTlsConfig(_Model):
    ca: Path
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> EtcdTlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key (a client certificate), or neither")
        return self


class EtcdConfig(_Model):
    endpoints: list[str] = Field(min_length=1)
    prefix: str = "/bootd/"
    tls: EtcdTlsConfig | None = None
    timeout: Duration = 2.0  # per etcd request (claims, keep-alives, reads)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.fullmatch(r"https?://[A-Za-z0-9.-]+:\d{1,5}/?", url):
                raise ValueError(f"etcd endpoint must be http(s)://host:port, got {url!r}")
        if len({url.split("://")[0] for url in v}) > 1:
            raise ValueError("etcd endpoints mix http and https")
        return [url.rstrip("/") for url in v]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"/[A-Za-z0-9._/-]*/", v) or "//" in v:
            raise ValueError(f"prefix must start and end with '/', got {v!r}")
        return v

    @model_validator(mode="after")
    def _tls_scheme(self) -> EtcdConfig:
        if (self.tls is not None) != self.endpoints[0].startswith("https://"):
            raise ValueError("https endpoints need `tls` (at least its ca) and http ones none")
        return self


class MembershipConfig(_Model):
    """`cluster:` - several bootd instances sharing one fleet's state on etcd."""

    member: Hostname = Field(default_factory=lambda: _default_member())
    etcd: EtcdConfig
    member_ttl: Duration = 5.0
    # A member answers a client it does not own once the client's `secs` field says it
    # has waited this long (Kea's max-ack-delay): failover for that client does not wait
    # for the owner's etcd lease to expire.
    takeover_after: Duration = 4.0


def _default_member() -> str:
    name = socket.gethostname().split(".")[0].lower()
    return name if _LABEL.match(name) else "bootd"


class BootConfig(_Model):
    """Which boot program each firmware gets; any field may be set per pool, tag or node."""

    bios: str | None = None
    efi32: str | None = None
    efi64: str | None = None
    arm64: str | None = None
    ipxe_script: str | None = None  # URL iPXE is sent to instead of bootd's /boot.ipxe


class ProfileConfig(_Model):
    """The fields that defaults, tags, pools and nodes share and merge."""

    image: str | None = None
    cluster: str | None = None
    timezone: str | None = None
    ssh_authorized_keys: list[str] = []
    kernel_modules: list[str] = []
    kernel_args: list[str] = []
    labels: dict[str, str] = {}
    taints: list[str] = []
    dhcp_options: dict[str, OptionValue] = {}
    scripts: dict[str, str] = {}
    boot: BootConfig = BootConfig()
    power: PowerConfig | None = None  # a later layer's replaces an earlier one's

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, v: object) -> object:
        if isinstance(v, dict):
            for key, val in v.items():
                if not isinstance(key, str) or not _LABEL_KEY.match(key):
                    raise ValueError(f"invalid Kubernetes label key {key!r}")
                if not kubelet_may_set(key):
                    raise ValueError(
                        f"label {key!r} is in a namespace the kubelet may not set on its own "
                        "node (NodeRestriction): kubelet would refuse to start; use a "
                        "node.kubernetes.io/ or your own prefix")
                if isinstance(val, bool | int | float):
                    val = str(val).lower() if isinstance(val, bool) else str(val)
                if not isinstance(val, str) or not _LABEL_VALUE.match(val):
                    raise ValueError(f"invalid Kubernetes label value {val!r} for {key!r}")
            return {k: (str(x).lower() if isinstance(x, bool) else str(x)) for k, x in v.items()}
        return v

    @field_validator("taints")
    @classmethod
    def _taints(cls, v: list[str]) -> list[str]:
        for t in v:
            if not _TAINT.match(t):
                raise ValueError(
                    f"invalid taint {t!r} (expected key[=value]:NoSchedule|PreferNoSchedule|"
                    "NoExecute)"
                )
        return v

    @field_validator("dhcp_options", mode="before")
    @classmethod
    def _option_keys(cls, v: object) -> object:
        if isinstance(v, dict):
            return {str(k): val for k, val in v.items()}
        return v

    @field_validator("dhcp_options")
    @classmethod
    def _options(cls, v: dict[str, OptionValue]) -> dict[str, OptionValue]:
        for key, value in v.items():
            encode_option_value(option_code(key), value)
        return v

    @field_validator("scripts")
    @classmethod
    def _scripts(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _SCRIPT_NAME.match(name):
                raise ValueError(f"invalid script name {name!r} (a plain file name)")
        return v

    @field_validator("kernel_modules")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for m in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", m):
                raise ValueError(f"invalid kernel module name {m!r}")
        return v

    @field_validator("kernel_args")
    @classmethod
    def _kargs(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a or any(c.isspace() for c in a):
                raise ValueError(f"kernel argument {a!r} must be one word (no spaces)")
        return v


class PortConfig(_Model):
    """A node identified by the switch port it is cabled to, as its relay reports it in
    option 82 (RFC 3046): the relay's address (giaddr), the circuit-id and optionally the
    remote-id. Whatever MAC boots there is this node."""

    relay: IPv4Address
    circuit_id: str = Field(min_length=1, max_length=255)
    remote_id: str | None = Field(default=None, min_length=1, max_length=255)


class NodeConfig(ProfileConfig):
    name: Hostname
    mac: MacList = []
    port: PortConfig | None = None
    ip: IPv4Address
    tags: list[str] = []

    @model_validator(mode="after")
    def _identity(self) -> NodeConfig:
        if not self.mac and self.port is None:
            raise ValueError("a node needs a `mac` or a `port` (switch port, option 82)")
        return self


def _range(v: str) -> str:
    lo, sep, hi = v.partition("-")
    try:
        a, b = IPv4Address(lo.strip()), IPv4Address(hi.strip())
    except ValueError:
        raise ValueError(f"range must be FIRST-LAST addresses, got {v!r}") from None
    if not sep or a > b:
        raise ValueError(f"range must be FIRST-LAST with FIRST <= LAST, got {v!r}")
    return f"{a}-{b}"


def range_bounds(text: str) -> tuple[IPv4Address, IPv4Address]:
    lo, _, hi = text.partition("-")
    return IPv4Address(lo.strip()), IPv4Address(hi.strip())


AddressRange = Annotated[str, BeforeValidator(lambda v: _range(str(v)))]


class DynamicConfig(_Model):
    """The catch-all pool's addresses: `range` (one), or `ranges` (one or more per network
    of a routed fleet). Each range lies inside one network."""

    range: AddressRange | None = None
    ranges: list[AddressRange] = []
    name: str = "node-{mac}"
    # approve: a machine's join.sh waits (polling every approval_poll) until an operator
    # runs `bootd approve NODE` (enlistment, as in MAAS); auto: it joins at once
    join: Literal["auto", "approve"] = "auto"
    approval_poll: Duration = 15.0

    @model_validator(mode="after")
    def _one_form(self) -> DynamicConfig:
        if (self.range is None) == (not self.ranges):
            raise ValueError("give either `range` or `ranges`")
        return self

    def all_ranges(self) -> list[str]:
        return [self.range] if self.range is not None else list(self.ranges)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        render_dynamic_name(v, "02:00:00:ab:cd:ef")
        return v


def render_dynamic_name(template: str, mac: str) -> str:
    """A catch-all node's name: `{mac}` is the dashed MAC, `{mac_hex}` the bare hex digits."""
    dashed = mac_dashed(mac)
    try:
        name = template.format(mac=dashed, mac_hex=dashed.replace("-", ""))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"name template {template!r}: only {{mac}} and {{mac_hex}} may be used ({exc})"
        ) from None
    return check_hostname(name)


class PoolConfig(ProfileConfig):
    name: Hostname
    tags: list[str] = []
    nodes: list[NodeConfig] = []
    dynamic: DynamicConfig | None = None


class TftpConfig(_Model):
    root: Path = Path("/srv/bootd/tftp")
    # where iPXE binaries are found when the root does not have them (Debian's ipxe)
    fallback_dirs: list[Path] = [Path("/usr/lib/ipxe")]
    single_port: bool = False  # serve every transfer from tftp_port (NAT, k8s Service)
    max_blksize: int | None = Field(default=None, ge=8, le=65464)  # default: interface MTU - 32
    max_windowsize: int = Field(default=64, ge=1, le=65535)
    timeout: Duration = 1.0  # first retransmission; doubles up to 8s
    retries: int = Field(default=6, ge=1, le=50)
    # before the client's first ACK: an RRQ from a forged address is cheap to send
    unconfirmed_retries: int = Field(default=2, ge=0, le=50)
    max_transfers: int = Field(default=1000, ge=1, le=100000)
    # one address cannot hold every slot (a PXE client needs one or two at a time)
    max_transfers_per_client: int = Field(default=4, ge=1, le=100000)


class IpxeConfig(_Model):
    """What iPXE does for a machine bootd cannot boot (unknown MAC, missing image)."""

    retry_interval: Duration = 10.0
    attempts: int = Field(default=6, ge=1, le=1000)  # then `exit 1`: next boot device


class EventsConfig(_Model):
    stall_after: Duration = 600.0  # no progress this long: the node is `stalled`
    keep_attempts: int = Field(default=10, ge=1, le=1000)  # per node, in the state database


class Config(_Model):
    server: ServerConfig
    network: NetworkConfig | None = None
    networks: list[NamedNetworkConfig] = []
    tftp: TftpConfig = TftpConfig()
    ipxe: IpxeConfig = IpxeConfig()
    events: EventsConfig = EventsConfig()
    images: dict[str, ImageConfig] = {}
    clusters: dict[str, ClusterConfig] = {}
    cluster: MembershipConfig | None = None  # absent: one instance on SQLite
    defaults: ProfileConfig = ProfileConfig()
    tags: dict[str, ProfileConfig] = {}
    pools: list[PoolConfig] = []

    @model_validator(mode="after")
    def _one_network_form(self) -> Config:
        if (self.network is None) == (not self.networks):
            raise ValueError("give either `network` (one subnet) or `networks` (several)")
        return self

    def all_networks(self) -> list[NamedNetworkConfig]:
        """Every network served; `network:` is the one named "default"."""
        if self.network is not None:
            return [NamedNetworkConfig(name=DEFAULT_NETWORK, **self.network.model_dump())]
        return list(self.networks)


# ---------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.path or '(top)'}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one config file, each with its line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


Loc = tuple[str | int, ...]


class _SourceMap:
    """Remembers on which line each key path of the YAML document starts."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[Loc, int] = {}
        self.duplicates: list[tuple[Loc, int]] = []

    def walk(self, node: yaml.Node, loc: Loc = ()) -> None:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                child = (*loc, key)
                if key in seen:
                    self.duplicates.append((child, key_node.start_mark.line + 1))
                seen.add(key)
                self.lines[child] = key_node.start_mark.line + 1
                self.walk(value_node, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, (*loc, i))

    def line_of(self, loc: Loc) -> int:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        path = ".".join(str(p) for p in loc)
        return ConfigIssue(self.file, self.line_of(loc), path, message)


def _clean_loc(loc: Loc, data: object) -> Loc:
    """Drop pydantic's union-branch markers (`str`, `list[str]`) from an error location."""
    out: list[str | int] = []
    cur: object = data
    for i, part in enumerate(loc):
        in_dict = isinstance(cur, dict) and part in cur
        in_list = isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur)
        if in_dict or in_list:
            cur = cur[part]  # type: ignore[index]
        elif i == len(loc) - 1 and isinstance(cur, dict):
            pass  # a missing key: keep its name
        else:
            break
        out.append(part)
    return tuple(out)


# ---------------------------------------------------------------------------- loading


def dropin_dir(path: str | Path) -> Path:
    """Where drop-ins of a config file live: `bootd.yaml.d/` beside `bootd.yaml`."""
    return Path(f"{path}.d")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), 0, "", f"cannot read: {exc.strerror}")],
                          ) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(path), 0, "", "not UTF-8 text")]) from None


_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(text: str, file: str, env: Mapping[str, str]) -> str:
    """`${env:NAME}` -> the environment variable NAME, for what differs per host when one
    config serves every member of a cluster (a DaemonSet passes the node's name and
    address). Only this spelling: boot scripts in a config are full of shell's `${X}`.
    An unset variable is an error at its line, never an empty string."""
    issues = []
    for number, line in enumerate(text.splitlines(), 1):
        for name in dict.fromkeys(_ENV_REF.findall(line)):
            if name not in env:
                issues.append(ConfigIssue(file, number, "", f"${{env:{name}}}: the "
                                          f"environment variable {name} is not set"))
    if issues:
        raise ConfigError(issues)
    return _ENV_REF.sub(lambda m: env[m.group(1)], text)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate a config file and its drop-ins (`<file>.d/*.yaml`, in name
    order: `nodes:` added to the config's pools, as `bootd promote` writes them); raise
    ConfigError listing every problem, each at its file and line. `${env:NAME}` in the
    main file is replaced from `env` (default: this process's environment)."""
    text = expand_env(_read(Path(path)), str(path), os.environ if env is None else env)
    dropins = sorted(dropin_dir(path).glob("*.yaml")) if dropin_dir(path).is_dir() else []
    return parse_config(text, str(path), [(str(p), _read(p)) for p in dropins])


def image_store_of(path: str | Path, env: Mapping[str, str] | None = None) -> Path:
    """Where a config keeps its image store, read from its `server:` block alone: `bootd
    image add` must work while the config names an image that is not stored yet."""
    text = expand_env(_read(Path(path)), str(path), os.environ if env is None else env)
    data, source = _document(text, str(path))
    server = data.get("server") if isinstance(data, dict) else None
    try:
        return ServerConfig.model_validate(server).image_store
    except ValidationError as exc:
        raise ConfigError([source.issue(("server", *_clean_loc(tuple(e["loc"]), server)),
                                        e["msg"]) for e in exc.errors()]) from None


def cluster_mode_of(path: str | Path, env: Mapping[str, str] | None = None) -> bool:
    """Whether a config has a `cluster:` block, read without validating the rest (like
    image_store_of): `bootd image` then works through the daemon and etcd."""
    text = expand_env(_read(Path(path)), str(path), os.environ if env is None else env)
    data, _ = _document(text, str(path))
    return isinstance(data, dict) and data.get("cluster") is not None


def _document(text: str, file: str) -> tuple[object, _SourceMap]:
    """A YAML document and where each of its key paths starts."""
    source = _SourceMap(file)
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise ConfigError([ConfigIssue(file, 1, "", "the file is empty")])
            source.walk(node)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 1
        raise ConfigError([ConfigIssue(file, line, "", f"YAML: {exc.problem}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(file, 1, "", f"YAML: {exc}")]) from None
    return data, source


class _Sources:
    """The main file's source map, and the drop-in nodes merged into its pools: an issue
    about `pools.I.nodes.J...` of a merged node is reported at its drop-in's line."""

    def __init__(self, main: _SourceMap) -> None:
        self.main = main
        self.merged: dict[Loc, tuple[_SourceMap, Loc]] = {}

    def issue(self, loc: Loc, message: str) -> ConfigIssue:
        where = self.merged.get(loc[:4])
        if where is not None:
            return where[0].issue((*where[1], *loc[4:]), message)
        return self.main.issue(loc, message)


def _merge_dropin(data: dict[str, Any], sources: _Sources, file: str, text: str,
                  ) -> list[ConfigIssue]:
    """Add a drop-in's `nodes:` (each naming its `pool`) to the pools of `data`."""
    dropin, source = _document(text, file)
    issues = [source.issue(loc, "duplicate key (the later one would win)")
              for loc, _ in source.duplicates]
    if not isinstance(dropin, dict) or set(dropin) - {"nodes"}:
        return [*issues, source.issue((), "a drop-in holds only `nodes:` (a list of nodes, "
                                      "each with the `pool` it belongs to)")]
    nodes = dropin.get("nodes") or []
    if not isinstance(nodes, list):
        return [*issues, source.issue(("nodes",), "must be a list of nodes")]
    pools = data.get("pools") if isinstance(data.get("pools"), list) else []
    assert isinstance(pools, list)
    for j, node in enumerate(nodes):
        if not isinstance(node, dict):
            issues.append(source.issue(("nodes", j), "a node is a mapping"))
            continue
        index = next((i for i, pool in enumerate(pools) if isinstance(pool, dict)
                      and pool.get("name") == node.get("pool")), None)
        if index is None:
            issues.append(source.issue(("nodes", j, "pool"),
                                       f"no pool named {node.get('pool')!r} in the config"))
            continue
        members = pools[index].setdefault("nodes", [])
        if not isinstance(members, list):
            continue  # the main file's own error says so
        members.append({k: v for k, v in node.items() if k != "pool"})
        sources.merged[("pools", index, "nodes", len(members) - 1)] = (source, ("nodes", j))
    return issues


def parse_config(text: str, file: str = "<config>",
                 dropins: list[tuple[str, str]] | None = None) -> Config:
    """Parse and validate a config's text (and its drop-ins' as (file, text))."""
    data, source = _document(text, file)
    sources = _Sources(source)
    issues = [source.issue(loc, "duplicate key (the later one would win)")
              for loc, _ in source.duplicates]
    if isinstance(data, dict):
        for dropin_file, dropin_text in dropins or []:
            issues += _merge_dropin(data, sources, dropin_file, dropin_text)
    if not isinstance(data, dict):
        raise ConfigError([*issues, source.issue((), "the top level must be a mapping")])
    if "network" not in data and "networks" not in data:
        issues.append(source.issue(("network",), "Field required (or `networks`, for "
                                   "several subnets)"))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]), data)
            msg = err["msg"].removeprefix("Value error, ")
            if "give either `network`" not in msg or not issues:
                issues.append(sources.issue(loc, msg))
        raise ConfigError(issues) from None
    issues += [sources.issue(loc, msg) for loc, msg in cross_check(config)]
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.file != file, i.file, i.line)))
    return config


# ---------------------------------------------------------------------------- cross-checks


def _profiles(config: Config) -> Iterator[tuple[Loc, ProfileConfig]]:
    yield ("defaults",), config.defaults
    for name, tag in config.tags.items():
        yield ("tags", name), tag
    for i, pool in enumerate(config.pools):
        yield ("pools", i), pool
        for j, node in enumerate(pool.nodes):
            yield ("pools", i, "nodes", j), node


def stored_images(root: Path) -> dict[str, set[str]]:
    """The image store's images and versions (`bootd image add`), read from disk: a
    profile may name them instead of an `images:` entry."""
    out: dict[str, set[str]] = {}
    with contextlib.suppress(OSError):
        for image in root.iterdir():
            if image.is_dir() and not image.name.startswith("."):
                out[image.name] = {v.name for v in image.iterdir()
                                   if v.is_dir() and not v.name.startswith(".")}
    return out


def _image_problem(ref: str, unmanaged: Mapping[str, ImageConfig],
                   managed: Mapping[str, set[str]] | None) -> str | None:
    """`managed` None: cluster mode, where the versions are etcd's and this member may
    not have fetched one yet (bootd/fleet/imagesync.py); an unknown one boots nothing
    and `bootd explain` says why."""
    name, _, version = ref.partition("@")
    if name in unmanaged:
        return (f"image {name!r} is declared by paths (one version): {ref!r} cannot pin "
                "a version" if version else None)
    if managed is None:
        return None
    if name not in managed:
        return f"unknown image {name!r} (not under `images:`, not in the image store)"
    if version and version not in managed[name]:
        return f"image {name!r} has no version {version!r} in the image store"
    return None


def cross_check(config: Config) -> list[tuple[Loc, str]]:
    """Checks that need the whole document: references, uniqueness, address plan."""
    errors: list[tuple[Loc, str]] = []
    networks = config.all_networks()
    net_loc: list[Loc] = ([("network",)] if config.network is not None
                          else [("networks", i) for i in range(len(networks))])

    managed = stored_images(config.server.image_store)
    for name in sorted(set(managed) & set(config.images)):
        errors.append((("images", name), f"image {name!r} is also in the image store "
                       f"({config.server.image_store / name}): one name, one kind"))
    for loc, prof in _profiles(config):
        if prof.image is not None and (problem := _image_problem(
                prof.image, config.images, managed if config.cluster is None else None,
                )) is not None:
            errors.append(((*loc, "image"), problem))
        if prof.cluster is not None and prof.cluster not in config.clusters:
            errors.append(((*loc, "cluster"), f"unknown cluster {prof.cluster!r}"))
        tags = prof.tags if isinstance(prof, PoolConfig | NodeConfig) else []
        for k, tag in enumerate(tags):
            if tag not in config.tags:
                errors.append(((*loc, "tags", k), f"unknown tag {tag!r}"))

    names: dict[str, int] = {}
    for i, net in enumerate(networks):
        if net.name in names:
            errors.append(((*net_loc[i], "name"), f"duplicate network name {net.name!r}"))
        names.setdefault(net.name, i)
        for other in networks[:i]:
            if net.subnet.overlaps(other.subnet):
                errors.append(((*net_loc[i], "subnet"),
                               f"{net.subnet} overlaps network {other.name} ({other.subnet})"))

    def where(ip: IPv4Address) -> tuple[NamedNetworkConfig | None, str | None]:
        """The network `ip` is a usable host address of, or why it is none."""
        for net in networks:
            if ip in net.subnet:
                s = net.subnet
                if s.prefixlen < 31 and ip in (s.network_address, s.broadcast_address):
                    return None, f"{ip} is the network or broadcast address of {s}"
                return net, None
        if config.network is not None:
            return None, f"{ip} is outside network.subnet {config.network.subnet}"
        return None, f"{ip} is in no network of `networks`"

    for i, net in enumerate(networks):
        if net.gateway is not None and net.gateway not in net.subnet:
            errors.append(((*net_loc[i], "gateway"), f"{net.gateway} is outside "
                           f"{'.'.join(map(str, net_loc[i]))}.subnet {net.subnet}"))
        elif net.gateway is not None and (why := where(net.gateway)[1]):
            errors.append(((*net_loc[i], "gateway"), why))

    seen_macs: dict[str, str] = {}
    seen_ips: dict[IPv4Address, str] = {}
    seen_names: dict[str, str] = {}
    seen_ports: dict[tuple[IPv4Address, str, str | None], str] = {}
    pool_names: set[str] = set()
    dynamic_pools: list[int] = []
    for i, pool in enumerate(config.pools):
        if pool.name in pool_names:
            errors.append((("pools", i, "name"), f"duplicate pool name {pool.name!r}"))
        pool_names.add(pool.name)
        if pool.dynamic is not None:
            dynamic_pools.append(i)
        for j, node in enumerate(pool.nodes):
            here = f"{pool.name}/{node.name}"
            loc = ("pools", i, "nodes", j)
            if node.name in seen_names:
                errors.append(((*loc, "name"),
                               f"duplicate node name {node.name!r} (also {seen_names[node.name]})"))
            seen_names.setdefault(node.name, here)
            for k, mac in enumerate(node.mac):
                if mac in seen_macs:
                    errors.append(((*loc, "mac", k) if len(node.mac) > 1 else (*loc, "mac"),
                                   f"duplicate MAC {mac} (also node {seen_macs[mac]})"))
                seen_macs.setdefault(mac, here)
            if node.ip in seen_ips:
                errors.append(((*loc, "ip"),
                               f"duplicate IP {node.ip} (also node {seen_ips[node.ip]})"))
            seen_ips.setdefault(node.ip, here)
            node_net, why = where(node.ip)
            if why:
                errors.append(((*loc, "ip"), why))
            elif node.ip == config.server.address:
                errors.append(((*loc, "ip"), f"{node.ip} is bootd's own server.address"))
            if node.port is not None:
                port = (node.port.relay, node.port.circuit_id, node.port.remote_id)
                if port in seen_ports:
                    errors.append(((*loc, "port"),
                                   f"duplicate port identity (also node {seen_ports[port]})"))
                seen_ports.setdefault(port, here)
                if node_net is not None and node.port.relay not in node_net.subnet:
                    errors.append(((*loc, "port", "relay"),
                                   f"relay {node.port.relay} is not on {node.ip}'s network "
                                   f"{node_net.name} ({node_net.subnet}): option 82 from it "
                                   "cannot name this node"))

    for extra in dynamic_pools[1:]:
        errors.append((("pools", extra, "dynamic"),
                       "only one catch-all pool (with `dynamic`) is supported"))
    for i in dynamic_pools[:1]:
        dyn = config.pools[i].dynamic
        assert dyn is not None
        for k, text in enumerate(dyn.all_ranges()):
            loc = (("pools", i, "dynamic", "range") if dyn.range is not None
                   else ("pools", i, "dynamic", "ranges", k))
            errors += [(loc, msg) for msg in _range_errors(text, where, seen_ips, config)]
        spans = sorted((range_bounds(r), r) for r in dyn.all_ranges())
        for (a, ra), (b, rb) in itertools.pairwise(spans):
            if b[0] <= a[1]:
                errors.append((("pools", i, "dynamic", "ranges"),
                               f"ranges {ra} and {rb} overlap"))
    tls = config.cluster.etcd.tls if config.cluster is not None else None
    for field_name in ("ca", "cert", "key"):
        path = getattr(tls, field_name, None)
        if path is not None and not path.is_file():
            errors.append((("cluster", "etcd", "tls", field_name), f"no such file: {path}"))
    return errors


def _range_errors(text: str, where: Any, seen_ips: dict[IPv4Address, str],
                  config: Config) -> list[str]:
    lo, hi = range_bounds(text)
    (net_lo, why_lo), (net_hi, why_hi) = where(lo), where(hi)
    if why_lo or why_hi:
        return [f"range {text} leaves the subnet: {why_lo or why_hi}"]
    if net_lo is not net_hi:
        return [f"range {text} crosses networks {net_lo.name} and {net_hi.name}"]
    errors = []
    inside = sorted(ip for ip in seen_ips if lo <= ip <= hi)
    if inside:
        shown = ", ".join(f"{ip} ({seen_ips[ip]})" for ip in inside[:3])
        more = f" and {len(inside) - 3} more" if len(inside) > 3 else ""
        errors.append(f"range {text} overlaps reserved addresses {shown}{more}")
    specials: list[tuple[str, IPv4Address | None]] = [("server.address",
                                                        config.server.address)]
    specials += [("network.gateway" if config.network is not None else f"the gateway of "
                  f"{n.name}", n.gateway) for n in config.all_networks()]
    specials += [(f"the next_server of {n.name}", n.next_server)
                 for n in config.all_networks()]
    for what, ip in specials:
        if ip is not None and lo <= ip <= hi:
            errors.append(f"range {text} contains {what} {ip}")
    return errors


def dhcp_option_bytes(options: Mapping[str, Any]) -> list[tuple[int, bytes]]:
    """Validated operator options -> (code, wire bytes), in the order written."""
    codes = [(option_code(k), v) for k, v in options.items()]
    return [(code, encode_option_value(code, v)) for code, v in codes]
