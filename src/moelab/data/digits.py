"""scikit-learn's bundled 8x8 digits: the embedded data set that needs no download."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from moelab.data.dataset import ImageDataset
from moelab.data.transforms import train_val_split

TEST_SIZE = 360  # of 1797: a 1437 / 360 split, stratified
SPLIT_SEED = 0


def load_digits_dataset() -> ImageDataset:
    """Digits 0..16 scaled to uint8 0..255, (N, 8, 8, 1), with a fixed stratified train/test split."""
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = digits.target.astype(np.int64)
    train_idx, test_idx = train_val_split(y, TEST_SIZE, seed=SPLIT_SEED, stratified=True)
    checksum = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    csv = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    source = f"sklearn.datasets.load_digits ({csv})" if csv.exists() else "sklearn.datasets.load_digits"
    return ImageDataset(
        name="digits", classes=[str(i) for i in range(10)],
        train_x=x[train_idx], train_y=y[train_idx], test_x=x[test_idx], test_y=y[test_idx],
        source=source, checksum=checksum,
    )
