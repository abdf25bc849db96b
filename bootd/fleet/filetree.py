"""The boot file tree: which bytes a requested name means, for TFTP and for HTTP /boot/.

Rules, in the order they are applied:

1. A name is made root-relative: a leading "/" is dropped (GRUB sends one; tftpd-hpa
   --secure and dnsmasq do the same) and "\\" is read as "/" (Windows-style clients).
   A ".." component, a control character, an empty or over-long name is refused.
2. The root (`tftp.root`) is looked at first. It is the operator's tree that clients
   name paths in, so a symlink that resolves outside it is refused.
3. Then files rendered per client (GRUB configs): a real file in the root wins.
4. Then, for plain names only (no "/"), the fallback directories (default Debian's
   /usr/lib/ipxe). They are system directories the operator named, not a tree a client
   navigates: symlinks a package put there are followed wherever they point (Debian's
   /usr/lib/ipxe/ipxe.efi is a link to /boot/ipxe.efi).
5. Only regular files are served; a directory is "not found", anything else refused.

Missing names raise `NotFound`, refused ones `Forbidden`: TFTP turns them into ERROR 1 and
2, HTTP into 404 and 403. Files are read with pread on demand, never copied per client.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

MAX_NAME = 255

# root-relative name, client address, now -> rendered content, or None if not dynamic
DynamicFiles = Callable[[str, IPv4Address, float], bytes | None]


class FileTreeError(Exception):
    """A name that cannot be served; `str()` is a message safe to show the client."""


class NotFound(FileTreeError):
    pass


class Forbidden(FileTreeError):
    pass


class FileSource:
    """A regular file read with pread: no per-client copy, page cache shared by all."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd = fd
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BytesSource:
    """Content rendered in memory (GRUB configs, netascii conversions)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        return None


def normalize_name(name: str) -> str:
    """The root-relative path for a requested name, or Forbidden."""
    if not name:
        raise Forbidden("empty file name")
    if len(name) > MAX_NAME:
        raise Forbidden("file name too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise Forbidden("control character in file name")
    parts = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise Forbidden("'..' in file name")
        parts.append(part)
    if not parts:
        raise Forbidden("file name names the root")
    return "/".join(parts)


class FileTree:
    """Built once per config load; answers `locate` (HTTP) and `open` (TFTP)."""

    def __init__(self, root: Path, fallback_dirs: list[Path] | tuple[Path, ...] = (),
                 dynamic: DynamicFiles | None = None) -> None:
        self.root = Path(os.path.realpath(root))
        self.fallback_dirs = tuple(Path(os.path.realpath(d)) for d in fallback_dirs)
        self.dynamic = dynamic

    def locate(self, name: str, client: IPv4Address, now: float) -> Path | bytes:
        """The real path of the file a name means, or its rendered content."""
        rel = normalize_name(name)
        found = _regular_file(self.root, rel, confined=True)
        if found is not None:
            return found
        if self.dynamic is not None:
            content = self.dynamic(rel, client, now)
            if content is not None:
                return content
        if "/" not in rel:
            for directory in self.fallback_dirs:
                found = _regular_file(directory, rel, confined=False)
                if found is not None:
                    return found
        raise NotFound(f"{rel}: file not found")

    def open(self, name: str, client: IPv4Address, now: float) -> FileSource | BytesSource:
        found = self.locate(name, client, now)
        if isinstance(found, bytes):
            return BytesSource(found)
        try:
            # O_NOFOLLOW: the path is already resolved; a link swapped in since is refused
            fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise NotFound(f"{name}: file not found") from None
        except OSError as exc:
            raise Forbidden(f"{name}: {exc.strerror or 'cannot open'}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise Forbidden(f"{name}: not a regular file")
        return FileSource(fd, st.st_size)


def _regular_file(directory: Path, rel: str, *, confined: bool) -> Path | None:
    """directory/rel resolved, if it is a readable regular file (None if absent).
    `confined`: a path that resolves outside `directory` is refused, not followed."""
    path = directory / rel
    real = os.path.realpath(path)
    inside = real == str(directory) or real.startswith(str(directory) + os.sep)
    if confined and not inside:
        if os.path.lexists(path):
            raise Forbidden(f"{rel}: leaves the TFTP root")
        return None
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        raise NotFound(f"{rel}: is a directory")
    if not stat.S_ISREG(st.st_mode):
        raise Forbidden(f"{rel}: not a regular file")
    if not os.access(real, os.R_OK):
        raise Forbidden(f"{rel}: permission denied")
    return Path(real)
