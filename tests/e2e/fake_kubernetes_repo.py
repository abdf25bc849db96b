"""A fake Kubernetes APT repository, to test the production image's --kubernetes-repo path
without reaching pkgs.k8s.io (this machine kind has no route to it).

Laid out like pkgs.k8s.io (a flat repository, `deb URL /`), signed with a throw-away key.
Its kubeadm is bootd/lab/testimage/kubeadm, the TEST DOUBLE that reports its arguments; kubelet
and kubectl are stubs that run nothing. Served on loopback while the image builds.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "1.99.0-bootd.test"

STUB = """#!/bin/sh
# TEST STUB of {name} from bootd's fake Kubernetes repository: it runs nothing.
echo "{name} test stub (bootd fake repository): not a real {name}"
"""

KUBELET_UNIT = """[Unit]
Description=kubelet test stub (bootd fake repository)

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/kubelet

[Install]
WantedBy=multi-user.target
"""


def _deb(work: Path, repo: Path, name: str, files: dict[str, tuple[str, int]]) -> None:
    tree = work / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {VERSION}\nArchitecture: amd64\n"
        "Maintainer: bootd tests <tests@bootd.invalid>\n"
        f"Description: {name} test double from bootd's fake Kubernetes repository\n")
    for path, (text, mode) in files.items():
        target = tree / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree),
                    str(repo / f"{name}_{VERSION}_amd64.deb")],
                   check=True, capture_output=True)


def build(dest: Path) -> tuple[Path, Path]:
    """Build the signed repository under `dest`: (repository directory, public key file)."""
    repo, work, gnupg = dest / "repo", dest / "work", dest / "gnupg"
    for d in (repo, work, gnupg):
        d.mkdir(parents=True)
    gnupg.chmod(0o700)
    gpg = ["gpg", "--homedir", str(gnupg), "--batch", "--pinentry-mode", "loopback",
           "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "bootd test repository <tests@bootd.invalid>",
                    "ed25519", "sign", "1d"], check=True, capture_output=True)
    kubeadm = (ROOT / "bootd" / "lab" / "testimage" / "kubeadm").read_text()
    _deb(work, repo, "kubeadm", {"usr/bin/kubeadm": (kubeadm, 0o755)})
    _deb(work, repo, "kubelet", {
        "usr/bin/kubelet": (STUB.format(name="kubelet"), 0o755),
        "lib/systemd/system/kubelet.service": (KUBELET_UNIT, 0o644)})
    _deb(work, repo, "kubectl", {"usr/bin/kubectl": (STUB.format(name="kubectl"), 0o755)})
    for index, command in (("Packages", "packages"), ("Release", "release")):
        out = subprocess.run(["apt-ftparchive", command, "."], cwd=repo, check=True,
                             capture_output=True, text=True).stdout
        (repo / index).write_text(out)
    subprocess.run([*gpg, "--clearsign", "-o", str(repo / "InRelease"), str(repo / "Release")],
                   check=True, capture_output=True)
    key = dest / "kubernetes-test.asc"
    exported = subprocess.run([*gpg, "--armor", "--export"], check=True, capture_output=True)
    key.write_bytes(exported.stdout)
    return repo, key


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(repo: Path) -> Iterator[str]:
    """Serve `repo` on 127.0.0.1 (an image build's chroot shares the host's loopback)."""
    handler = functools.partial(_QuietHandler, directory=str(repo))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
