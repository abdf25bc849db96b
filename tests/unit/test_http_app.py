"""HTTP routes through aiohttp's test client: scripts, images, secrets, events, admin."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from bootd.fleet.config import parse_config
from bootd.fleet.images import ImageHashes
from bootd.http.admin import ReloadResult, admin_app
from bootd.http.boot import boot_app
from bootd.live import View
from bootd.ops.metrics import Metrics
from bootd.runtime import Snapshot, build_snapshot
from bootd.state.recorder import EventPolicy, Recorder
from bootd.state.store import Store

TOKEN = "abcdef.0123456789abcdef"
HASH = "sha256:" + "a" * 64


def make_config(tmp: Path, token: str = f"{{value: {TOKEN}}}") -> str:
    img = tmp / "img"
    return textwrap.dedent(f"""\
        server: {{interfaces: [lo], address: 127.0.0.53, http_port: 8080}}
        network: {{subnet: 127.0.0.0/8}}
        images:
          k8s: {{kernel: {img}/vmlinuz, initrd: {img}/initrd.img, rootfs: {img}/rootfs,
                cmdline: "console=ttyS0"}}
          gone: {{kernel: {img}/missing, initrd: {img}/missing}}
        clusters:
          prod: {{api_server: "https://10.0.0.10:6443", ca_cert_hash: "{HASH}",
                  token: {token}}}
        defaults: {{image: k8s, cluster: prod, timezone: Europe/Prague,
                    ssh_authorized_keys: ["ssh-ed25519 AAAAC3Nza ops@example"],
                    kernel_modules: [overlay, br_netfilter], labels: {{zone: a}},
                    taints: ["dedicated=infra:NoSchedule"], kernel_args: [quiet],
                    scripts: {{network.sh: "#!/bin/sh\\necho bonding"}}}}
        pools:
          - name: w
            nodes:
              - {{name: me, mac: "02:00:00:00:00:01", ip: 127.0.0.1}}
              - {{name: other, mac: "02:00:00:00:00:02", ip: 127.0.0.2}}
              - {{name: noimg, mac: "02:00:00:00:00:03", ip: 127.0.0.3, image: gone}}
          - name: any
            dynamic: {{range: 127.0.1.0-127.0.1.9}}
        """)


def context(tmp: Path, config_text: str | None = None) -> Snapshot:
    """The runtime snapshot of a config, with the TFTP root under `tmp`."""
    text = config_text or make_config(tmp)
    text = text.replace("network: {", f"tftp: {{root: {tmp / 'tftp'}, fallback_dirs: []}}\n"
                        "network: {", 1)
    return build_snapshot(parse_config(text), Store(tmp / "state.sqlite3"),
                          hashes=ImageHashes())


def boot_of(snapshot: Snapshot, recorder: Recorder | None = None) -> web.Application:
    return boot_app(View.fixed(snapshot.boot), Metrics(), recorder)


async def client_for(app: web.Application) -> TestClient[web.Request, web.Application]:
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def boot(tree: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await client_for(boot_of(context(tree)))
    yield client
    await client.close()


async def test_generic_script_chains_by_mac(boot: TestClient[web.Request, web.Application],
                                            ) -> None:
    resp = await boot.get("/boot.ipxe")
    text = await resp.text()
    assert resp.status == 200 and text.startswith("#!ipxe\n")
    assert "chain --autofree http://127.0.0.53:8080/nodes/${net0/mac:hexhyp}/boot.ipxe" in text


async def test_node_script(boot: TestClient[web.Request, web.Application], tree: Path) -> None:
    for url in ("/nodes/02-00-00-00-00-01/boot.ipxe", "/boot.ipxe?mac=02:00:00:00:00:01",
                "/nodes/0200.0000.0001/boot.ipxe"):
        text = await (await boot.get(url)).text()
        rootfs_sha = hashlib.sha256((tree / "img" / "rootfs").read_bytes()).hexdigest()
        assert ("kernel --name vmlinuz http://127.0.0.53:8080/images/k8s/kernel console=ttyS0 "
                "quiet bootd.url=http://127.0.0.53:8080 bootd.node=me "
                "bootd.mac=02:00:00:00:00:01 bootd.image=k8s "
                "bootd.rootfs=http://127.0.0.53:8080/images/k8s/rootfs "
                f"bootd.rootfs_sha256={rootfs_sha} initrd=initrd || goto failed") in text
        assert "initrd --name initrd http://127.0.0.53:8080/images/k8s/initrd" in text
        assert ("imgfetch --name beacon http://127.0.0.53:8080/nodes/02-00-00-00-00-01/beacon"
                " && imgfree beacon ||\nboot vmlinuz") in text


async def test_node_scripts_render_once_per_snapshot(tree: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's script is rendered once per runtime snapshot; a rebuilt rootfs (a new
    hash) or a reload (a new snapshot) renders it again; made-up MACs cannot grow the
    cache past its bound."""
    import bootd.http.boot as boot_module

    renders: list[str] = []

    def counting(*args: object) -> str:
        renders.append(str(args[1]))
        return real(*args)  # type: ignore[arg-type]

    real = boot_module.ipxe_node
    monkeypatch.setattr(boot_module, "ipxe_node", counting)
    url = "/nodes/02-00-00-00-00-01/boot.ipxe"
    client = await client_for(boot_of(context(tree)))
    try:
        first = await (await client.get(url)).text()
        for _ in range(3):
            assert await (await client.get(url)).text() == first
        assert renders == ["02:00:00:00:00:01"]
        rootfs = tree / "img" / "rootfs"
        new = tree / "img" / "rootfs.new"
        new.write_bytes(os.urandom(1000))
        new.replace(rootfs)
        await asyncio.sleep(boot_module.LOOK_AGAIN * 1.5)  # files are looked at that often
        rebuilt = await (await client.get(url)).text()
        assert hashlib.sha256(rootfs.read_bytes()).hexdigest() in rebuilt and rebuilt != first
        assert len(renders) == 2
        monkeypatch.setattr(boot_module, "MAX_CACHED_SCRIPTS", 3)
        for i in range(5):  # catch-all machines
            assert (await client.get(f"/nodes/02-00-00-00-0a-0{i}/boot.ipxe")).status == 200
        settings = client.app[boot_module.SETTINGS].get()
        assert len(settings.scripts) == 3
    finally:
        await client.close()
    # a reload: a new snapshot renders from the new config
    reloaded = context(tree, make_config(tree).replace("kernel_args: [quiet]",
                                                       "kernel_args: [loud]"))
    client = await client_for(boot_of(reloaded))
    try:
        text = await (await client.get(url)).text()
        assert " loud " in text and " quiet " not in text
    finally:
        await client.close()


