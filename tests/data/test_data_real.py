"""Real data from MOELAB_DATA_DIR (CI: shared/datasets). Skipped when it is not set."""

from __future__ import annotations

import time

import numpy as np
import pytest

from moelab.data import check_datasets, load_dataset

MNIST_TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def real_env(real_data_dir, real_cache_dir, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(real_cache_dir))
    return real_data_dir


def _need(path):
    if not path.exists():
        pytest.skip(f"real-data test: {path} is not there")


def test_mnist(real_env):
    _need(real_env / "mnist")
    ds = load_dataset("mnist", real_env, download=False)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_y).tolist() == MNIST_TRAIN_HISTOGRAM
    assert np.bincount(ds.test_y).tolist() == MNIST_TEST_HISTOGRAM
    assert ds.train_x.max() == 255 and abs(ds.train_x.mean() / 255 - 0.1307) < 1e-3


def test_mnist_download_from_file_mirror_with_canonical_checksums(real_env, tmp_path):
    """The shared copies are recompressed: accepted through the canonical uncompressed-content MD5."""
    _need(real_env / "mnist")
    ds = load_dataset("mnist", tmp_path / "fresh", mirrors=[(real_env / "mnist").as_uri()], cache=False)
    assert len(ds.train_x) == 60000 and (tmp_path / "fresh" / "mnist" / "train-images-idx3-ubyte.gz").is_file()


@pytest.mark.slow
def test_cifar10(real_env):
    _need(real_env)
    ds = load_dataset("cifar10", real_env, download=False)
    assert ds.train_x.shape == (50000, 32, 32, 3) and ds.test_x.shape == (10000, 32, 32, 3)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(ds.train_y).tolist() == [5000] * 10 and np.bincount(ds.test_y).tolist() == [1000] * 10
    mean = ds.train_x.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, [0.491, 0.482, 0.447], atol=0.002)

    timings = []
    for _ in range(3):  # best of three: the machine may be busy with other work
        start = time.perf_counter()
        again = load_dataset("cifar10", real_env, download=False)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, f"cached CIFAR-10 loads took {timings} s"
    assert again.checksum == ds.checksum and np.array_equal(again.test_x, ds.test_x)


def test_check_mnist(real_env):
    _need(real_env / "mnist")
    (row,) = check_datasets(real_env, names=["mnist"])
    assert row["status"] == "OK" and (row["train"], row["test"], row["image_shape"]) == (60000, 10000, (28, 28, 1))
    assert row["checksum_ok"] is True and "canonical content MD5 (4 files)" in row["checksum_note"]
