"""Source checksums (memoised) and the decoded-array cache.

Decoding 60000 JPEGs takes many seconds; loading the same arrays back from ``.npy`` files
takes a fraction of one. Cache entries live in ``<cache>/decoded/<name>-<checksum>-v<N>/`` and
are keyed by the SHA-256 of the source content, so a changed source never hits a stale entry.
Hashing the source on every load would cost time too, so file hashes are memoised on
(absolute path, size, mtime_ns) in ``<cache>/source-checksums.json``.

Each entry has a ``manifest.json`` (written last) recording every array's shape, dtype and
CRC-32; an entry that does not match it is logged and rebuilt from the source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from moelab.data.dataset import ImageDataset
from moelab.data.location import cache_dir
from moelab.io import atomic_path, atomic_write_json

FORMAT_VERSION = 2
ARRAYS = ("train_x", "train_y", "test_x", "test_y")
MEMO_NAME = "source-checksums.json"
log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_unwritable(what: str, path: Path, e: OSError) -> None:
    """One warning per cache folder and process: a read-only or full cache costs speed, not results."""
    key = str(cache_dir())
    if key in _warned:
        return
    _warned.add(key)
    reason = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    log.warning("cannot write the %s %s (%s); data sets still load, only without the cache: point %s at a "
                "writable folder to keep it", what, path, reason, "MOELAB_CACHE_DIR")

Decoded = tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Memo:
    """``{key: {"stamp": ..., "sha256": ...}}`` stored as JSON; a damaged memo is just ignored."""

    def __init__(self) -> None:
        self.path = cache_dir() / MEMO_NAME
        try:
            self.data = json.loads(self.path.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}
        self.dirty = False

    def get(self, key: str, stamp: str) -> str | None:
        entry = self.data.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        return None

    def put(self, key: str, stamp: str, sha256: str) -> None:
        self.data[key] = {"stamp": stamp, "sha256": sha256}
        self.dirty = True

    def save(self) -> None:
        if self.dirty:
            try:
                atomic_write_json(self.path, self.data)
            except OSError as e:
                _warn_unwritable("checksum memo", self.path, e)


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _file_sha256(path: Path, memo: _Memo) -> str:
    key = str(path.absolute())
    stamp = _file_stamp(path)
    sha = memo.get(key, stamp)
    if sha is None:
        sha = _hash_file(path)
        memo.put(key, stamp, sha)
    return sha


def _dir_sha256(folder: Path, memo: _Memo) -> str:
    """SHA-256 of a ``sha256sum``-style listing of every file under ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rels = [p.relative_to(folder).as_posix() for p in files]
    stamp = hashlib.sha256("\n".join(f"{r}:{_file_stamp(p)}" for r, p in zip(rels, files)).encode()).hexdigest()
    key = "dir:" + str(folder.absolute())
    sha = memo.get(key, stamp)
    if sha is None:
        listing = "".join(f"{_hash_file(p)}  {r}\n" for r, p in zip(rels, files))
        sha = hashlib.sha256(listing.encode()).hexdigest()
        memo.put(key, stamp, sha)
    return sha


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of one file, memoised on (path, size, mtime_ns)."""
    memo = _Memo()
    try:
        return _file_sha256(Path(path), memo)
    finally:
        memo.save()


def source_checksum(paths: Sequence[Path]) -> str:
    """The SHA-256 key of a source: one file's own SHA-256, else that of a ``sha256sum`` listing."""
    memo = _Memo()
    try:
        if len(paths) == 1:
            p = paths[0]
            return _dir_sha256(p, memo) if p.is_dir() else _file_sha256(p, memo)
        listing = "".join(
            f"{_dir_sha256(p, memo) if p.is_dir() else _file_sha256(p, memo)}  {p.name}\n" for p in paths
        )
        return hashlib.sha256(listing.encode()).hexdigest()
    finally:
        memo.save()


def _array_crc32(a: np.ndarray) -> str:
    """CRC-32 of the array bytes: catches corruption at ~4x the speed of SHA-256 (this is no security check)."""
    return f"{zlib.crc32(memoryview(np.ascontiguousarray(a)).cast('B')):08x}"


def entry_dir(name: str, checksum: str) -> Path:
    return cache_dir() / "decoded" / f"{name}-{checksum[:20]}-v{FORMAT_VERSION}"


def read_entry(folder: Path, name: str, checksum: str) -> tuple[list[str], dict[str, np.ndarray]] | None:
    """The cached (classes, arrays), or None if absent; a damaged entry is logged and treated as absent."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_VERSION or manifest.get("checksum") != checksum \
                or manifest.get("name") != name:
            raise ValueError("manifest does not belong to this source")
        classes = manifest["classes"]
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError("manifest has no class list")
        arrays: dict[str, np.ndarray] = {}
        for key in ARRAYS:
            info = manifest["arrays"][key]
            arr = np.load(folder / f"{key}.npy", allow_pickle=False)
            if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
                raise ValueError(f"{key}.npy is {arr.dtype} {list(arr.shape)}, manifest says "
                                 f"{info['dtype']} {info['shape']}")
            if _array_crc32(arr) != info["crc32"]:
                raise ValueError(f"{key}.npy content does not match its CRC-32 in the manifest")
            arrays[key] = arr
        return classes, arrays
    except Exception as e:  # any damage means: rebuild
        log.warning("decoded-data cache %s is damaged (%s: %s); rebuilding it from the source",
                    folder, type(e).__name__, e)
        return None


def write_entry(folder: Path, name: str, checksum: str, source: str, classes: list[str],
                arrays: dict[str, np.ndarray]) -> None:
    """Write arrays then the manifest, each atomically; failures only cost speed, so they are logged."""
    try:
        (folder / "manifest.json").unlink(missing_ok=True)
        info = {}
        for key in ARRAYS:
            arr = np.ascontiguousarray(arrays[key])
            with atomic_path(folder / f"{key}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
            info[key] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": _array_crc32(arr)}
        atomic_write_json(folder / "manifest.json", {
            "format": FORMAT_VERSION, "name": name, "checksum": checksum, "source": source,
            "classes": classes, "arrays": info,
        })
    except OSError as e:
        _warn_unwritable("decoded-data cache", folder, e)


def load_with_cache(name: str, source_paths: Sequence[Path], source: str, decode: Callable[[], Decoded], *,
                    use_cache: bool = True, refresh: bool = False) -> ImageDataset:
    """Decoded data set from the cache when it matches the source content, else ``decode()`` (and cache it)."""
    checksum = source_checksum(source_paths)
    folder = entry_dir(name, checksum)
    if use_cache and not refresh:
        hit = read_entry(folder, name, checksum)
        if hit is not None:
            classes, arrays = hit
            return ImageDataset(name, classes, **arrays, source=source, checksum=checksum)
    classes, train_x, train_y, test_x, test_y = decode()
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    if use_cache:
        write_entry(folder, name, checksum, source, classes, arrays)
    return ImageDataset(name, list(classes), **arrays, source=source, checksum=checksum)


def clear_cache() -> None:
    """Delete every decoded-data entry (the checksum memo too)."""
    shutil.rmtree(cache_dir() / "decoded", ignore_errors=True)
    (cache_dir() / MEMO_NAME).unlink(missing_ok=True)
