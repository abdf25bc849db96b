"""Files rendered per client instead of read from disk: GRUB's network configs.

GRUB asks for `grub.cfg-01-<mac>` (its per-MAC name) and `grub.cfg`; both are answered
from the node directory so GRUB-based UEFI boots need no files on disk. They are the
dynamic part of the boot file tree (a file that exists in the TFTP root wins), served
over TFTP and over HTTP alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address

from bootd.fleet.directory import NodeDirectory
from bootd.fleet.images import ImageCatalog
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import normalize_mac
from bootd.fleet.render import grub_chain, grub_config, grub_unknown

_PER_MAC = re.compile(r"^grub\.cfg-01-([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5})$")


@dataclass(frozen=True)
class GrubConfigs:
    directory: NodeDirectory
    images: ImageCatalog
    http_port: int

    def __call__(self, rel: str, client: IPv4Address, now: float) -> bytes | None:
        base = rel.rsplit("/", 1)[-1]
        m = _PER_MAC.match(base)
        if m:
            return self.for_mac(normalize_mac(m.group(1)), client).encode()
        if base == "grub.cfg":
            found = self.directory.holder_of(client, now)
            if found is None:
                return grub_chain(str(client)).encode()
            return self._render(found.node, found.mac, client).encode()
        return None

    def for_mac(self, mac: str, client: IPv4Address | None) -> str:
        """The per-MAC config, with URLs to bootd's address on the client's network."""
        node = self.directory.resolve(mac)
        if node is None:
            return grub_unknown(mac)
        return self._render(node, mac, client)

    def _render(self, node: NodeProfile, mac: str, client: IPv4Address | None) -> str:
        image = self.images.resolve(node.image, node.pool)
        server = str(self.directory.inventory.next_server_for(client))
        return grub_config(node, mac, image, server, self.http_port)
