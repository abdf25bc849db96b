"""`bootd explain MAC`: what a machine would get, worked out from the config alone.

It runs the same code the daemon runs (inventory, DHCP decision, templates) on a
synthetic request, against an empty lease table, and masks secrets.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from bootd.dhcp.decide import DhcpContext, DhcpSettings, decide
from bootd.dhcp.options import Opt
from bootd.dhcp.outcomes import Exhausted, Offered, UnknownRelay, WrongNetwork
from bootd.dhcp.packet import BOOTREQUEST, DhcpPacket, MessageType, decode, encode
from bootd.fleet.config import Config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.images import BootImage, ImageCatalog
from bootd.fleet.imagestore import ImageStore
from bootd.fleet.inventory import Inventory, NodeProfile, PortId
from bootd.fleet.mac import mac_to_bytes
from bootd.fleet.render import base_url, ipxe_node, join_script, kernel_cmdline

ARCH_CODES = {"bios": 0, "efi32": 6, "efi64": 7, "arm64": 11, "http": 16}
SECRET = "<token: served only to the node>"
_NAMES = {int(o): o.name.lower().replace("_", "-") for o in Opt}


def firmware_identity(arch: str) -> tuple[bytes, bytes]:
    """Option 93 and the vendor class a firmware of this kind sends (for explain/probe)."""
    code = ARCH_CODES[arch]
    client = "HTTPClient" if arch == "http" else "PXEClient"
    return struct.pack("!H", code), f"{client}:Arch:{code:05d}:UNDI:003000".encode()


def synthetic_discover(mac: str, arch: str, ipxe: bool, relay: IPv4Address | None = None,
                       circuit_id: str | None = None) -> DhcpPacket:
    """A DISCOVER as this firmware sends it, relayed by `relay` (with option 82's
    circuit-id, as a leaf switch adds it) if given."""
    client_arch, vendor_class = firmware_identity(arch)
    options: dict[int, bytes] = {
        Opt.MESSAGE_TYPE: bytes((MessageType.DISCOVER,)),
        Opt.CLIENT_ARCH: client_arch,
        Opt.VENDOR_CLASS: vendor_class,
    }
    if ipxe:
        options[Opt.USER_CLASS] = b"iPXE"
    if relay is not None and circuit_id:
        raw = circuit_id.encode()[:255]
        options[Opt.RELAY_AGENT_INFO] = bytes((1, len(raw))) + raw
    return DhcpPacket(op=BOOTREQUEST, xid=0x12345678, chaddr=mac_to_bytes(mac),
                      flags=0x8000, giaddr=relay or IPv4Address(0), hops=1 if relay else 0,
                      options=options)


def option_text(code: int, value: bytes) -> str:
    if code == Opt.MESSAGE_TYPE and len(value) == 1 and 1 <= value[0] <= 8:
        shown = MessageType(value[0]).name
    elif len(value) % 4 == 0 and code in (1, 3, 6, 28, 42, 54):
        shown = ", ".join(str(IPv4Address(value[i:i + 4])) for i in range(0, len(value), 4))
    elif code in (51, 58, 59) and len(value) == 4:
        shown = f"{struct.unpack('!I', value)[0]}s"
    elif value.rstrip(b"\0") and all(32 <= b < 127 for b in value.rstrip(b"\0")):
        shown = value.rstrip(b"\0").decode()
    else:
        shown = "0x" + value.hex()
    return f"  {code:>3} {_NAMES.get(code, 'option'):<22} {shown}"


def _layers(config: Config, node: NodeProfile) -> str:
    pool = next(p for p in config.pools if p.name == node.pool)
    node_tags = [t for t in node.tags if t not in pool.tags]
    parts = ["defaults", f"pool {pool.name}", *(f"tag {t}" for t in pool.tags)]
    if not node.dynamic:
        parts.append(f"node {node.name}")
    parts += [f"tag {t}" for t in node_tags]
    return " < ".join(parts)


def _image_text(node: NodeProfile, image: BootImage | None) -> str:
    if node.image is None:
        return "-"
    return f"{node.image} -> {image.ref}" if image is not None else f"{node.image} (missing)"


def explain(config: Config, mac: str, arch: str = "bios", ipxe: bool = False,
            relay: IPv4Address | None = None, circuit_id: str | None = None,
            images: ImageCatalog | None = None) -> str:
    """`images`: the running snapshot's catalog (the daemon's: in cluster mode the
    pointers are etcd's); without it, the image store's on this host."""
    inventory = Inventory(config)
    directory = NodeDirectory.build(inventory)
    request = synthetic_discover(mac, arch, ipxe, relay, circuit_id)
    port = PortId(relay, circuit_id.encode()) if relay and circuit_id else None
    node = directory.resolve(mac, port)
    out = [f"MAC {mac}" + (f" relayed by {relay}" if relay else "")
           + (f", circuit-id {circuit_id!r}" if port else "")]
    if node is None:
        out.append("  not in the inventory and there is no catch-all pool: bootd does not "
                   "answer its DHCP, and its iPXE script says so and exits to the next "
                   "boot device")
        return "\n".join(out)
    if images is None:
        images = ImageStore(config.server.image_store).catalog(config.images)
    image = images.resolve(node.image, node.pool)
    out += [
        f"node      {node.name}{' (catch-all: name from the MAC)' if node.dynamic else ''}",
        f"pool      {node.pool}",
        f"network   {node.network or '(by the address leased)'}"
        + (f"   port {node.port.relay} {node.port.circuit_id.decode()!r}" if node.port else ""),
        f"merged    {_layers(config, node)}",
        f"image     {_image_text(node, image)}   cluster {node.cluster or '-'}",
        f"labels    {', '.join(f'{k}={v}' for k, v in node.labels.items()) or '-'}",
        f"taints    {', '.join(node.taints) or '-'}",
    ]
    ctx = DhcpContext(directory, DhcpSettings.from_config(config))
    outcome = decide(request, ctx, 0.0, config.server.interfaces[0])
    out.append("")
    match outcome:
        case Offered(note=note):
            why = note
        case WrongNetwork(seen_on=seen_on):
            why = f"node {node.name} is on {node.network}, the request comes from {seen_on}"
        case UnknownRelay(giaddr=giaddr):
            why = f"relay {giaddr} is in no declared network: never answered"
        case Exhausted(network=network):
            why = f"no free address in {network}'s ranges"
        case _:
            why = ""
    where = f" via {relay}" if relay else ""
    out.append(f"DHCP answer to a {arch}{' iPXE' if ipxe else ''} DISCOVER{where}: "
               f"{outcome.kind}" + (f" ({why})" if why else ""))
    address = node.ip or relay  # where the node would fetch from: its network's URLs
    if isinstance(outcome, Offered):
        reply = decode(encode(outcome.reply.packet, outcome.reply.max_size))
        address = reply.yiaddr
        note = " (first free in the catch-all range)" if node.ip is None else ""
        out.append(f"  address {reply.yiaddr}{note}, next-server {reply.siaddr}, "
                   f"boot file {reply.file.decode() or '-'}")
        out += [option_text(code, value) for code, value in reply.options.items()]
    url = base_url(str(inventory.next_server_for(address)), config.server.http_port)
    out.append("")
    if image is None:
        out.append("iPXE script: none (no image configured); the node is told so and exits")
    else:
        out.append("kernel command line:")
        out.append("  " + kernel_cmdline(node, image, mac, url, "<sha256 of rootfs>"))
        out.append("")
        out.append(f"iPXE script ({url}/nodes/{mac.replace(':', '-')}/boot.ipxe):")
        script = ipxe_node(node, mac, image, url, "<sha256 of rootfs>")
        out += ["  " + line for line in script.splitlines()]
    cluster = config.clusters.get(node.cluster) if node.cluster else None
    out.append("")
    out.append("join.sh (token masked):")
    out += ["  " + line for line in join_script(node, mac, url, cluster, SECRET).splitlines()]
    return "\n".join(out)
