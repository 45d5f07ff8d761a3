"""Read tar archives member by member, without extracting, refusing unsafe members.

Every member is checked before anything is read: absolute paths, ``..`` components,
links that point outside the archive, and device/FIFO files make the whole archive be
rejected with a :class:`DataError` naming the archive and the member.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


_IN_MEMORY = re.compile(r"<_?io\.\w+ object at 0x[0-9a-fA-F]+>")


def error_text(e: BaseException, name: str = "the file") -> str:
    """``str(e)`` without the ``<_io.BytesIO object at 0x...>`` a reader given bytes puts in its message
    (the caller's message names the real file: a path, or archive + member)."""
    return _IN_MEMORY.sub(name, str(e)) or type(e).__name__


def is_tar_name(path: str | Path) -> bool:
    return str(path).lower().endswith(TAR_SUFFIXES)


@dataclass(frozen=True)
class Member:
    """One archive member: ``kind`` is "file", "dir" or "link"; ``data`` is set for wanted files."""

    name: str
    kind: str
    data: bytes | None = None
    link_target: str | None = None


def _unsafe(archive: Path, name: str, why: str) -> DataError:
    return DataError(
        f"Unsafe archive {archive}: member '{name}' {why}. Refusing to read this archive; "
        "members must be regular files or folders with relative paths inside the archive."
    )


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":")


def check_member(archive: Path, member: tarfile.TarInfo) -> str:
    """Validate one member; return its normalised name (no leading ``./``)."""
    raw = member.name
    if _is_absolute(raw):
        raise _unsafe(archive, raw, "has an absolute path")
    parts = raw.replace("\\", "/").split("/")
    if ".." in parts:
        raise _unsafe(archive, raw, "has a '..' path component")
    name = posixpath.normpath(raw.replace("\\", "/"))
    if member.issym() or member.islnk():
        target = member.linkname
        if _is_absolute(target):
            raise _unsafe(archive, raw, f"is a link to the absolute path '{target}'")
        # Symlinks resolve relative to their own folder, hard links relative to the archive root.
        base = posixpath.dirname(name) if member.issym() else ""
        resolved = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
        if resolved == ".." or resolved.startswith("../"):
            raise _unsafe(archive, raw, f"is a link pointing outside the archive ('{target}')")
    elif not (member.isfile() or member.isdir()):
        raise _unsafe(archive, raw, "is a device, FIFO or other special file")
    return name


def link_target(member: tarfile.TarInfo, name: str) -> str:
    base = posixpath.dirname(name) if member.issym() else ""
    return posixpath.normpath(posixpath.join(base, member.linkname.replace("\\", "/")))


def iter_tar(archive: str | Path, want: Callable[[str], bool] = lambda name: True) -> Iterator[Member]:
    """Stream the members of ``archive`` in order; read the bytes of files for which ``want(name)``.

    Works for plain, gzip, bzip2 and xz tars. Corruption and truncation become a DataError.
    """
    archive = Path(archive)
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for info in tf:
                name = check_member(archive, info)
                if info.isdir():
                    yield Member(name, "dir")
                elif info.issym() or info.islnk():
                    yield Member(name, "link", link_target=link_target(info, name))
                elif want(name):
                    f = tf.extractfile(info)
                    data = f.read() if f is not None else b""
                    if len(data) != info.size:
                        raise DataError(
                            f"Archive {archive}: member '{name}' should hold {info.size} bytes but only "
                            f"{len(data)} could be read; the archive is truncated or corrupted."
                        )
                    yield Member(name, "file", data)
                else:
                    yield Member(name, "file")
    except FileNotFoundError:
        raise DataError(f"Archive {archive} does not exist.") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise DataError(
            f"Cannot read archive {archive}: it is truncated or corrupted, or not a tar archive ({e}). "
            "Delete it and download or copy it again."
        ) from None
