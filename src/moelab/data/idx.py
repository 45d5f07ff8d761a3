"""IDX files (the MNIST / Fashion-MNIST format), raw or gzipped.

Header: two zero bytes, a type code (0x08 = unsigned byte; the only one these data sets use),
the number of dimensions, then one big-endian int32 per dimension, then the payload.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from moelab.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08


def read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, decompressed if they are gzip (detected by content, not by name)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"Cannot read {path}: {e.strerror or e}.") from None
    if data[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(
                f"Cannot decompress {path}: the gzip data is truncated or corrupted ({e}). "
                "Delete the file and download or copy it again."
            ) from None
    if path.name.endswith(".gz"):
        raise DataError(
            f"{path} is named .gz but is not gzip data (it starts with bytes {data[:4].hex(' ') or 'nothing'}); "
            "expected a gzip-compressed IDX file. The file is corrupted or mislabelled."
        )
    return data


def parse_idx(data: bytes, source: Path, ndim: int) -> np.ndarray:
    """Decode IDX bytes holding an unsigned-byte array with ``ndim`` dimensions."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{source} is not an IDX file: expected the magic bytes 00 00 08 {ndim:02x}, "
            f"found {data[:4].hex(' ') or 'an empty file'}."
        )
    if data[2] != UBYTE or data[3] != ndim:
        raise DataError(
            f"{source}: unexpected IDX header: expected type 0x08 (unsigned byte) with {ndim} dimension(s) "
            f"(magic 00 00 08 {ndim:02x}), found type 0x{data[2]:02x} with {data[3]} dimension(s)."
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header is truncated: expected {header} header bytes, found {len(data)}.")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)
    found = len(data) - header
    if found != expected:
        shape = " x ".join(map(str, dims))
        raise DataError(
            f"{source}: the IDX header says {shape} = {expected} bytes of data, but the file holds {found} "
            f"bytes after the {header}-byte header; it is truncated or corrupted."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx(path: Path, ndim: int) -> np.ndarray:
    return parse_idx(read_maybe_gzip(path), path, ndim)


def read_idx_pair(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 (N, H, W, 1) and labels as int64 (N,), checked against each other."""
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "an image file and its label file must have the same count."
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"{labels_path}: labels must be 0..{num_classes - 1}, found {int(labels.max())}."
        )
    return images[..., None], labels.astype(np.int64)
