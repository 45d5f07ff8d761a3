"""The canonical CIFAR-10 python format: ``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/``.

The batches are pickles. Unpickling runs code named by the file, so only the few globals a
numpy array needs are allowed; everything else is refused. Only the known member names are read.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from moelab.data.archive import error_text, iter_tar
from moelab.errors import DataError

ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
MEMBERS = [*TRAIN_BATCHES, TEST_BATCH, META]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ROW_BYTES = 3 * 32 * 32

try:  # numpy >= 2 keeps it in numpy._core; old pickles name numpy.core (same function)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"it references '{module}.{name}'") from None


def unpickle_batch(data: bytes, where: str) -> dict:
    """Unpickle one batch (dicts, lists, bytes and numpy arrays only); keys become str."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _ForbiddenGlobal as e:
        raise DataError(
            f"{where}: refusing to unpickle it: {e}, which is not allowed; a CIFAR-10 batch may only hold "
            "dicts, lists, bytes and numpy arrays."
        ) from None
    except Exception as e:  # truncated/garbled pickles raise many types
        raise DataError(f"{where}: cannot unpickle it, the file is truncated or corrupted "
                        f"({type(e).__name__}: {error_text(e)}).") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a pickled dict, found {type(obj).__name__}.")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _batch_arrays(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{where}: expected keys 'data' and 'labels', found {sorted(batch)}.")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be a uint8 array of shape (N, {ROW_BYTES}), found {found}.")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'labels' must be a list of integers.") from None
    if y.shape != (len(data),):
        raise DataError(f"{where}: {len(data)} images but {y.size} labels; the counts must match.")
    if y.size and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise DataError(f"{where}: labels must be 0..{len(CLASSES) - 1}, found {int(y.min())}..{int(y.max())}.")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), y


def _read_members(path: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Raw bytes of the known members, and a 'where' label for each (for messages)."""
    raw: dict[str, bytes] = {}
    where: dict[str, str] = {}
    if path.is_dir():
        for m in MEMBERS:
            f = path / m
            if f.is_file():
                raw[m] = f.read_bytes()
                where[m] = str(f)
        missing = [m for m in MEMBERS if m not in raw]
        if missing:
            raise DataError(
                f"CIFAR-10 batch folder {path} is incomplete: missing {', '.join(missing)} "
                f"(expected {', '.join(MEMBERS)})."
            )
        return raw, where

    def want(name: str) -> bool:
        folder, _, base = name.rpartition("/")
        return base in MEMBERS and folder in (BATCH_DIR, "")

    for member in iter_tar(path, want):
        if member.data is not None:
            base = member.name.rpartition("/")[2]
            raw[base] = member.data
            where[base] = f"Archive {path}, member '{member.name}'"
    missing = [m for m in MEMBERS if m not in raw]
    if missing:
        raise DataError(
            f"Archive {path} is not a complete CIFAR-10 python archive: missing members "
            f"{', '.join(f'{BATCH_DIR}/{m}' for m in missing)}."
        )
    return raw, where


def read_cifar10_python(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, train_x, train_y, test_x, test_y) from the archive or the extracted folder."""
    raw, where = _read_members(path)
    meta = unpickle_batch(raw[META], where[META])
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != len(CLASSES):
        raise DataError(f"{where[META]}: expected 'label_names' with {len(CLASSES)} names, found {names!r:.200}.")
    classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    train = [_batch_arrays(unpickle_batch(raw[m], where[m]), where[m]) for m in TRAIN_BATCHES]
    test_x, test_y = _batch_arrays(unpickle_batch(raw[TEST_BATCH], where[TEST_BATCH]), where[TEST_BATCH])
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return classes, train_x, train_y, test_x, test_y