async def test_unknown_mac_and_no_image_give_up(tree: Path) -> None:
    config = make_config(tree).split("  - name: any")[0]
    client = await client_for(boot_of(context(tree, config)))
    try:
        text = await (await client.get("/nodes/52-54-00-00-00-99/boot.ipxe")).text()
        assert "52:54:00:00:00:99 is not in bootd's inventory" in text
        assert "asking again in 10 seconds (attempt 1 of 6)" in text
        assert ("chain --autofree http://127.0.0.53:8080/nodes/52-54-00-00-00-99/boot.ipxe"
                "?attempt=2 ||") in text
        assert text.rstrip().endswith("exit 1")
        last = await (await client.get("/nodes/52-54-00-00-00-99/boot.ipxe?attempt=6")).text()
        assert "asking again" not in last and "giving up" in last
        assert last.rstrip().endswith("exit 1")
        odd = await client.get("/nodes/52-54-00-00-00-99/boot.ipxe?attempt=x")
        assert "attempt 1 of 6" in await odd.text()
        text = await (await client.get("/nodes/02-00-00-00-00-03/boot.ipxe")).text()
        assert "image gone for noimg is missing on the server" in text and "exit 1" in text
        assert (await client.get("/nodes/zz/boot.ipxe")).status == 400
    finally:
        await client.close()


