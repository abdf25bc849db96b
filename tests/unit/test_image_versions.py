"""Image versions: the store's rules, the catalog's resolution, the config's references,
versioned URLs over HTTP, drift in the status document, and the `bootd image` CLI."""

from __future__ import annotations

import hashlib
import json
import textwrap
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bootd.cli.main import main
from bootd.fleet.config import ConfigError, ImageConfig, image_store_of, parse_config
from bootd.fleet.images import BootImage, ImageHashes, version_id
from bootd.fleet.imagestore import ImageStore, ImageStoreError, build_files
from bootd.http.boot import boot_app
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.runtime import build_snapshot
from bootd.state.events import BootEvent
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store


def build(tmp: Path, tag: str, *, yaml_paths: bool = False, rootfs: bool = True) -> Path:
    """A build directory like images/build-production-image.sh's output."""
    out = tmp / f"build-{tag}"
    out.mkdir()
    (out / "vmlinuz").write_bytes(b"kernel " + tag.encode())
    (out / "initrd.img").write_bytes(b"initrd " + tag.encode())
    if rootfs:
        (out / "rootfs.squashfs").write_bytes(b"rootfs " + tag.encode() * 1000)
    if yaml_paths:  # absolute paths where it was built, since moved: found beside it
        (out / "bootd-image.yaml").write_text(textwrap.dedent(f"""\
            images:
              debian:
                kernel: /nonexistent/{tag}/vmlinuz
                initrd: /nonexistent/{tag}/initrd.img
                rootfs: /nonexistent/{tag}/rootfs.squashfs
                cmdline: "boot=bootd console=ttyS0 {tag}"
            """))
    return out


# ---------------------------------------------------------------------------- store


