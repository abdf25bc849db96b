"""What `decide()` concluded about one request: small frozen classes, dispatched by type.

The service turns each into its log line, metric and boot event with a `match` on the
class, never by parsing text. `kind` is the name used for the metric label and the log
message; `reply` is what goes back on the wire (only the answering outcomes have one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from ipaddress import IPv4Address
from typing import ClassVar

from bootd.dhcp.bootfile import BootAnswer
from bootd.dhcp.packet import DhcpPacket, MessageType
from bootd.fleet.inventory import NodeProfile


@dataclass(frozen=True)
class Reply:
    packet: DhcpPacket
    dest: IPv4Address
    port: int
    max_size: int
    # The client has no address yet and did not ask for broadcast: deliver to yiaddr at
    # chaddr (the transport installs an ARP entry, or falls back to broadcast).
    hw_unicast: bool = False


class RequestState(StrEnum):
    """RFC 2131 4.3.2: which client state a REQUEST comes from."""

    SELECTING = "selecting"
    INIT_REBOOT = "init-reboot"
    RENEWING = "renewing/rebinding"


@dataclass(frozen=True)
class Offered:
    kind: ClassVar[str] = "offer"
    reply: Reply
    node: NodeProfile
    ip: IPv4Address
    boot: BootAnswer | None
    note: str = ""  # e.g. a firmware bootd has no boot program for


@dataclass(frozen=True)
class Acked:
    kind: ClassVar[str] = "ack"
    reply: Reply
    node: NodeProfile
    ip: IPv4Address
    state: RequestState
    boot: BootAnswer | None
    note: str = ""


@dataclass(frozen=True)
class Informed:
    """DHCPINFORM answered: configuration without an address."""

    kind: ClassVar[str] = "inform"
    reply: Reply
    node: NodeProfile | None
    ip: IPv4Address  # the client's own (ciaddr)
    boot: BootAnswer | None
    note: str = ""


@dataclass(frozen=True)
class Nakked:
    kind: ClassVar[str] = "nak"
    reply: Reply
    node: NodeProfile
    ip: IPv4Address | None  # what the client asked for
    reason: str


@dataclass(frozen=True)
class Released:
    kind: ClassVar[str] = "release"
    node: NodeProfile | None
    ip: IPv4Address
    released: bool  # False: no such lease of this client, or a reservation (kept)
    reason: str


@dataclass(frozen=True)
class Declined:
    kind: ClassVar[str] = "decline"
    node: NodeProfile | None
    ip: IPv4Address
    reason: str


@dataclass(frozen=True)
class UnknownMac:
    """A MAC that is not in the inventory, and there is no catch-all pool."""

    kind: ClassVar[str] = "unknown-mac"
    mac: str
    message_type: MessageType


@dataclass(frozen=True)
class WrongNetwork:
    """A reserved node seen behind another network's relay (or interface): not served
    there, so that a miscabled or moved machine never gets another rack's address."""

    kind: ClassVar[str] = "wrong-network"
    node: NodeProfile
    mac: str
    seen_on: str  # the network the request came from


@dataclass(frozen=True)
class UnknownRelay:
    """A relayed request whose giaddr is in no declared network: bootd never sends to an
    address a packet merely names."""

    kind: ClassVar[str] = "unknown-relay"
    giaddr: IPv4Address
    mac: str


@dataclass(frozen=True)
class Exhausted:
    """The catch-all ranges of the client's network have no address to offer."""

    kind: ClassVar[str] = "exhausted"
    node: NodeProfile
    network: str


@dataclass(frozen=True)
class NotForUs:
    """A REQUEST naming another server: the client took someone else's offer."""

    kind: ClassVar[str] = "not-for-us"
    server_id: IPv4Address
    ip: IPv4Address | None


@dataclass(frozen=True)
class Dropped:
    """Not answerable: malformed in meaning, misrouted, or not a client message."""

    kind: ClassVar[str] = "drop"
    reason: str
    node: NodeProfile | None = None


Answered = Offered | Acked | Informed | Nakked
Outcome = (Answered | Released | Declined | UnknownMac | WrongNetwork | UnknownRelay
           | Exhausted | NotForUs | Dropped)
