"""The in-memory data set every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(eq=False)
class ImageDataset:
    """A classification data set with a train and a test split.

    ``*_x`` are uint8 arrays (N, H, W, C) with C = 1 (grayscale) or 3 (RGB); ``*_y`` are int64 (N,).
    ``source`` says which file(s) it was read from; ``checksum`` is the SHA-256 key of the source
    content (a single file's own SHA-256, or the SHA-256 of a ``sha256sum``-style listing).
    """

    name: str
    classes: list[str]
    train_x: np.ndarray = field(repr=False)
    train_y: np.ndarray = field(repr=False)
    test_x: np.ndarray = field(repr=False)
    test_y: np.ndarray = field(repr=False)
    source: str = ""
    checksum: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(f"{self.name}: {split}_x must be uint8 (N, H, W, 1|3), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{self.name}: {split}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)}, "
            f"image={h}x{w}x{c}, classes={len(self.classes)}, source={self.source!r})"
        )


def as_tensors(ds: ImageDataset, split: str = "train", device: str | torch.device | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 NCHW images in [0, 1], int64 labels) of one split."""
    from moelab.data.transforms import to_float

    x, y = ds.split(split)
    return to_float(x).to(device), torch.from_numpy(y).to(device)
