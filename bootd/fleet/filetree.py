"""Which bytes a TFTP file name means: inside the root only, read on demand.

A leading "/" is relative to the root (GRUB sends one; tftpd-hpa --secure and dnsmasq do
the same); "\\" is read as "/" (Windows-style clients). A ".." component, a control
character, or a symlink that resolves outside the root is an access violation.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from bootd.tftp.protocol import BytesSource, ErrorCode, Source, TftpError, netascii

MAX_NAME = 255
NETASCII_LIMIT = 16 << 20  # netascii is converted in memory; boot files use octet

# name, client address -> rendered content, or None when the name is not dynamic
DynamicFiles = Callable[[str, IPv4Address], bytes | None]


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


def normalize_name(name: str) -> str:
    """The root-relative path for a requested name, or TftpError(ACCESS_VIOLATION)."""
    if not name:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "empty file name")
    if len(name) > MAX_NAME:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "file name too long")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "control character in file name")
    parts = []
    for part in name.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise TftpError(ErrorCode.ACCESS_VIOLATION, "'..' in file name")
        parts.append(part)
    if not parts:
        raise TftpError(ErrorCode.ACCESS_VIOLATION, "file name names the root")
    return "/".join(parts)


class FileResolver:
    def __init__(self, root: Path, fallback_dirs: list[Path] | tuple[Path, ...] = (),
                 dynamic: DynamicFiles | None = None) -> None:
        self.set_dirs(root, fallback_dirs)
        self.dynamic = dynamic

    def set_dirs(self, root: Path, fallback_dirs: list[Path] | tuple[Path, ...]) -> None:
        self.root = Path(os.path.realpath(root))
        self.fallback_dirs = [Path(os.path.realpath(d)) for d in fallback_dirs]

    def open(self, name: str, client: IPv4Address, mode: str = "octet") -> Source:
        """A Source for the request, or TftpError with the code the client should see."""
        rel = normalize_name(name)
        source: Source | None = self._open_file(self.root, rel)
        if source is None and self.dynamic is not None:
            content = self.dynamic(rel, client)
            if content is not None:
                source = BytesSource(content)
        if source is None and "/" not in rel:
            for directory in self.fallback_dirs:
                source = self._open_file(directory, rel)
                if source is not None:
                    break
        if source is None:
            raise TftpError(ErrorCode.FILE_NOT_FOUND, f"{rel}: file not found")
        if mode == "netascii":
            return self._netascii(source)
        return source

    @staticmethod
    def _netascii(source: Source) -> Source:
        try:
            if source.size > NETASCII_LIMIT:
                raise TftpError(ErrorCode.ACCESS_VIOLATION,
                                "netascii transfers are limited to 16 MiB; use octet")
            return BytesSource(netascii(source.read(0, source.size)))
        finally:
            if isinstance(source, FileSource):
                source.close()

    @staticmethod
    def _open_file(directory: Path, rel: str) -> FileSource | None:
        """Open directory/rel if it is a regular file that resolves inside directory."""
        path = directory / rel
        real = os.path.realpath(path)
        if real != str(directory) and not real.startswith(str(directory) + os.sep):
            if os.path.lexists(path):
                raise TftpError(ErrorCode.ACCESS_VIOLATION, f"{rel}: leaves the TFTP root")
            return None
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except PermissionError:
            raise TftpError(ErrorCode.ACCESS_VIOLATION, f"{rel}: permission denied") from None
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise TftpError(ErrorCode.FILE_NOT_FOUND, f"{rel}: is a directory")
            raise TftpError(ErrorCode.ACCESS_VIOLATION, f"{rel}: not a regular file")
        return FileSource(fd, st.st_size)