async def test_grub_over_http_matches_tftp(boot: TestClient[web.Request, web.Application],
                                           tree: Path) -> None:
    text = await (await boot.get("/nodes/02:00:00:00:00:01/grub.cfg")).text()
    ctx = context(tree)
    assert text == ctx.boot.grub.for_mac("02:00:00:00:00:01", None)
    assert "linux (http,127.0.0.53:8080)/images/k8s/kernel" in text


async def test_image_full_head_range_etag(boot: TestClient[web.Request, web.Application],
                                          tree: Path) -> None:
    data = (tree / "img" / "vmlinuz").read_bytes()
    resp = await boot.get("/images/k8s/kernel")
    assert resp.status == 200 and await resp.read() == data
    etag = resp.headers["ETag"]
    assert resp.headers["Accept-Ranges"] == "bytes" and "Last-Modified" in resp.headers
    head = await boot.head("/images/k8s/kernel")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    assert await head.read() == b""
    part = await boot.get("/images/k8s/kernel", headers={"Range": "bytes=100-199"})
    assert part.status == 206 and await part.read() == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    cached = await boot.get("/images/k8s/kernel", headers={"If-None-Match": etag})
    assert cached.status == 304
    same = await boot.get("/images/k8s/kernel", headers={"If-Range": etag,
                                                        "Range": "bytes=0-9"})
    assert same.status == 206 and await same.read() == data[:10]
    changed = await boot.get("/images/k8s/kernel", headers={"If-Range": '"other"',
                                                           "Range": "bytes=0-9"})
    assert changed.status == 200 and await changed.read() == data


async def test_image_sha256(boot: TestClient[web.Request, web.Application],
                            tree: Path) -> None:
    want = hashlib.sha256((tree / "img" / "initrd.img").read_bytes()).hexdigest()
    text = await (await boot.get("/images/k8s/initrd.sha256")).text()
    assert text == f"{want}  initrd\n"
    resp = await boot.get("/images/k8s/initrd")
    assert resp.headers["X-Checksum-Sha256"] == want


async def test_image_errors(boot: TestClient[web.Request, web.Application]) -> None:
    assert (await boot.get("/images/nope/kernel")).status == 404
    assert (await boot.get("/images/k8s/passwd")).status == 404
    missing = await boot.get("/images/gone/kernel")
    assert missing.status == 404 and "is missing" in await missing.text()
    assert (await boot.get("/images/gone/rootfs")).status == 404


async def test_atomic_rename_never_corrupts_download_in_flight(
        boot: TestClient[web.Request, web.Application], tree: Path) -> None:
    path = tree / "img" / "rootfs"
    old = path.read_bytes()
    resp = await boot.get("/images/k8s/rootfs")
    first = await resp.content.readexactly(65536)
    new = tree / "img" / "rootfs.new"
    new.write_bytes(os.urandom(len(old)))
    new.replace(path)
    rest = await resp.read()
    assert first + rest == old
    again = await (await boot.get("/images/k8s/rootfs")).read()
    assert again == path.read_bytes() != old


async def test_boot_files_over_http(boot: TestClient[web.Request, web.Application]) -> None:
    resp = await boot.get("/boot/snponly.efi")
    assert resp.status == 200 and await resp.read() == b"EFI"
    assert (await boot.get("/boot/nope.efi")).status == 404
    leak = await boot.get("/boot/..%2Fsecret")
    assert leak.status in (403, 404) and "SECRET" not in await leak.text()


