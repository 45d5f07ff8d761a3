"""Fixtures for the data tests: an isolated cache folder, and builders for small data files."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Captured before the autouse fixture clears it: the real-data tests use it.
REAL_DATA_DIR = os.environ.get("MOELAB_DATA_DIR")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no data dir or mirrors from the environment."""
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOELAB_DATA_DIR", raising=False)
    monkeypatch.delenv("MOELAB_MIRRORS", raising=False)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA_DIR:
        pytest.skip("real-data test: MOELAB_DATA_DIR is not set (CI points it at shared/datasets)")
    path = Path(REAL_DATA_DIR)
    if not path.is_dir():
        pytest.skip(f"real-data test: MOELAB_DATA_DIR={path} is not a folder")
    return path


@pytest.fixture(scope="session")
def real_cache_dir(tmp_path_factory) -> Path:
    """One cache for all real-data tests, so CIFAR-10's JPEGs are decoded once per session."""
    return tmp_path_factory.mktemp("real-cache")


# ------------------------------------------------------------------ builders


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.tobytes()


def write_file(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_idx_set(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """Four small MNIST-style IDX files; returns the arrays they hold."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        write_file(folder / (stem + (".gz" if gz else "")), idx_bytes(arr), gz=gz)
    return arrays


def cifar_pickle(obj: dict, canonical_names: bool = True) -> bytes:
    """A pickle like the canonical batches: bytes keys, and (optionally) the numpy 1.x module name."""
    data = pickle.dumps(obj, protocol=3)
    if canonical_names:
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_members(n: int = 3, seed: int = 0, canonical_names: bool = True) -> tuple[dict[str, bytes], dict]:
    """Member name -> bytes of a tiny CIFAR-10 python set (n images per batch), and the expected NHWC arrays."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    xs, ys = {}, {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        nhwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        rows = nhwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # R plane, G plane, B plane
        members[f"cifar-10-batches-py/{batch}"] = cifar_pickle(
            {b"batch_label": batch.encode(), b"labels": labels, b"data": rows,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]}, canonical_names)
        xs[batch], ys[batch] = nhwc, labels
    members["cifar-10-batches-py/batches.meta"] = cifar_pickle(
        {b"num_cases_per_batch": n, b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072},
        canonical_names)
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    expected = {
        "train_x": np.concatenate([xs[f"data_batch_{i}"] for i in range(1, 6)]),
        "train_y": np.concatenate([ys[f"data_batch_{i}"] for i in range(1, 6)]).astype(np.int64),
        "test_x": xs["test_batch"], "test_y": np.asarray(ys["test_batch"], dtype=np.int64),
    }
    return members, expected


def make_tar(archive: Path, entries: list[tuple]) -> Path:
    """Entries: (name, bytes) for files, (name, None) for folders, (name, "symlink"|"hardlink", target),
    (name, "chr") for a character device."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tf:
        for entry in entries:
            name, payload = entry[0], entry[1]
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif payload in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if payload == "symlink" else tarfile.LNKTYPE
                info.linkname = entry[2]
                tf.addfile(info)
            elif payload == "chr":
                info.type = tarfile.CHRTYPE
                tf.addfile(info)
            else:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return archive


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_folder_entries(classes=("cat", "dog", "emu"), n_train: int = 3, n_test: int = 2, size=(6, 5),
                         rgb: bool = True, seed: int = 0, prefix: str = "") -> tuple[list[tuple], dict]:
    """Tar-style entries of a PNG image folder, and the expected arrays (classes sorted)."""
    rng = np.random.default_rng(seed)
    entries: list[tuple] = []
    expected: dict = {"classes": sorted(classes)}
    for split, n in (("train", n_train), ("test", n_test)):
        xs, ys = [], []
        for ci, cls in enumerate(sorted(classes)):
            entries.append((f"{prefix}{split}/{cls}", None))
            for i in range(n):
                shape = (*size, 3) if rgb else size
                img = rng.integers(0, 256, shape, dtype=np.uint8)
                entries.append((f"{prefix}{split}/{cls}/{i:04d}.png", png_bytes(img)))
                xs.append(img if rgb else img[..., None])
                ys.append(ci)
        expected[f"{split}_x"] = np.stack(xs)
        expected[f"{split}_y"] = np.asarray(ys, dtype=np.int64)
    return entries, expected


def write_entries_as_dir(root: Path, entries: list[tuple]) -> Path:
    for entry in entries:
        path = root / entry[0]
        if entry[1] is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            write_file(path, entry[1])
    return root


class Builders:
    idx_bytes = staticmethod(idx_bytes)
    write_file = staticmethod(write_file)
    write_idx_set = staticmethod(write_idx_set)
    cifar_pickle = staticmethod(cifar_pickle)
    cifar_members = staticmethod(cifar_members)
    make_tar = staticmethod(make_tar)
    png_bytes = staticmethod(png_bytes)
    jpeg_bytes = staticmethod(jpeg_bytes)
    image_folder_entries = staticmethod(image_folder_entries)
    write_entries_as_dir = staticmethod(write_entries_as_dir)


@pytest.fixture
def build() -> Builders:
    return Builders()
