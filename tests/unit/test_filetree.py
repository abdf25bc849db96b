"""The boot file tree (TFTP and HTTP /boot/): nothing outside the root, ever; the iPXE
fallback directories with their package symlinks; GRUB configs rendered per client."""

from __future__ import annotations

import os
import textwrap
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from bootd.fleet.config import parse_config
from bootd.fleet.directory import NodeDirectory
from bootd.fleet.filetree import FileTree, Forbidden, NotFound, normalize_name
from bootd.fleet.grub import GrubConfigs
from bootd.fleet.images import ImageCatalog
from bootd.fleet.inventory import Inventory

CLIENT = IPv4Address("10.0.0.5")

# Names a hostile or broken client might send; none may read outside the root.
HOSTILE = [
    "../secret", "../../etc/passwd", "a/../../secret", "..", ".", "/", "//", "",
    "..\\secret", "\\..\\..\\secret", "a\\..\\..\\secret", "....//secret",
    "%2e%2e/secret", "%2e%2e%2fsecret", "..%2fsecret", "..%c0%afsecret",
    "link-out", "link-out/x", "dirlink/secret", "sub/../../secret",
    "x" * 300, "a/" * 200, "file\x01", "file\x7f", "\x1b[31m", "tab\there",
    "sub", "sub/", "fifo", "./../secret", "/..", "/../secret", "~/secret", "~root/.ssh/id_rsa",
    "/proc/self/environ", "/etc/shadow", "C:\\Windows\\system.ini", "con", "nul",
]


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.bin").write_bytes(b"inside")
    (root / "sub" / "deep.txt").write_bytes(b"deep")
    (tmp_path / "secret").write_bytes(b"SECRET")
    (root / "link-out").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(tmp_path)
    (root / "link-in").symlink_to(root / "ok.bin")
    os.mkfifo(root / "fifo")
    fallback = tmp_path / "ipxe"
    fallback.mkdir()
    (fallback / "undionly.kpxe").write_bytes(b"IPXE")
    (fallback / "secret-only-here").write_bytes(b"FB")
    return root, fallback


def read_all(tree: FileTree, name: str) -> bytes:
    source = tree.open(name, CLIENT, 0.0)
    try:
        return source.read(0, source.size)
    finally:
        source.close()


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_never_leave_the_root(tree: tuple[Path, Path], name: str) -> None:
    root, fallback = tree
    tree = FileTree(root, [fallback])
    try:
        data = read_all(tree, name)
    except (NotFound, Forbidden):
        return
    assert data in (b"inside", b"deep", b"IPXE", b"FB"), name


@pytest.mark.parametrize("name", ["../secret", "a/../../secret", "..\\secret", "link-out",
                                  "dirlink/secret", "", "file\x01", "x" * 300])
def test_access_violations(tree: tuple[Path, Path], name: str) -> None:
    with pytest.raises(Forbidden):
        read_all(FileTree(tree[0]), name)


def test_leading_slash_and_backslash_are_root_relative(tree: tuple[Path, Path]) -> None:
    r = FileTree(tree[0])
    assert read_all(r, "/ok.bin") == b"inside"
    assert read_all(r, "\\sub\\deep.txt") == b"deep"
    assert read_all(r, "sub//./deep.txt") == b"deep"
    assert read_all(r, "link-in") == b"inside"  # a symlink inside the root is fine


def test_missing_and_directory(tree: tuple[Path, Path]) -> None:
    r = FileTree(tree[0])
    for name, error in (("nope", NotFound), ("sub", NotFound), ("fifo", Forbidden)):
        with pytest.raises(error):
            read_all(r, name)


def test_fallback_only_for_plain_names(tree: tuple[Path, Path]) -> None:
    root, fallback = tree
    r = FileTree(root, [fallback])
    assert read_all(r, "undionly.kpxe") == b"IPXE"
    with pytest.raises(NotFound):
        read_all(r, "sub/undionly.kpxe")
    (root / "undionly.kpxe").write_bytes(b"ROOT WINS")
    assert read_all(r, "undionly.kpxe") == b"ROOT WINS"


