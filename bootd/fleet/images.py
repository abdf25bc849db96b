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
from dataclasses import dataclass
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


def _sha256_file(path: Path) -> str:
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
            running = asyncio.ensure_future(loop.run_in_executor(None, _sha256_file,
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
