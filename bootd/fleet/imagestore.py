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
7. In cluster mode the pointers live in etcd, not in pointers.json (bootd/fleet/
   imagesync.py): the pointer arithmetic below (`Pointers.promote`, `rollback`,
   `with_pool`, `prunable`) is pure so that both keep the same rules, and a version
   fetched from another member is committed by the same path as `add` (`commit`), its
   name checked against its content.
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

    def files_json(self) -> dict[str, dict[str, object]]:
        return {part: {"sha256": self.digests[part], "size": self.sizes[part]}
                for part in self.digests}

    @classmethod
    def from_json(cls, name: str, version: str, data: Mapping[str, Any]) -> VersionInfo:
        """image.json, or a version record in etcd; ValueError/KeyError/TypeError if it
        is not one."""
        files = data["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files")
        unknown = set(files) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}")
        return cls(name, version, float(data["added"]), str(data["cmdline"]),
                   {k: int(v["size"]) for k, v in files.items()},
                   {k: str(v["sha256"]) for k, v in files.items()})


HISTORY = 20  # promotes `rollback` can walk back


@dataclass(frozen=True)
class Pointers:
    promoted: str | None = None
    previous: tuple[str, ...] = ()
    pools: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "previous": list(self.previous),
                "pools": dict(self.pools)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pointers:
        promoted = data.get("promoted")
        return cls(None if promoted is None else str(promoted),
                   tuple(str(v) for v in data.get("previous", ())),
                   {str(k): str(v) for k, v in dict(data.get("pools", {})).items()})

    # rule 3, the same in pointers.json and in etcd (rule 7)

    def promote(self, version: str) -> Pointers:
        previous = self.previous
        if self.promoted is not None and self.promoted != version:
            previous = (*previous, self.promoted)
        return Pointers(version, previous[-HISTORY:], {})

    def rollback(self, existing: set[str], name: str) -> Pointers:
        previous = [v for v in self.previous if v in existing]
        if not previous:
            raise ImageStoreError(f"image {name} has no earlier promoted version to "
                                  "return to")
        return Pointers(previous[-1], tuple(previous[:-1]), {})

    def with_pool(self, pool: str, version: str | None) -> Pointers:
        """A rollout's pointer for one pool (None: the pool follows the promoted one)."""
        pools = dict(self.pools)
        if version is None:
            pools.pop(pool, None)
        else:
            pools[pool] = version
        return Pointers(self.promoted, self.previous, pools)

    def held(self) -> set[str]:
        """The versions these pointers keep from being pruned."""
        return {v for v in (self.promoted, *self.previous, *self.pools.values()) if v}


def prunable(versions: list[VersionInfo], pointers: Pointers, in_use: set[str],
             keep: int) -> list[str]:
    """Rule 5: the versions (oldest first) that may go, the `keep` newest kept anyway."""
    held = pointers.held() | in_use
    newest = {i.version for i in versions[-keep:]} if keep > 0 else set()
    return [i.version for i in versions if i.version not in held and i.version not in newest]