def test_add_names_versions_by_content_and_promotes_only_the_first(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    first = store.add("k8s", build(tmp_path, "a", yaml_paths=True), now=100.0)
    assert first.new and first.promoted and len(first.version) == 12
    again = store.add("k8s", tmp_path / "build-a", now=200.0)
    assert again.version == first.version and not again.new and not again.promoted
    second = store.add("k8s", build(tmp_path, "b", yaml_paths=True), now=300.0)
    assert second.new and not second.promoted and second.version != first.version
    assert store.pointers("k8s").promoted == first.version
    info = store.info("k8s", first.version)
    assert info is not None and info.cmdline == "boot=bootd console=ttyS0 a"
    assert info.digests["rootfs"] == hashlib.sha256(b"rootfs " + b"a" * 1000).hexdigest()
    assert first.version == version_id(info.digests, info.cmdline)
    stored = tmp_path / "images" / "k8s" / first.version
    assert (stored / "kernel").read_bytes() == b"kernel a"
    assert sorted(p.name for p in (tmp_path / "images" / "k8s").iterdir()) == sorted(
        [first.version, second.version, "pointers.json"])  # no leftovers


def test_a_different_cmdline_is_a_different_version(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    src = build(tmp_path, "a")
    assert store.add("k8s", src, "quiet").version != store.add("k8s", src, "debug").version


def test_build_files_errors_and_defaults(tmp_path: Path) -> None:
    files, cmdline = build_files(build(tmp_path, "a", rootfs=False))
    assert set(files) == {"kernel", "initrd"} and cmdline == ""
    with pytest.raises(ImageStoreError, match="no kernel"):
        build_files(tmp_path)
    with pytest.raises(ImageStoreError, match="not a directory"):
        build_files(tmp_path / "missing")
    broken = build(tmp_path, "b")
    (broken / "bootd-image.yaml").write_text("images: [")
    with pytest.raises(ImageStoreError, match=r"bootd-image\.yaml"):
        build_files(broken)
    declared = build(tmp_path, "c", rootfs=False)
    (declared / "bootd-image.yaml").write_text("images: {x: {kernel: vmlinuz, "
                                               "initrd: initrd.img, rootfs: gone.squashfs}}")
    with pytest.raises(ImageStoreError, match="no rootfs"):
        build_files(declared)  # declared but absent: not silently an image without one


def test_bad_names_and_versions_are_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    for bad in ("../etc", "Upper", "", "a/b", ".hidden"):
        with pytest.raises(ImageStoreError, match="bad image name"):
            store.add(bad, build(tmp_path, f"x{len(bad)}{bad[:1].isalpha()}"))
    store.add("k8s", build(tmp_path, "a"))
    with pytest.raises(ImageStoreError, match="no version 'nope'"):
        store.promote("k8s", "nope")
    with pytest.raises(ImageStoreError, match="no earlier promoted version"):
        store.rollback("k8s")


def test_promote_rollback_and_pool_pointers(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    v1 = store.add("k8s", build(tmp_path, "a"), now=1.0).version
    v2 = store.add("k8s", build(tmp_path, "b"), now=2.0).version
    v3 = store.add("k8s", build(tmp_path, "c"), now=3.0).version
    store.set_pool("k8s", "gpu", v3)
    assert store.pointers("k8s").pools == {"gpu": v3}
    store.promote("k8s", v2)  # every pool: rollout pointers go
    assert store.pointers("k8s").to_json() == {"promoted": v2, "previous": [v1], "pools": {}}
    store.promote("k8s", v3)
    assert store.rollback("k8s").promoted == v2
    assert store.rollback("k8s").promoted == v1
    store.set_pool("k8s", "gpu", v2)
    store.set_pool("k8s", "gpu", None)
    assert store.pointers("k8s").pools == {}


def test_prune_keeps_what_is_pointed_at_pinned_or_run(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    versions = [store.add("k8s", build(tmp_path, t), now=float(i)).version
                for i, t in enumerate("abcdef")]
    a, b, c, d, e, f = versions
    store.promote("k8s", c)  # a is in the rollback history now
    store.set_pool("k8s", "gpu", d)
    removed = store.prune("k8s", keep=1, in_use={b})  # b: a node runs it
    assert removed == [e]  # f is the newest (kept), the others are held
    assert sorted(store.names()["k8s"]) == sorted([a, b, c, d, f])
    assert store.prune("k8s", keep=0, in_use=set()) == [b, f]


def test_catalog_resolves_pins_pointers_and_damaged_entries(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    v1 = store.add("k8s", build(tmp_path, "a")).version
    v2 = store.add("k8s", build(tmp_path, "b")).version
    store.set_pool("k8s", "canary", v2)
    broken = store.add("k8s", build(tmp_path, "c")).version
    (tmp_path / "images" / "k8s" / broken / "image.json").write_text("{not json")
    incomplete = store.add("k8s", build(tmp_path, "d")).version
    (tmp_path / "images" / "k8s" / incomplete / "initrd").unlink()
    old = ImageConfig(kernel=tmp_path / "k", initrd=tmp_path / "i")
    catalog = store.catalog({"legacy": old})
    assert set(catalog.versions["k8s"]) == {v1, v2}  # damaged ones left out, not fatal
    info = store.info("k8s", v1)
    assert info is not None
    assert catalog.resolve("k8s", "workers") == BootImage(
        "k8s", v1, catalog.versions["k8s"][v1], info.digests)
    image = catalog.resolve("k8s", "canary")
    assert image is not None and image.ref == f"k8s@{v2}" and image.url_path == f"k8s/{v2}"
    assert catalog.desired_ref(f"k8s@{v1}", "canary") == f"k8s@{v1}"  # a pin wins
    assert catalog.resolve("legacy", None) == BootImage("legacy", None, old)
    assert catalog.resolve("legacy@abc", None) is None
    assert catalog.resolve("k8s@ffffffffffff", None) is None
    assert catalog.resolve(None, "w") is None
    assert catalog.files("k8s", v2) is not None and catalog.files("k8s", broken) is None
    assert len(catalog.all_files()) == 3


# ---------------------------------------------------------------------------- config


def config_text(tmp: Path, image: str, extra: str = "") -> str:
    return textwrap.dedent(f"""\
        server: {{interfaces: [lo], address: 127.0.0.53, state_dir: {tmp}/state}}
        network: {{subnet: 127.0.0.0/8}}
        {extra}
        defaults: {{image: {image}}}
        pools:
          - name: w
            nodes: [{{name: me, mac: "02:00:00:00:00:01", ip: 127.0.0.1}}]
          - name: canary
            nodes: [{{name: c1, mac: "02:00:00:00:00:02", ip: 127.0.0.2}}]
        """)


def test_config_names_stored_images_and_checks_pins(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown image 'k8s'"):
        parse_config(config_text(tmp_path, "k8s"))
    store = ImageStore(tmp_path / "state" / "images")
    v1 = store.add("k8s", build(tmp_path, "a")).version
    parse_config(config_text(tmp_path, "k8s"))
    parse_config(config_text(tmp_path, f"k8s@{v1}"))
    with pytest.raises(ConfigError, match="no version 'ffff'"):
        parse_config(config_text(tmp_path, "k8s@ffff"))
    legacy = f"images: {{old: {{kernel: {tmp_path}/k, initrd: {tmp_path}/i}}}}"
    with pytest.raises(ConfigError, match="cannot pin a version"):
        parse_config(config_text(tmp_path, "old@abc", legacy))
    clash = f"images: {{k8s: {{kernel: {tmp_path}/k, initrd: {tmp_path}/i}}}}"
    with pytest.raises(ConfigError, match="also in the image store"):
        parse_config(config_text(tmp_path, "k8s", clash))
    path = tmp_path / "bootd.yaml"
    path.write_text(config_text(tmp_path, "notyet"))
    assert image_store_of(path) == tmp_path / "state" / "images"  # config invalid: still


# ---------------------------------------------------------------------------- HTTP


async def test_scripts_name_the_version_and_old_versions_stay_served(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "state" / "images")
    v1 = store.add("k8s", build(tmp_path, "a")).version
    v2 = store.add("k8s", build(tmp_path, "b")).version
    config = parse_config(config_text(tmp_path, "k8s"))
    recorder = Recorder(None, EventPolicy(600, 10))

    async def script_and_files(promoted: str) -> str:
        snapshot = build_snapshot(config, Store(tmp_path / "s.sqlite3"), hashes=ImageHashes())
        client = TestClient(TestServer(boot_app(View.fixed(snapshot.boot), Metrics(),
                                                recorder), host="127.0.0.1"))
        await client.start_server()
        try:
            text = await (await client.get("/nodes/02-00-00-00-00-01/boot.ipxe")).text()
            assert f"/images/k8s/{promoted}/kernel" in text
            assert f"bootd.image=k8s@{promoted}" in text
            rootfs = await client.get(f"/images/k8s/{v1}/rootfs")  # a boot begun on v1
            assert rootfs.status == 200 and await rootfs.read() == b"rootfs " + b"a" * 1000
            digest = await (await client.get(f"/images/k8s/{v2}/kernel.sha256")).text()
            assert digest.split()[0] == hashlib.sha256(b"kernel b").hexdigest()
            assert (await client.get("/images/k8s/ffffffffffff/kernel")).status == 404
            assert (await client.get(f"/images/k8s/{v1}/secret")).status == 404
            assert (await client.get("/images/k8s/kernel")).status == 404  # managed: no
            return text
        finally:
            await client.close()

    await script_and_files(v1)
    store.promote("k8s", v2)
    await script_and_files(v2)
    state = recorder.state("me")
    assert state is not None
    fetched = {s.detail["image"] for a in state.history for s in a.steps if s.stage == "rootfs"}
    assert fetched == {f"k8s@{v1}"}


# ---------------------------------------------------------------------------- status


def test_status_document_marks_drift(tmp_path: Path) -> None:
    recorder = Recorder(None, EventPolicy(600, 10), clock=lambda: 100.0)
    for node, image in (("me", "k8s@aaaa"), ("c1", "k8s@bbbb")):
        recorder.record(BootEvent(50.0, "joined", node, None, None, "w", "ok",
                                  {"image": image}))
    want = {"me": "k8s@bbbb", "c1": "k8s@bbbb"}
    doc = recorder.status_document([], desired=lambda name, mac: want.get(name or ""))
    rows = {r["node"]: r for r in doc["nodes"]}
    assert rows["me"]["drift"] and rows["me"]["desired_image"] == "k8s@bbbb"
    assert not rows["c1"]["drift"] and rows["c1"]["image"] == "k8s@bbbb"


# ---------------------------------------------------------------------------- CLI


def test_cli_add_list_promote_rollback_prune(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bootd.yaml"
    text = config_text(tmp_path, "k8s").replace(
        "state_dir:", f"api: {tmp_path}/no-daemon.sock, state_dir:")
    path.write_text(text)
    cfg = ["-c", str(path)]
    assert main(["image", "add", "k8s", str(build(tmp_path, "a")), *cfg]) == 0
    first = capsys.readouterr().out
    v1 = first.split("@")[1].split(":")[0]
    assert "promoted" in first and "no daemon" in first
    assert main(["image", "add", "k8s", str(build(tmp_path, "b")), *cfg]) == 0
    v2 = capsys.readouterr().out.split("@")[1].split(":")[0]
    (tmp_path / "state").mkdir(exist_ok=True)
    Store(tmp_path / "state" / "bootd.sqlite3").close()
    assert main(["image", "list", "-o", "json", *cfg]) == 0
    listed = json.loads(capsys.readouterr().out)["images"]
    assert [(i["version"], i["promoted"]) for i in listed] == [(v1, True), (v2, False)]
    assert main(["image", "promote", "k8s", v2, *cfg]) == 0
    assert main(["image", "list", *cfg]) == 0
    table = capsys.readouterr().out
    assert f"k8s    {v2}" in table and "promoted" in table.split(v2)[1].splitlines()[0]
    assert main(["image", "rollback", "k8s", *cfg]) == 0
    assert f"rolled back to {v1}" in capsys.readouterr().out
    assert main(["image", "promote", "k8s", "nope", *cfg]) == 1
    assert "no version 'nope'" in capsys.readouterr().err
    time.sleep(0.01)
    assert main(["image", "prune", "k8s", "--keep", "0", *cfg]) == 0
    assert f"pruned {v2}" in capsys.readouterr().out
