"""Atomic file writes: write to a temp file in the same folder, fsync, then rename.

A reader (or a process killed mid-write) never sees a half-written file. A write that fails on the
disk (full, read-only, permission, a path through a file) raises an ``OSError`` that names the file
the caller asked for, never the temp file, so ``moelab.cli`` can say in one line what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, on error delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except FileExistsError as e:  # a parent on the way is a file: say so, as open() would
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), e.filename) from None
    except OSError as e:
        named = _named(e, path)
        if named is e:
            raise
        raise named from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        err = os_error_of(e)
        named = _named(err, path) if err is not None else e
        if named is e:
            raise
        raise named from e


_OS_ERROR_CODE = re.compile(r"os error (\d+)|code: (\d+)")


def os_error_of(exc: BaseException) -> OSError | None:
    """``exc`` as an OSError: itself, or the one a safetensors ``SafetensorError`` wraps in its text
    ("... No space left on device (os error 28) ..."); None for anything else."""
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError":
        m = _OS_ERROR_CODE.search(str(exc))
        if m:
            code = int(m.group(1) or m.group(2))
            return OSError(code, os.strerror(code))
    return None


# Errors of the disk under a write (not of a network or a pipe the caller reads from).
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG,
                errno.EISDIR, errno.ENOTDIR}


def _named(e: OSError, path: Path) -> OSError:
    """``e`` naming ``path`` when it named only a temp file of ours (its creation, its rename onto a
    folder) or, for a disk error, nothing (a failed write); else ``e`` itself (it names a parent folder,
    or it is the caller's own error, e.g. a network one during a download)."""
    if e.filename is None:
        ours = e.errno in _DISK_ERRNOS
    else:
        name = os.path.basename(str(e.filename))
        ours = name.startswith(f".{path.name}.") and name.endswith(".tmp")
    if not ours:
        return e
    return OSError(e.errno, e.strerror or (os.strerror(e.errno) if e.errno else str(e)), str(path))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