@dataclass(frozen=True)
class SharedCatalog:
    """What etcd says of the managed images (rule 7): each image's pointers and its
    version records that are not pruned."""

    pointers: Mapping[str, Pointers]
    versions: Mapping[str, Mapping[str, VersionInfo]]


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
            return VersionInfo.from_json(name, version, json.loads(path.read_text()))
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
            return Pointers.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return Pointers()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("image pointers unreadable", image=name, error=str(exc))
            return Pointers()

    def complete(self) -> dict[str, dict[str, VersionInfo]]:
        """Every readable version whose files are all present (rule 6), by image."""
        out: dict[str, dict[str, VersionInfo]] = {}
        for name, listed in self.names().items():
            for info in self.versions(name, listed):
                d = self.root / name / info.version
                if all((d / part).is_file() for part in info.digests):
                    out.setdefault(name, {})[info.version] = info
                else:
                    log.warning("image version incomplete: left out", image=name,
                                version=info.version)
        return out

    def files_of(self, info: VersionInfo) -> ImageConfig:
        """Where a version's files are (or will be, for one still to be fetched)."""
        d = self.root / info.name / info.version
        return ImageConfig(kernel=d / "kernel", initrd=d / "initrd",
                           rootfs=d / "rootfs" if "rootfs" in info.digests else None,
                           cmdline=info.cmdline)

    def catalog(self, unmanaged: Mapping[str, ImageConfig],
                shared: SharedCatalog | None = None) -> ImageCatalog:
        """The pure view one runtime snapshot serves from (rule 6 for damaged entries).
        `shared`: cluster mode's pointers and version records (rule 7); a version other
        members hold and this one has not fetched yet is in the catalog as remote."""
        local = {name: infos for name, infos in self.complete().items()
                 if name not in unmanaged}  # a clash: the config's cross-check reports it
        known: dict[str, dict[str, VersionInfo]] = {n: dict(v) for n, v in local.items()}
        remote: set[tuple[str, str]] = set()
        if shared is not None:
            for name, records in shared.versions.items():
                if name in unmanaged:
                    continue
                for version, info in records.items():
                    if version not in known.get(name, {}):
                        known.setdefault(name, {})[version] = info
                        remote.add((name, version))
        pointer_of = ((lambda name: shared.pointers.get(name, Pointers()))
                      if shared is not None else self.pointers)
        versions: dict[str, dict[str, ImageConfig]] = {}
        digests: dict[tuple[str, str], Mapping[str, str]] = {}
        promoted: dict[str, str] = {}
        pools: dict[tuple[str, str], str] = {}
        for name, infos in known.items():
            for version, info in infos.items():
                versions.setdefault(name, {})[version] = self.files_of(info)
                digests[(name, version)] = info.digests
            ptr = pointer_of(name)
            if ptr.promoted is not None:
                promoted[name] = ptr.promoted
            for pool, version in ptr.pools.items():
                pools[(name, pool)] = version
        return ImageCatalog(unmanaged, versions, promoted, pools, digests, frozenset(remote))

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
            now: float | None = None, own_pointers: bool = True) -> Added:
        """Import a build (rule 1); promote it if it is the image's first (rule 2).
        `own_pointers` False: cluster mode, where the pointers are etcd's (rule 7)."""
        self._check_name(name)
        files, declared_cmdline = build_files(src)
        cmdline = declared_cmdline if cmdline is None else cmdline
        with self.incoming(name) as incoming:
            digests: dict[str, str] = {}
            sizes: dict[str, int] = {}
            for part, path in files.items():
                digests[part], sizes[part] = _copy_hashing(path, incoming / part)
            version = version_id(digests, cmdline)
            info = VersionInfo(name, version, time.time() if now is None else now, cmdline,
                               sizes, digests)
            return self.commit(info, incoming, own_pointers,
                               sources={p: str(f) for p, f in files.items()})

    @contextlib.contextmanager
    def incoming(self, name: str) -> Iterator[Path]:
        """A hidden directory to assemble a version in (rule 1); removed afterwards,
        whatever happened, unless `commit` renamed it into place."""
        self._check_name(name)
        image_dir = self.root / name
        image_dir.mkdir(parents=True, exist_ok=True)
        incoming = image_dir / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
        incoming.mkdir()
        try:
            yield incoming
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def commit(self, info: VersionInfo, incoming: Path, own_pointers: bool = True,
               sources: Mapping[str, str] | None = None) -> Added:
        """Make the files assembled in `incoming` version `info.version` of `info.name`
        (rule 1): each file read back and checked against `info`'s sha256 and size, the
        version's name checked against that content, image.json written, fsynced,
        renamed into place. Added by `add`, or fetched from another member (rule 7)."""
        for part, digest in info.digests.items():
            path = incoming / part
            if not path.is_file() or path.stat().st_size != info.sizes[part]:
                raise ImageStoreError(f"{info.name}@{info.version}: {part} is missing or "
                                      "not the size its record says")
            if sha256_file(path) != digest:  # a disk, a copy or a peer that lied
                raise ImageStoreError(f"{info.name}@{info.version}: {part} does not read "
                                      "back as its sha256")
        if version_id(info.digests, info.cmdline) != info.version:
            raise ImageStoreError(f"{info.name}@{info.version}: the name does not match "
                                  "the content")
        record = info.files_json()
        for part, source in (sources or {}).items():
            record[part]["source"] = source
        _write_json(incoming / "image.json", {"added": info.added, "cmdline": info.cmdline,
                                              "files": record})
        _fsync_dir(incoming)
        image_dir = self.root / info.name
        with self._locked():
            final = image_dir / info.version
            new = not final.exists()
            if new:
                os.rename(incoming, final)
                _fsync_dir(image_dir)
            promoted = own_pointers and self.pointers(info.name).promoted is None
            if promoted:
                _write_json(image_dir / "pointers.json",
                            Pointers(info.version, (), {}).to_json())
        return Added(info.version, new, promoted)

    def remove(self, name: str, version: str) -> bool:
        """Delete one version (cluster mode: it was pruned); a download in flight keeps
        reading the inode it opened. False if it was not here."""
        self._check_name(name)
        with self._locked():
            path = self.root / name / version
            if not NAME.fullmatch(version) or not path.is_dir():
                return False
            doomed = self.root / name / f".pruning-{version}"
            os.rename(path, doomed)
            shutil.rmtree(doomed)
        return True

    def promote(self, name: str, version: str) -> Pointers:
        self._check_name(name)
        with self._locked():
            self._check_version(name, version)
            new = self.pointers(name).promote(version)
            _write_json(self.root / name / "pointers.json", new.to_json())
        return new

    def rollback(self, name: str) -> Pointers:
        self._check_name(name)
        with self._locked():
            new = self.pointers(name).rollback(self.names().get(name, set()), name)
            _write_json(self.root / name / "pointers.json", new.to_json())
        return new

    def set_pool(self, name: str, pool: str, version: str | None) -> None:
        """A rollout's pointer for one pool (None: the pool follows the promoted one)."""
        with self._locked():
            if version is not None:
                self._check_version(name, version)
            _write_json(self.root / name / "pointers.json",
                        self.pointers(name).with_pool(pool, version).to_json())

    def prune(self, name: str, keep: int, in_use: set[str]) -> list[str]:
        """Delete the versions rule 5 allows, but keep the `keep` newest whatever they
        are; returns the versions deleted."""
        self._check_name(name)
        removed = []
        with self._locked():
            for version in prunable(self.versions(name), self.pointers(name), in_use, keep):
                doomed = self.root / name / f".pruning-{version}"
                os.rename(self.root / name / version, doomed)
                shutil.rmtree(doomed)
                removed.append(version)
        return removed
