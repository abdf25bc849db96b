"""Files rendered per client instead of read from disk: GRUB's network configs.

GRUB asks for `grub.cfg-01-<mac>` (its per-MAC name) and `grub.cfg`; both are answered
from the inventory so GRUB-based UEFI boots need no files on disk. A file that exists in
the TFTP root wins over these.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from ipaddress import IPv4Address

from bootd.dhcp.decide import DhcpContext
from bootd.fleet.config import ImageConfig
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import normalize_mac
from bootd.fleet.render import grub_chain, grub_config, grub_unknown

_PER_MAC = re.compile(r"^grub\.cfg-01-([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5})$")


class GrubConfigs:
    def __init__(self, ctx: DhcpContext, images: dict[str, ImageConfig], server: str,
                 http_port: int, clock: Callable[[], float] = time.time) -> None:
        self.ctx = ctx
        self.images = images
        self.server = server
        self.http_port = http_port
        self.clock = clock

    def __call__(self, rel: str, client: IPv4Address) -> bytes | None:
        base = rel.rsplit("/", 1)[-1]
        m = _PER_MAC.match(base)
        if m:
            return self.for_mac(normalize_mac(m.group(1))).encode()
        if base == "grub.cfg":
            found = self.ctx.node_for_ip(client, self.clock())
            if found is None:
                return grub_chain(str(client)).encode()
            node, mac = found
            return self._render(node, mac).encode()
        return None

    def for_mac(self, mac: str) -> str:
        node = self.ctx.inventory.resolve(mac)
        if node is None:
            return grub_unknown(mac)
        return self._render(node, mac)

    def _render(self, node: NodeProfile, mac: str) -> str:
        image = self.images.get(node.image) if node.image else None
        return grub_config(node, mac, image, self.server, self.http_port)