async def test_boot_files_stream_like_images(boot: TestClient[web.Request, web.Application],
                                             tree: Path) -> None:
    """A TFTP-root file over HTTP is a FileResponse (sendfile): HEAD, Range, ETag; a
    rendered one (GRUB config) comes from memory; an escaping link is 403."""
    data = os.urandom(200_000)
    (tree / "tftp" / "big.efi").write_bytes(data)
    head = await boot.head("/boot/big.efi")
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    assert head.headers["Content-Type"] == "application/octet-stream" and "ETag" in head.headers
    part = await boot.get("/boot/big.efi", headers={"Range": "bytes=100000-100009"})
    assert part.status == 206 and await part.read() == data[100000:100010]
    grub = await boot.get("/boot/grub/grub.cfg-01-02-00-00-00-00-01")
    assert grub.status == 200 and "bootd.node=me" in await grub.text()
    (tree / "tftp" / "out").symlink_to(tree / "secret")
    out = await boot.get("/boot/out")
    assert out.status == 403 and "SECRET" not in await out.text()


async def test_join_script_only_for_the_node(boot: TestClient[web.Request, web.Application],
                                             tree: Path) -> None:
    resp = await boot.get("/nodes/02:00:00:00:00:01/join.sh")  # we are 127.0.0.1 = "me"
    text = await resp.text()
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"
    assert f"--token {TOKEN}" in text
    assert "kubeadm join 10.0.0.10:6443" in text
    assert f"--discovery-token-ca-cert-hash {HASH}" in text
    assert ("KUBELET_EXTRA_ARGS='--node-labels=zone=a "
            "--register-with-taints=dedicated=infra:NoSchedule'") in text
    assert "modprobe overlay" in text and "modprobe br_netfilter" in text
    assert "/run/bootd/scripts/network.sh" in text and "echo bonding" in text
    assert "ssh-ed25519 AAAAC3Nza ops@example" in text
    assert "/usr/share/zoneinfo/Europe/Prague" in text
    script = tree / "join.sh"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True,
                              text=True)
        assert lint.returncode == 0, lint.stdout
    refused = await boot.get("/nodes/02:00:00:00:00:02/join.sh")  # "other" is 127.0.0.2
    assert refused.status == 403 and TOKEN not in await refused.text()
    unknown = await boot.get("/nodes/52:54:00:00:00:09/join.sh")
    assert unknown.status == 403


async def test_join_script_for_a_leased_catch_all_node(tree: Path) -> None:
    ctx = context(tree)
    config = make_config(tree).replace("127.0.1.0-127.0.1.9", "127.0.0.1-127.0.0.1").replace(
        '{name: me, mac: "02:00:00:00:00:01", ip: 127.0.0.1}',
        '{name: me, mac: "02:00:00:00:00:01", ip: 127.0.0.4}')
    ctx = context(tree, config)
    assert ctx.directory.leases is not None
    import time
    from ipaddress import IPv4Address
    ctx.directory.leases.bind("52:54:00:00:00:09", IPv4Address("127.0.0.1"), time.time(),
                              3600)
    client = await client_for(boot_of(ctx))
    try:
        resp = await client.get("/nodes/52-54-00-00-00-09/join.sh")
        assert resp.status == 200 and "NODE_NAME=node-52-54-00-00-00-09" in await resp.text()
    finally:
        await client.close()


async def test_join_script_without_token_is_503(tree: Path) -> None:
    config = make_config(tree, token='{command: "exit 1"}')
    client = await client_for(boot_of(context(tree, config)))
    try:
        resp = await client.get("/nodes/02:00:00:00:00:01/join.sh")
        assert resp.status == 503
    finally:
        await client.close()


async def test_node_events(boot: TestClient[web.Request, web.Application]) -> None:
    ok = await boot.post("/api/v1/events", json={"stage": "joined", "message": "ok"})
    assert ok.status == 204
    echo = await boot.post("/api/v1/events", json={"stage": "kubeadm",
                                                   "message": f"join --token {TOKEN}"})
    assert echo.status == 204  # accepted, but the token is scrubbed before logging
    assert (await boot.post("/api/v1/events", data=b"not json")).status in (400, 429)


