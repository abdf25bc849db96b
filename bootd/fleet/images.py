"""Boot image files and their sha256, computed once per file version.

A file version is (device, inode, size, mtime): replacing an image by atomic rename gives
a new version (and a new hash), while a download already in flight keeps streaming the old
inode it opened, so it never mixes the two.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bootd.fleet.config import ImageConfig

PARTS = ("kernel", "initrd", "rootfs")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileVersion:
    path: Path
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @property
    def etag(self) -> str:
        """The entity tag aiohttp's FileResponse sends for this version."""
        return f'"{self.mtime_ns:x}-{self.size:x}"'


def image_path(image: ImageConfig, part: str) -> Path | None:
    if part == "kernel":
        return image.kernel
    if part == "initrd":
        return image.initrd
    if part == "rootfs":
        return image.rootfs
    return None


def version_of(path: Path) -> FileVersion | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileVersion(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ImageHashes:
    """sha256 per file version; concurrent askers share one computation (in a thread)."""

    def __init__(self) -> None:
        self._done: dict[FileVersion, str] = {}
        self._running: dict[FileVersion, asyncio.Future[str]] = {}

    def cached(self, version: FileVersion) -> str | None:
        return self._done.get(version)

    async def sha256(self, version: FileVersion) -> str:
        done = self._done.get(version)
        if done is not None:
            return done
        running = self._running.get(version)
        if running is None:
            loop = asyncio.get_running_loop()
            running = asyncio.ensure_future(loop.run_in_executor(None, sha256_file,
                                                                 version.path))
            self._running[version] = running
        try:
            digest = await asyncio.shield(running)
        finally:
            self._running.pop(version, None)
        # forget older versions of the same path: a rename left them unreachable
        for old in [v for v in self._done if v.path == version.path and v != version]:
            del self._done[old]
        self._done[version] = digest
        return digest


async def image_digests(images: Mapping[str, ImageConfig], hashes: ImageHashes,
                        ) -> dict[str, dict[str, str]]:
    """sha256 of every present file of every image, by image and part (cluster mode
    compares them between members); a missing file is left out."""
    out: dict[str, dict[str, str]] = {}
    for name, image in images.items():
        parts = {}
        for part in PARTS:
            path = image_path(image, part)
            version = version_of(path) if path is not None else None
            if version is not None:
                parts[part] = await hashes.sha256(version)
        out[name] = parts
    return out


# ---------------------------------------------------------------------------- versions
#
# Theory of operation
# -------------------
# An image is either *unmanaged* (paths under `images:` in the config: one version, the
# files as they are now) or *managed* (imported by `bootd image add` into the image
# store: immutable versions, each named by its content). The catalog is the pure view a
# runtime snapshot holds of both:
#
# 1. A reference is `NAME` or `NAME@VERSION`. `NAME@VERSION` pins; `NAME` follows the
#    pool's rollout pointer if it has one, else the image's promoted version.
# 2. Every URL a node gets names the exact version (`/images/NAME/VERSION/PART`), so a
#    boot that began before a promote finishes on the version its script named: any
#    version still in the store is served, not only the current one.
# 3. A node's image is reported as `NAME@VERSION` (managed) or `NAME` (unmanaged); that
#    string is what `bootd status` shows and what drift is judged by.
# 4. In cluster mode a version may be known (in etcd, held by other members) before this
#    member has fetched it: it resolves as `remote`, and a node's script then names a
#    member that holds it for the image files. A managed version's sha256 per part is
#    known from its record, so nothing needs hashing to name the rootfs's.

VERSION_LENGTH = 12  # hex characters of the content digest: collisions need ~2^24 versions


def version_id(digests: Mapping[str, str], cmdline: str) -> str:
    """A version's name: derived from its files' sha256 and its command line, so the same
    build imported twice is the same version."""
    h = hashlib.sha256()
    for part in PARTS:
        if part in digests:
            h.update(f"{part} {digests[part]}\n".encode())
    h.update(f"cmdline {cmdline}\n".encode())
    return h.hexdigest()[:VERSION_LENGTH]


def split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition("@")
    return name, version or None


@dataclass(frozen=True)
class BootImage:
    """The image one node boots: a name, a version (None: unmanaged) and its files."""

    name: str
    version: str | None
    files: ImageConfig
    digests: Mapping[str, str] = field(default_factory=dict)  # managed: sha256 per part
    remote: bool = False  # rule 4: other members hold it, this one not yet

    @property
    def ref(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def url_path(self) -> str:
        """What follows /images/ in its URLs."""
        return self.name if self.version is None else f"{self.name}/{self.version}"


@dataclass(frozen=True)
class ImageCatalog:
    """Every image a snapshot can serve (rules above)."""

    unmanaged: Mapping[str, ImageConfig]
    versions: Mapping[str, Mapping[str, ImageConfig]]  # managed: name -> version -> files
    promoted: Mapping[str, str]  # managed name -> promoted version
    pool_pointers: Mapping[tuple[str, str], str]  # (name, pool) -> version, set by rollouts
    digests: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    remote: frozenset[tuple[str, str]] = frozenset()  # (name, version): rule 4

    @classmethod
    def of(cls, unmanaged: Mapping[str, ImageConfig]) -> ImageCatalog:
        return cls(unmanaged, {}, {}, {})

    def version_for(self, name: str, pool: str | None) -> str | None:
        """The version `NAME` means for a node of `pool` now."""
        if pool is not None and (name, pool) in self.pool_pointers:
            return self.pool_pointers[(name, pool)]
        return self.promoted.get(name)

    def resolve(self, ref: str | None, pool: str | None) -> BootImage | None:
        """What a node with `image: ref` in `pool` boots now; None if that is nothing."""
        if ref is None:
            return None
        name, version = split_ref(ref)
        files = self.unmanaged.get(name)
        if files is not None:
            return BootImage(name, None, files) if version is None else None
        if version is None:
            version = self.version_for(name, pool)
        if version is None:
            return None
        files = self.versions.get(name, {}).get(version)
        if files is None:
            return None
        return BootImage(name, version, files, self.digests.get((name, version), {}),
                         (name, version) in self.remote)

    def desired_ref(self, ref: str | None, pool: str | None) -> str | None:
        image = self.resolve(ref, pool)
        return image.ref if image is not None else None

    def files(self, name: str, version: str | None) -> ImageConfig | None:
        """An image's files as its URLs name them (any stored version: rule 2; not a
        remote one, rule 4)."""
        if version is None:
            return self.unmanaged.get(name)
        if (name, version) in self.remote:
            return None
        return self.versions.get(name, {}).get(version)

    def all_files(self) -> list[ImageConfig]:
        """The files this member serves (not those of remote versions: rule 4)."""
        return [*self.unmanaged.values(),
                *(files for name, versions in self.versions.items()
                  for version, files in versions.items() if (name, version) not in self.remote)]
