"""Everything a node receives as text is rendered here, with Jinja2.

Templates live in bootd/templates; the kernel command line is built in one place so that
GRUB (TFTP and HTTP) and iPXE scripts agree on it.
"""

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined

from bootd.config import ImageConfig
from bootd.inventory import NodeProfile

_env = Environment(loader=PackageLoader("bootd", "templates"), undefined=StrictUndefined,
                   keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                   autoescape=False)


def base_url(server: str, http_port: int) -> str:
    return f"http://{server}:{http_port}"


def kernel_cmdline(node: NodeProfile, image: ImageConfig, mac: str, url: str) -> str:
    """Image cmdline, then the node's merged kernel_args, then what the initramfs needs."""
    parts = image.cmdline.split() + list(node.kernel_args)
    parts += [f"bootd.url={url}", f"bootd.node={node.name}", f"bootd.mac={mac}"]
    if image.rootfs is not None and node.image is not None:
        parts.append(f"bootd.rootfs={url}/images/{node.image}/rootfs")
    return " ".join(parts)


def grub_config(node: NodeProfile, mac: str, image: ImageConfig | None, server: str,
                http_port: int) -> str:
    cmdline = kernel_cmdline(node, image, mac, base_url(server, http_port)) if image else ""
    return _env.get_template("grub.cfg.j2").render(
        node=node, mac=mac, image=image, server=server, http_port=http_port, cmdline=cmdline)


def grub_unknown(what: str) -> str:
    return _env.get_template("grub-unknown.cfg.j2").render(what=what)


def grub_chain(client: str) -> str:
    return _env.get_template("grub-chain.cfg.j2").render(client=client)
