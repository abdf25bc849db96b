"""Everything a node receives as text is rendered here, with Jinja2.

Templates live in bootd/templates; the kernel command line is built in one place so that
GRUB (TFTP and HTTP) and iPXE scripts agree on it.
"""

from __future__ import annotations

import shlex

import yaml
from jinja2 import Environment, PackageLoader, StrictUndefined

from bootd.fleet.config import ClusterConfig
from bootd.fleet.images import BootImage
from bootd.fleet.inventory import NodeProfile
from bootd.fleet.mac import mac_dashed

_env = Environment(loader=PackageLoader("bootd.fleet", "templates"), undefined=StrictUndefined,
                   keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                   autoescape=False)
_env.filters["sh"] = lambda value: shlex.quote(str(value))


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (embedded scripts) as readable `|` blocks."""


def _str_presenter(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_presenter)
_env.filters["to_yaml"] = lambda value: yaml.dump(
    value, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False,
    width=1000).rstrip("\n")


def base_url(server: str, http_port: int) -> str:
    return f"http://{server}:{http_port}"


def kernel_cmdline(node: NodeProfile, image: BootImage, mac: str, url: str,
                   rootfs_sha256: str | None = None, peers: tuple[str, ...] = ()) -> str:
    """Image cmdline, then the node's merged kernel_args, then what the initramfs needs.
    `peers`: cluster mode's other members, tried in order after `url`. `bootd.image`
    names the exact version, which the node's reports carry back (`bootd status`)."""
    parts = image.files.cmdline.split() + list(node.kernel_args)
    parts += [f"bootd.url={url}", f"bootd.node={node.name}", f"bootd.mac={mac}",
              f"bootd.image={image.ref}"]
    if peers:
        parts.append(f"bootd.peers={','.join(peers)}")
    if image.files.rootfs is not None:
        parts.append(f"bootd.rootfs={url}/images/{image.url_path}/rootfs")
        if rootfs_sha256:
            parts.append(f"bootd.rootfs_sha256={rootfs_sha256}")
    return " ".join(parts)


def ipxe_generic(url: str) -> str:
    return _env.get_template("boot.ipxe.j2").render(url=url)


def ipxe_node(node: NodeProfile, mac: str, image: BootImage, url: str,
              rootfs_sha256: str | None, peers: tuple[str, ...] = ()) -> str:
    """Per-node script; `initrd=initrd` lets EFI kernels find the initrd iPXE loaded.
    `peers`: where the kernel and initrd are fetched from when `url` fails."""
    cmdline = kernel_cmdline(node, image, mac, url, rootfs_sha256, peers) + " initrd=initrd"
    return _env.get_template("node.ipxe.j2").render(
        node=node, mac=mac, mac_dashed=mac_dashed(mac), url=url, cmdline=cmdline,
        peers=peers, image=image)


def ipxe_give_up(what: str, retry_url: str, attempt: int, attempts: int,
                 interval: int) -> str:
    """For a machine bootd cannot boot yet: say why, ask again a few times (the operator
    may be adding it), then exit non-zero so the firmware tries its next boot device."""
    return _env.get_template("noimage.ipxe.j2").render(
        what=what, retry_url=retry_url, attempt=attempt, attempts=attempts,
        interval=interval)


def kubelet_args(node: NodeProfile) -> str:
    args = []
    if node.labels:
        args.append("--node-labels=" + ",".join(f"{k}={v}" for k, v in node.labels.items()))
    if node.taints:
        args.append("--register-with-taints=" + ",".join(node.taints))
    return " ".join(args)


def join_script(node: NodeProfile, mac: str, url: str, cluster: ClusterConfig | None,
                token: str | None, peers: tuple[str, ...] = ()) -> str:
    """The node's join.sh; it carries the cluster token, so callers must check who asks.
    `peers`: where its reports go when `url` does not answer."""
    api_endpoint = cluster.api_server.removeprefix("https://") if cluster else ""
    return _env.get_template("join.sh.j2").render(
        node=node, mac=mac, url=url, cluster=cluster, token=token or "",
        api_endpoint=api_endpoint, kubelet_args=kubelet_args(node), peers=peers)


def join_wait_script(node: NodeProfile, mac: str, url: str, poll: float) -> str:
    """What a catch-all node awaiting approval gets instead of its join.sh: no secret,
    a loop that asks again until the real script comes."""
    return _env.get_template("join-wait.sh.j2").render(node=node, mac=mac, url=url,
                                                       poll=max(1, round(poll)))


def grub_config(node: NodeProfile, mac: str, image: BootImage | None, server: str,
                http_port: int) -> str:
    cmdline = kernel_cmdline(node, image, mac, base_url(server, http_port)) if image else ""
    return _env.get_template("grub.cfg.j2").render(
        node=node, mac=mac, image=image, server=server, http_port=http_port, cmdline=cmdline)


def grub_unknown(what: str) -> str:
    return _env.get_template("grub-unknown.cfg.j2").render(what=what)


def grub_chain(client: str) -> str:
    return _env.get_template("grub-chain.cfg.j2").render(client=client)


# ---------------------------------------------------------------------------- cloud-init


def cloud_meta_data(node: NodeProfile, mac: str) -> str:
    meta = {"instance-id": f"bootd-{node.name}-{mac.replace(':', '')}",
            "local-hostname": node.name}
    return _env.get_template("meta-data.j2").render(meta=meta)


def cloud_user_data(node: NodeProfile, mac: str, url: str, cluster: ClusterConfig | None,
                    token: str | None, domain: str | None) -> str:
    """NoCloud user-data doing what join.sh does: the script itself runs from runcmd."""
    config: dict[str, object] = {"hostname": node.name}
    if domain:
        config["fqdn"] = f"{node.name}.{domain}"
    if node.timezone:
        config["timezone"] = node.timezone
    if node.ssh_authorized_keys:
        config["ssh_authorized_keys"] = list(node.ssh_authorized_keys)
    config["write_files"] = [{
        "path": "/run/bootd/join.sh", "permissions": "0700", "owner": "root:root",
        "content": join_script(node, mac, url, cluster, token),
    }]
    config["runcmd"] = [["sh", "/run/bootd/join.sh"]]
    return _env.get_template("user-data.j2").render(node=node, mac=mac, cloud_config=config)


def cloud_vendor_data() -> str:
    return _env.get_template("vendor-data.j2").render()


def cloud_network_config(node: NodeProfile) -> str:
    """Network config v2: DHCP on every NIC of the node (bootd hands out its address)."""
    ethernets = {f"nic{i}": {"match": {"macaddress": mac}, "set-name": f"nic{i}",
                             "dhcp4": True}
                 for i, mac in enumerate(node.macs)}
    return _env.get_template("network-config.j2").render(
        network={"version": 2, "ethernets": ethernets})
