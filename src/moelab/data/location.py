"""Where data sets are looked for, and where caches and fallback downloads go.

Data folder: explicit argument > ``MOELAB_DATA_DIR`` > the per-user cache folder.
Cache folder: ``MOELAB_CACHE_DIR`` > ``~/.cache/moelab``. Caches never go into the data
folder, which may be read-only (a shared copy).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

DATA_DIR_ENV = "MOELAB_DATA_DIR"
CACHE_DIR_ENV = "MOELAB_CACHE_DIR"


def cache_dir() -> Path:
    """The per-user cache folder (decoded arrays, checksum memo, downloads of last resort)."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return (Path.home() / ".cache" / "moelab").absolute()


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$MOELAB_DATA_DIR``, else the cache folder."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser().absolute()
    return cache_dir()


def search_dirs(folder_name: str, data_dir: Path) -> list[Path]:
    """Folders that may hold data set ``folder_name``, most specific first, without duplicates."""
    candidates = [data_dir / folder_name, data_dir, cache_dir() / folder_name]
    out: list[Path] = []
    for c in candidates:
        if c not in out:
            out.append(c)
    return out


def is_writable_dir(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (creating it if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False