async def test_reported_stages_are_a_closed_set(tree: Path) -> None:
    """A node inventing stage names grows no metric label: they are stored as `other`
    with the name in the detail (issue 16, finding 7: 149 names grew /metrics 7x)."""
    import asyncio

    recorder = Recorder(None, EventPolicy(stall_after=600, keep_attempts=3))
    metrics = Metrics()
    client = await client_for(boot_app(View.fixed(context(tree).boot), metrics, recorder))
    try:
        for stage in ("kubeadm", "firmware-update", "x1", "joined"):
            await asyncio.sleep(0.25)  # the per-node rate limit
            assert (await client.post("/api/v1/events", json={"stage": stage})).status == 204
        state = recorder.state("me")
        assert state is not None
        steps = [(s.stage, s.detail.get("reported_stage")) for s in state.history[-1].steps]
        assert steps == [("kubeadm", None), ("other", "firmware-update"), ("other", "x1"),
                         ("joined", None)]
        exposed = generate_latest(metrics.registry).decode()
        labels = set(re.findall(r'bootd_node_events_total\{stage="([^"]+)"\}', exposed))
        assert labels == {"kubeadm", "other", "joined"}
        assert "firmware-update" not in exposed and "x1" not in exposed
    finally:
        await client.close()


async def test_node_event_validation(tree: Path) -> None:
    client = await client_for(boot_of(context(tree)))
    try:
        import asyncio

        for body, status in ((b"not json", 400), (b'{"message": "x"}', 400),
                             (b'{"stage": "BAD STAGE"}', 400),
                             (b'{"stage": "x", "message": "' + b"a" * 5000 + b'"}', 413)):
            await asyncio.sleep(0.25)  # stay under the per-node rate limit
            resp = await client.post("/api/v1/events", data=body)
            assert resp.status == status, body[:30]
        statuses = [(await client.post("/api/v1/events", json={"stage": "x"})).status
                    for _ in range(30)]
        assert statuses[:15] == [204] * 15 and 429 in statuses  # a burst, then the limit
    finally:
        await client.close()


async def test_events_refused_from_non_node(tree: Path) -> None:
    config = make_config(tree).replace("ip: 127.0.0.1}", "ip: 127.0.0.5}")
    client = await client_for(boot_of(context(tree, config)))
    try:
        resp = await client.post("/api/v1/events", json={"stage": "joined"})
        assert resp.status == 403
    finally:
        await client.close()


async def test_admin_api(tree: Path) -> None:
    client = await client_for(admin_app(View.fixed(context(tree).admin), Metrics()))
    try:
        assert (await (await client.get("/healthz")).json()) == {"status": "ok"}
        metrics = await (await client.get("/metrics")).text()
        assert 'bootd_join_token_available{cluster="prod"} 1.0' in metrics
        assert 'bootd_join_token_failures{cluster="prod"} 0.0' in metrics
        nodes = await (await client.get("/api/v1/nodes")).json()
        assert [n["name"] for n in nodes] == ["me", "other", "noimg"]
        for key in ("me", "127.0.0.1", "02-00-00-00-00-01"):
            node = await (await client.get(f"/api/v1/nodes/{key}")).json()
            assert node["name"] == "me" and node["labels"] == {"zone": "a"}
        assert (await client.get("/api/v1/nodes/nobody")).status == 404
        tokens = await (await client.get("/api/v1/tokens")).json()
        assert tokens["prod"]["has_token"] is True and TOKEN not in str(tokens)
    finally:
        await client.close()


