"""The image store: immutable, content-named versions of boot images on local disk.

Theory of operation
-------------------

`bootd image add NAME DIR` copies a build (kernel, initrd, optional rootfs and the
`bootd-image.yaml` images/build-production-image.sh writes next to them) into

    <images_dir>/NAME/VERSION/{kernel,initrd,rootfs,image.json}
    <images_dir>/NAME/pointers.json   {"promoted": V, "previous": [...], "pools": {P: V}}

Rules:

1. A version is never changed once its directory exists: it is assembled in a hidden
   directory beside it, every file hashed while it is copied and hashed again from the
   copy (what is served is what was read), fsynced, then renamed into place. The same
   build added twice is the same version (its name is derived from the content).
2. The first version of a new image is promoted; later ones wait for `promote`.
3. `promote` and `rollback` apply to every pool of the image: they drop the pool
   pointers rollouts set. `previous` is the promote history `rollback` walks back.
4. Pointer changes are read-modify-write under an exclusive lock on `<images_dir>/.lock`,
   written to a temporary file and renamed, so the CLI and the daemon (a rollout) never
   lose each other's change and a reader never sees half a file.
5. `prune` deletes only versions that are not promoted, not pointed at by a pool, not in
   the rollback history, not pinned and not run by any node the caller knows of; a
   download in flight keeps reading the inode it opened.
6. A damaged entry (unreadable image.json, a missing file) is left out of the catalog
   with a warning; it never stops the daemon from serving the others.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from bootd.fleet.config import ImageConfig, stored_images
from bootd.fleet.images import PARTS, ImageCatalog, sha256_file, version_id

log = structlog.get_logger("bootd.images")

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_CHUNK = 1 << 20
# where a build's files may be found when its bootd-image.yaml does not say
_DEFAULT_NAMES = {"kernel": ("vmlinuz", "kernel"), "initrd": ("initrd.img", "initrd"),
                  "rootfs": ("rootfs.squashfs", "rootfs")}


class ImageStoreError(Exception):
    """What an image command could not do, said for the operator."""


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    added: float
    cmdline: str
    sizes: Mapping[str, int]
    digests: Mapping[str, str]


@dataclass(frozen=True)
class Pointers:
    promoted: str | None = None
    previous: tuple[str, ...] = ()
    pools: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "previous": list(self.previous),
                "pools": dict(self.pools)}


@dataclass(frozen=True)
class Added:
    version: str
    new: bool  # False: that content was already a version
    promoted: bool


def _copy_hashing(src: Path, dst: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(_CHUNK):
            h.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def build_files(src: Path) -> tuple[dict[str, Path], str]:
    """The files of a build directory and its command line: from its bootd-image.yaml
    (the first image it declares; a path that is not where it says is looked for in
    `src`, as a moved build would be), else by the usual file names."""
    if not src.is_dir():
        raise ImageStoreError(f"{src} is not a directory")
    declared: dict[str, Any] = {}
    snippet = src / "bootd-image.yaml"
    if snippet.exists():
        try:
            data = yaml.safe_load(snippet.read_text())
            images = data.get("images") if isinstance(data, dict) else None
            first = next(iter(images.values())) if isinstance(images, dict) and images else {}
        except (yaml.YAMLError, OSError, StopIteration) as exc:
            raise ImageStoreError(f"{snippet}: {exc}") from None
        if not isinstance(first, dict):
            raise ImageStoreError(f"{snippet}: expected `images: {{NAME: {{kernel: ...}}}}`")
        declared = first
    files: dict[str, Path] = {}
    for part in PARTS:
        given = declared.get(part)
        candidates = []
        if given:
            path = Path(str(given))
            candidates = [path if path.is_absolute() else src / path, src / path.name]
        else:
            candidates = [src / n for n in _DEFAULT_NAMES[part]]
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None:
            files[part] = found
        elif part != "rootfs" or given:
            raise ImageStoreError(f"{src}: no {part} (looked for "
                                  + ", ".join(str(c) for c in candidates) + ")")
    return files, str(declared.get("cmdline", ""))


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    # ------------------------------------------------------------------ reading

    def names(self) -> dict[str, set[str]]:
        """Every managed image and its versions."""
        return {name: versions for name, versions in stored_images(self.root).items()
                if NAME.fullmatch(name)}

    def info(self, name: str, version: str) -> VersionInfo | None:
        path = self.root / name / version / "image.json"
        try:
            data = json.loads(path.read_text())
            return VersionInfo(name, version, float(data["added"]), str(data["cmdline"]),
                               {k: int(v["size"]) for k, v in data["files"].items()},
                               {k: str(v["sha256"]) for k, v in data["files"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("image version unreadable: left out", image=name, version=version,
                        error=str(exc))
            return None

    def versions(self, name: str, listed: set[str] | None = None) -> list[VersionInfo]:
        """An image's readable versions, oldest first (`listed`: its version directories,
        when the caller has listed the store already)."""
        listed = self.names().get(name, set()) if listed is None else listed
        found = [info for v in listed if (info := self.info(name, v)) is not None]
        return sorted(found, key=lambda i: (i.added, i.version))

    def pointers(self, name: str) -> Pointers:
        path = self.root / name / "pointers.json"
        try:
            data = json.loads(path.read_text())
            return Pointers(data.get("promoted"), tuple(data.get("previous", ())),
                            dict(data.get("pools", {})))
        except FileNotFoundError:
            return Pointers()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("image pointers unreadable", image=name, error=str(exc))
            return Pointers()

    def catalog(self, unmanaged: Mapping[str, ImageConfig]) -> ImageCatalog:
        """The pure view one runtime snapshot serves from (rule 6 for damaged entries)."""
        versions: dict[str, dict[str, ImageConfig]] = {}
        promoted: dict[str, str] = {}
        pools: dict[tuple[str, str], str] = {}
        for name, listed in self.names().items():
            if name in unmanaged:
                continue  # the config's cross-check reports the clash
            for info in self.versions(name, listed):
                d = self.root / name / info.version
                if not all((d / part).is_file() for part in info.digests):
                    log.warning("image version incomplete: left out", image=name,
                                version=info.version)
                    continue
                versions.setdefault(name, {})[info.version] = ImageConfig(
                    kernel=d / "kernel", initrd=d / "initrd",
                    rootfs=d / "rootfs" if "rootfs" in info.digests else None,
                    cmdline=info.cmdline)
            ptr = self.pointers(name)
            if ptr.promoted is not None:
                promoted[name] = ptr.promoted
            for pool, version in ptr.pools.items():
                pools[(name, pool)] = version
        return ImageCatalog(unmanaged, versions, promoted, pools)

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _check_name(self, name: str) -> None:
        if not NAME.fullmatch(name):
            raise ImageStoreError(f"bad image name {name!r}: lower-case letters, digits, "
                                  "'.', '_' and '-', at most 63")

    def _check_version(self, name: str, version: str) -> None:
        if version not in self.names().get(name, set()):
            known = ", ".join(i.version for i in self.versions(name)) or "none"
            raise ImageStoreError(f"image {name} has no version {version!r} (versions: "
                                  f"{known})")

    def add(self, name: str, src: Path, cmdline: str | None = None,
            now: float | None = None) -> Added:
        """Import a build (rule 1); promote it if it is the image's first (rule 2)."""
        self._check_name(name)
        files, declared_cmdline = build_files(src)
        cmdline = declared_cmdline if cmdline is None else cmdline
        image_dir = self.root / name
        image_dir.mkdir(parents=True, exist_ok=True)
        incoming = image_dir / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
        incoming.mkdir()
        try:
            record: dict[str, dict[str, object]] = {}
            for part, path in files.items():
                digest, size = _copy_hashing(path, incoming / part)
                if sha256_file(incoming / part) != digest:  # a disk or a copy that lied
                    raise ImageStoreError(f"{part}: the copy of {path} does not read back "
                                          "as what was read")
                record[part] = {"sha256": digest, "size": size, "source": str(path)}
            version = version_id({p: str(r["sha256"]) for p, r in record.items()}, cmdline)
            _write_json(incoming / "image.json", {
                "added": time.time() if now is None else now, "cmdline": cmdline,
                "files": record})
            _fsync_dir(incoming)
            with self._locked():
                final = image_dir / version
                new = not final.exists()
                if new:
                    os.rename(incoming, final)
                    _fsync_dir(image_dir)
                ptr = self.pointers(name)
                promoted = ptr.promoted is None
                if promoted:
                    _write_json(image_dir / "pointers.json",
                                Pointers(version, (), {}).to_json())
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return Added(version, new, promoted)

    def promote(self, name: str, version: str) -> Pointers:
        self._check_name(name)
        with self._locked():
            self._check_version(name, version)
            ptr = self.pointers(name)
            previous = ptr.previous
            if ptr.promoted is not None and ptr.promoted != version:
                previous = (*previous, ptr.promoted)
            new = Pointers(version, previous[-20:], {})
            _write_json(self.root / name / "pointers.json", new.to_json())
        return new

    def rollback(self, name: str) -> Pointers:
        self._check_name(name)
        with self._locked():
            ptr = self.pointers(name)
            previous = [v for v in ptr.previous if v in self.names().get(name, set())]
            if not previous:
                raise ImageStoreError(f"image {name} has no earlier promoted version to "
                                      "return to")
            new = Pointers(previous[-1], tuple(previous[:-1]), {})
            _write_json(self.root / name / "pointers.json", new.to_json())
        return new

    def set_pool(self, name: str, pool: str, version: str | None) -> None:
        """A rollout's pointer for one pool (None: the pool follows the promoted one)."""
        with self._locked():
            if version is not None:
                self._check_version(name, version)
            ptr = self.pointers(name)
            pools = dict(ptr.pools)
            if version is None:
                pools.pop(pool, None)
            else:
                pools[pool] = version
            _write_json(self.root / name / "pointers.json",
                        Pointers(ptr.promoted, ptr.previous, pools).to_json())

    def prune(self, name: str, keep: int, in_use: set[str]) -> list[str]:
        """Delete the versions rule 5 allows, but keep the `keep` newest whatever they
        are; returns the versions deleted."""
        self._check_name(name)
        removed = []
        with self._locked():
            ptr = self.pointers(name)
            held = {ptr.promoted, *ptr.previous, *ptr.pools.values(), *in_use}
            versions = self.versions(name)
            newest = {i.version for i in versions[-keep:]} if keep > 0 else set()
            for info in versions:
                if info.version in held or info.version in newest:
                    continue
                doomed = self.root / name / f".pruning-{info.version}"
                os.rename(self.root / name / info.version, doomed)
                shutil.rmtree(doomed)
                removed.append(info.version)
        return removed