def test_unreadable_file_is_access_violation(tree: tuple[Path, Path]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    (tree[0] / "ok.bin").chmod(0)
    with pytest.raises(Forbidden):
        read_all(FileTree(tree[0]), "ok.bin")


def test_fallback_dirs_follow_package_symlinks(tmp_path: Path) -> None:
    """Debian's ipxe package: /usr/lib/ipxe/ipxe.efi -> /boot/ipxe.efi. The fallback
    directory is the operator's choice of a system directory, so its links are followed;
    the root still refuses links that leave it."""
    root, lib, boot = tmp_path / "root", tmp_path / "usr-lib-ipxe", tmp_path / "boot"
    for d in (root, lib, boot):
        d.mkdir()
    (boot / "ipxe.efi").write_bytes(b"EFI IPXE")
    (lib / "ipxe.efi").symlink_to(boot / "ipxe.efi")
    (lib / "ipxe.lkrn").symlink_to(boot / "ipxe.lkrn")  # dangling, as without /boot's file
    (lib / "qemu").mkdir()
    (root / "escape.efi").symlink_to(boot / "ipxe.efi")
    tree = FileTree(root, [lib])
    assert read_all(tree, "ipxe.efi") == b"EFI IPXE"
    assert tree.locate("ipxe.efi", CLIENT, 0.0) == boot / "ipxe.efi"
    with pytest.raises(NotFound):
        read_all(tree, "ipxe.lkrn")
    with pytest.raises(NotFound):
        read_all(tree, "qemu")
    with pytest.raises(Forbidden):
        read_all(tree, "escape.efi")


def test_locate_gives_paths_and_rendered_bytes(tree: tuple[Path, Path]) -> None:
    g, _ = grub()
    t = FileTree(tree[0], [], g)
    assert t.locate("/sub/deep.txt", CLIENT, 0.0) == tree[0] / "sub" / "deep.txt"
    rendered = t.locate("grub.cfg-01-02-00-00-00-00-01", CLIENT, 0.0)
    assert isinstance(rendered, bytes) and b"bootd.node=n1" in rendered


def test_normalize_name() -> None:
    assert normalize_name("/a//b/./c") == "a/b/c"
    assert normalize_name("\\a\\b") == "a/b"


# -- GRUB configs rendered per client

CONFIG = textwrap.dedent("""\
    server: {interfaces: [br0], address: 10.0.0.1, http_port: 8080}
    network: {subnet: 10.0.0.0/24}
    images:
      k8s: {kernel: /i/vmlinuz, initrd: /i/initrd, rootfs: /i/rootfs, cmdline: "console=ttyS0"}
    defaults: {image: k8s, kernel_args: [quiet]}
    pools:
      - name: w
        nodes: [{name: n1, mac: "02:00:00:00:00:01", ip: 10.0.0.5, kernel_args: [debug]}]
      - name: any
        dynamic: {range: 10.0.0.100-10.0.0.110}
    """)


def grub(config: str = CONFIG) -> tuple[GrubConfigs, NodeDirectory]:
    cfg = parse_config(config)
    inv = Inventory(cfg)
    directory = NodeDirectory.build(inv)
    return GrubConfigs(directory, ImageCatalog.of(cfg.images), 8080), directory


def test_grub_per_mac_config_any_spelling() -> None:
    g, _ = grub()
    for name in ("grub/grub.cfg-01-02-00-00-00-00-01", "grub.cfg-01-02:00:00:00:00:01"):
        text = (g(name, IPv4Address("10.0.0.99"), 100.0) or b"").decode()
        assert "linux (http,10.0.0.1:8080)/images/k8s/kernel console=ttyS0 quiet debug " \
            "bootd.url=http://10.0.0.1:8080 bootd.node=n1 bootd.mac=02:00:00:00:00:01 " \
            "bootd.image=k8s bootd.rootfs=http://10.0.0.1:8080/images/k8s/rootfs" in text
        assert "initrd (http,10.0.0.1:8080)/images/k8s/initrd" in text


def test_grub_cfg_by_client_ip() -> None:
    g, ctx = grub()
    assert b"bootd.node=n1" in (g("grub/grub.cfg", IPv4Address("10.0.0.5"), 100.0) or b"")
    unknown = (g("grub/grub.cfg", IPv4Address("10.0.0.100"), 100.0) or b"").decode()
    assert "configfile $prefix/grub.cfg-01-$net_default_mac" in unknown
    assert ctx.leases is not None
    ctx.leases.bind("52:54:00:00:00:09", IPv4Address("10.0.0.100"), 0, 3600)
    leased = (g("grub/grub.cfg", IPv4Address("10.0.0.100"), 100.0) or b"").decode()
    assert "bootd.node=node-52-54-00-00-00-09" in leased


def test_grub_unknown_mac_without_catch_all_exits() -> None:
    g, _ = grub(CONFIG.split("  - name: any")[0])
    text = (g("grub.cfg-01-52-54-00-00-00-99", CLIENT, 100.0) or b"").decode()
    assert "52:54:00:00:00:99 is not in bootd's inventory" in text and "exit 1" in text


def test_grub_node_without_image() -> None:
    g, _ = grub(CONFIG.replace("defaults: {image: k8s, kernel_args: [quiet]}",
                               "defaults: {kernel_args: [quiet]}"))
    text = (g("grub.cfg-01-02-00-00-00-00-01", CLIENT, 100.0) or b"").decode()
    assert "no image is configured for n1" in text


def test_other_names_are_not_dynamic() -> None:
    g, _ = grub()
    assert g("grub/x86_64-efi/normal.mod", CLIENT, 100.0) is None
    assert g("grub.cfg-01-zz", CLIENT, 100.0) is None


def test_disk_file_wins_over_dynamic(tree: tuple[Path, Path]) -> None:
    g, _ = grub()
    (tree[0] / "grub").mkdir()
    (tree[0] / "grub" / "grub.cfg").write_text("static\n")
    r = FileTree(tree[0], [], g)
    assert read_all(r, "grub/grub.cfg") == b"static\n"
    assert b"bootd.node=n1" in read_all(r, "grub/grub.cfg-01-02-00-00-00-00-01")