async def test_cloud_init_nocloud_documents(boot: TestClient[web.Request, web.Application],
                                            ) -> None:
    base = "/cloud-init/02:00:00:00:00:01"
    meta = await (await boot.get(f"{base}/meta-data")).text()
    assert "instance-id: bootd-me-020000000001" in meta and "local-hostname: me" in meta
    user = await boot.get(f"{base}/user-data")
    text = await user.text()
    assert user.status == 200 and text.startswith("#cloud-config\n")
    assert f"--token {TOKEN}" in text and user.headers["Cache-Control"] == "no-store"
    assert (await boot.get(f"{base}/vendor-data")).status == 200
    net = await (await boot.get(f"{base}/network-config")).text()
    assert "version: 2" in net and "macaddress: 02:00:00:00:00:01" in net
    assert (await boot.get(f"{base}/bogus")).status == 404
    refused = await boot.get("/cloud-init/02:00:00:00:00:02/user-data")
    assert refused.status == 403 and TOKEN not in await refused.text()
    catch_all = await (await boot.get("/cloud-init/52:54:00:00:00:77/meta-data")).text()
    assert "local-hostname: node-52-54-00-00-00-77" in catch_all
    assert (await boot.get("/cloud-init/not-a-mac/meta-data")).status == 400


async def test_admin_reload_route(tree: Path) -> None:
    ctx = context(tree)
    answers = iter([ReloadResult(True, [], ["server.http_port"]),
                    ReloadResult(False, ["f.yaml:3: network.subnet: bad"], [])])
    client = await client_for(admin_app(View.fixed(ctx.admin), Metrics(),
                                        reload=lambda: next(answers)))
    try:
        ok = await client.post("/api/v1/reload")
        assert ok.status == 200
        assert await ok.json() == {"ok": True, "errors": [],
                                   "restart_required": ["server.http_port"]}
        bad = await client.post("/api/v1/reload")
        assert bad.status == 422 and (await bad.json())["errors"] == [
            "f.yaml:3: network.subnet: bad"]
    finally:
        await client.close()


async def test_tokens_echoed_by_nodes_are_scrubbed(tree: Path) -> None:
    recorder = Recorder(None, EventPolicy(600, 2))
    client = await client_for(boot_of(context(tree), recorder))
    try:
        resp = await client.post("/api/v1/events", json={
            "stage": "kubeadm", "message": f"join 10.0.0.10:6443 --token {TOKEN} --x"})
        assert resp.status == 204
        state = recorder.state("me")
        assert state is not None
        message = str(state.history[-1].steps[-1].detail["message"])
        assert TOKEN not in message and "--token <token> --x" in message
    finally:
        await client.close()


async def test_stage_with_a_trailing_newline_is_refused(tree: Path) -> None:
    client = await client_for(boot_of(context(tree)))
    try:
        resp = await client.post("/api/v1/events", data=b'{"stage": "failed\\n"}')
        assert resp.status == 400
    finally:
        await client.close()


async def test_a_report_split_across_segments_is_read_whole(tree: Path) -> None:
    recorder = Recorder(None, EventPolicy(600, 2))
    client = await client_for(boot_of(context(tree), recorder))

    async def slowly() -> AsyncIterator[bytes]:
        import asyncio

        yield b'{"stage": "jo'
        await asyncio.sleep(0.2)  # the rest arrives in a later segment
        yield b'ined", "message": "ok"}'

    try:
        resp = await client.post("/api/v1/events", data=slowly())
        assert resp.status == 204
        state = recorder.state("me")
        assert state is not None and state.stage == "joined"
    finally:
        await client.close()


async def test_empty_suffix_range_is_416(boot: TestClient[web.Request, web.Application],
                                         tree: Path) -> None:
    size = (tree / "img" / "vmlinuz").stat().st_size
    for url, length in (("/images/k8s/kernel", size), ("/boot/snponly.efi", 3)):
        resp = await boot.get(url, headers={"Range": "bytes=-0"})
        assert resp.status == 416, url
        assert resp.headers["Content-Range"] == f"bytes */{length}"
        ok = await boot.get(url, headers={"Range": "bytes=-1"})
        assert ok.status == 206 and len(await ok.read()) == 1


