"""Names, folders, the embedded digits set, and the public API surface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import moelab.data as data
from moelab.data import DATASET_NAMES, ImageDataset, as_tensors, load_dataset, resolve_data_dir
from moelab.errors import DataError, MoelabError


def test_public_api():
    for name in ("load_dataset", "ImageDataset", "DATASET_NAMES", "resolve_data_dir", "check_datasets",
                 "format_check_report", "load_image_folder", "as_tensors"):
        assert hasattr(data, name)
    assert DATASET_NAMES == ("mnist", "fashion-mnist", "cifar10", "digits")


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match=r"Unknown data set 'imagenet'; valid names are: mnist, fashion-mnist, "
                                        r"cifar10, digits\."):
        load_dataset("imagenet")
    assert issubclass(DataError, MoelabError)


def test_aliases(tmp_path, build):
    build.write_idx_set(tmp_path / "fashion-mnist")
    assert load_dataset("Fashion_MNIST", tmp_path, download=False).name == "fashion-mnist"


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    assert resolve_data_dir() == tmp_path / "cache"  # MOELAB_CACHE_DIR, set by the fixture
    monkeypatch.setenv("MOELAB_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("MOELAB_DATA_DIR")
    monkeypatch.delenv("MOELAB_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir() == tmp_path / "home" / ".cache" / "moelab"


def test_digits_split():
    ds = load_dataset("digits")
    again = load_dataset("digits", download=False)
    assert ds.train_x.shape == (1437, 8, 8, 1) and ds.test_x.shape == (360, 8, 8, 1)
    assert ds.train_x.dtype == np.uint8 and ds.train_x.max() == 255 and ds.train_y.dtype == np.int64
    assert np.array_equal(ds.test_x, again.test_x) and ds.checksum == again.checksum
    counts = np.bincount(ds.test_y)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each digit
    assert "load_digits" in ds.source and ds.classes == [str(i) for i in range(10)]


def test_image_dataset_validates_and_tensors():
    x = np.zeros((4, 2, 3, 1), np.uint8)
    y = np.arange(4, dtype=np.int64)
    ds = ImageDataset("toy", ["a"], x, y, x[:2], y[:2], source="here", checksum="0" * 64)
    assert ds.image_shape == (2, 3, 1) and ds.num_classes == 1 and "train=4" in repr(ds)
    tx, ty = as_tensors(ds, "test")
    assert tx.shape == (2, 1, 2, 3) and tx.dtype == torch.float32 and ty.dtype == torch.int64
    with pytest.raises(ValueError):
        ImageDataset("bad", ["a"], x.astype(np.float32), y, x, y)


def test_search_order_prefers_subfolder(tmp_path, build):
    build.write_idx_set(tmp_path, n_train=11)
    build.write_idx_set(tmp_path / "mnist", n_train=13)
    assert len(load_dataset("mnist", tmp_path, download=False).train_x) == 13
    assert isinstance(resolve_data_dir(str(tmp_path)), Path)


def test_mnist_files_are_not_loaded_as_fashion_mnist(real_data_dir, tmp_path):
    """A data folder is also searched flat, and both data sets use the same file names: MNIST's files must
    not pass for Fashion-MNIST (found by the training labels' content)."""
    from moelab.data import load_dataset
    from moelab.errors import DataError

    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: these are the mnist files, not fashion-mnist's"):
        load_dataset("fashion-mnist", data_dir=real_data_dir / "mnist", download=False)
    assert load_dataset("mnist", data_dir=real_data_dir / "mnist", download=False).num_classes == 10