async def test_tokens_glued_to_other_characters_are_scrubbed(tree: Path) -> None:
    recorder = Recorder(None, EventPolicy(600, 2))
    client = await client_for(boot_of(context(tree), recorder))
    try:
        for message in (f"tokx{TOKEN}_", f"--token={TOKEN.upper()}"):
            resp = await client.post("/api/v1/events", json={"stage": "kubeadm",
                                                             "message": message})
            assert resp.status == 204
        state = recorder.state("me")
        assert state is not None
        logged = [str(s.detail.get("message")) for s in state.history[-1].steps]
        assert logged[-2:] == ["tokx<token>_", "--token=<token>"]
    finally:
        await client.close()


async def test_requests_naming_unknown_macs_are_remembered_boundedly(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """URLs can name any MAC: the refusals they earn must not grow the node list."""
    from bootd.state import recorder as recorder_module

    monkeypatch.setattr(recorder_module, "MAX_TRANSIENT", 5)
    recorder = Recorder(None, EventPolicy(600, 3))
    client = await client_for(boot_of(context(tree), recorder))
    try:
        for i in range(20):
            resp = await client.get(f"/nodes/02:ee:00:00:00:{i:02x}/join.sh")
            assert resp.status == 403
        assert len(recorder.states()) == 5
    finally:
        await client.close()


async def test_a_version_this_member_has_not_fetched_boots_from_the_members_that_hold_it(
        tree: Path) -> None:
    """Cluster mode (bootd/fleet/images.py rule 4): a version known from etcd but not yet
    in this member's store: the script names the members holding it after this one,
    and the rootfs's sha256 comes from the version's record, not from hashing."""
    from bootd.fleet.images import version_id
    from bootd.fleet.imagestore import Pointers, SharedCatalog, VersionInfo

    digests = {"kernel": "1" * 64, "initrd": "2" * 64, "rootfs": "3" * 64}
    version = version_id(digests, "console=ttyS0")
    info = VersionInfo("fleet", version, 1.0, "console=ttyS0",
                       {p: 100 for p in digests}, digests)
    shared = SharedCatalog({"fleet": Pointers(version)}, {"fleet": {version: info}})
    holders: dict[str, tuple[str, ...]] = {f"fleet@{version}": ("http://10.0.0.2:8080",)}
    text = make_config(tree).replace(
        "- {name: other, mac: \"02:00:00:00:00:02\", ip: 127.0.0.2}",
        "- {name: other, mac: \"02:00:00:00:00:02\", ip: 127.0.0.2, image: fleet}",
    ).replace("- {name: noimg, mac: \"02:00:00:00:00:03\", ip: 127.0.0.3, image: gone}",
              f"- {{name: noimg, mac: \"02:00:00:00:00:03\", ip: 127.0.0.3, "
              f"image: \"fleet@{version}\"}}")
    text += "cluster: {member: b1, etcd: {endpoints: [\"http://127.0.0.1:2379\"]}}\n"
    text = text.replace("network: {", f"tftp: {{root: {tree / 'tftp'}, fallback_dirs: []}}\n"
                        "network: {", 1)
    snapshot = build_snapshot(parse_config(text), Store(tree / "state.sqlite3"),
                              hashes=ImageHashes(), shared_images=lambda: shared,
                              peers=lambda mac, image: holders.get(image or "", ()))
    client = await client_for(boot_of(snapshot))
    try:
        script = await (await client.get("/nodes/02-00-00-00-00-02/boot.ipxe")).text()
        path = f"/images/fleet/{version}"
        assert (f"kernel --name vmlinuz http://127.0.0.53:8080{path}/kernel" in script
                and f"|| kernel --name vmlinuz http://10.0.0.2:8080{path}/kernel" in script)
        assert f"bootd.rootfs_sha256={'3' * 64}" in script
        assert "bootd.peers=http://10.0.0.2:8080" in script
        # this member does not serve what it does not hold
        assert (await client.get(f"{path}/kernel")).status == 404
        holders.clear()  # no live member holds it: the node is told, and asks again
        text = await (await client.get("/nodes/02-00-00-00-00-03/boot.ipxe")).text()
        assert f"image fleet@{version} for noimg is on no live member yet" in text
    finally:
        await client.close()
