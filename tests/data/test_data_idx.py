"""MNIST / Fashion-MNIST IDX files: good files (gz and raw) and every kind of bad one."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from moelab.data import load_dataset
from moelab.errors import DataError


@pytest.mark.parametrize("gz", [True, False])
def test_idx_pair_loads(tmp_path, build, gz):
    arrays = build.write_idx_set(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.name == "mnist" and ds.classes == [str(i) for i in range(10)]
    assert ds.train_x.shape == (20, 28, 28, 1) and ds.train_x.dtype == np.uint8
    assert ds.test_x.shape == (10, 28, 28, 1)
    assert ds.train_y.dtype == np.int64 and ds.test_y.dtype == np.int64
    np.testing.assert_array_equal(ds.train_x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert str(tmp_path / "mnist") in ds.source and "train-images-idx3-ubyte" in ds.source
    assert len(ds.checksum) == 64


def test_idx_files_directly_in_data_dir(tmp_path, build):
    build.write_idx_set(tmp_path, gz=False)
    assert len(load_dataset("mnist", tmp_path, download=False).train_x) == 20


def test_fashion_mnist_folder_and_classes(tmp_path, build):
    build.write_idx_set(tmp_path / "fashion-mnist", n_train=12)
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert len(ds.train_x) == 12 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_data_dir_from_env(tmp_path, build, monkeypatch):
    build.write_idx_set(tmp_path / "mnist")
    monkeypatch.setenv("MOELAB_DATA_DIR", str(tmp_path))
    assert len(load_dataset("mnist", download=False).test_x) == 10


def _corrupt(tmp_path, build, stem: str, data: bytes, gz: bool = True):
    build.write_idx_set(tmp_path / "mnist", gz=gz)
    path = tmp_path / "mnist" / (stem + (".gz" if gz else ""))
    path.write_bytes(data)
    return path


def test_truncated_gzip(tmp_path, build):
    whole = gzip.compress(build.idx_bytes(np.zeros((20, 28, 28), np.uint8)))
    _corrupt(tmp_path, build, "train-images-idx3-ubyte", whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"Cannot decompress .*train-images-idx3-ubyte\.gz: the gzip data is truncated"):
        load_dataset("mnist", tmp_path, download=False)


def test_gz_name_but_not_gzip(tmp_path, build):
    _corrupt(tmp_path, build, "train-labels-idx1-ubyte", b"hello world")
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is named \.gz but is not gzip data"):
        load_dataset("mnist", tmp_path, download=False)


def test_wrong_magic(tmp_path, build):
    _corrupt(tmp_path, build, "t10k-images-idx3-ubyte", b"PK\x03\x04" + bytes(100), gz=False)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is not an IDX file: expected the magic bytes "
                                        r"00 00 08 03, found 50 4b 03 04"):
        load_dataset("mnist", tmp_path, download=False)


def test_wrong_dimensions(tmp_path, build):
    # a label file where an image file belongs
    _corrupt(tmp_path, build, "train-images-idx3-ubyte", build.idx_bytes(np.zeros(20, np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"unexpected IDX header: expected type 0x08 \(unsigned byte\) with 3 "
                                        r"dimension\(s\).*found type 0x08 with 1 dimension"):
        load_dataset("mnist", tmp_path, download=False)


def test_header_dims_do_not_match_payload(tmp_path, build):
    data = build.idx_bytes(np.zeros((20, 28, 28), np.uint8))[:-100]
    _corrupt(tmp_path, build, "train-images-idx3-ubyte", data, gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: the IDX header says 20 x 28 x 28 = 15680 bytes "
                                        r"of data, but the file holds 15580 bytes"):
        load_dataset("mnist", tmp_path, download=False)


def test_image_count_differs_from_label_count(tmp_path, build):
    _corrupt(tmp_path, build, "train-labels-idx1-ubyte", build.idx_bytes(np.zeros(19, np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte holds 20 images but .*train-labels-idx1-ubyte "
                                        r"holds 19 labels"):
        load_dataset("mnist", tmp_path, download=False)


def test_label_out_of_range(tmp_path, build):
    _corrupt(tmp_path, build, "t10k-labels-idx1-ubyte", build.idx_bytes(np.full(10, 12, np.uint8)), gz=False)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: labels must be 0\.\.9, found 12"):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_files_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path, download=False)
    msg = str(err.value)
    assert f"Looked in: {tmp_path / 'mnist'}, {tmp_path}, {tmp_path / 'cache' / 'mnist'}" in msg
    assert "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, " \
           "t10k-labels-idx1-ubyte.gz" in msg
    assert f"into {tmp_path / 'mnist'}/" in msg
    assert "Automatic download is off" in msg


def test_partial_set_is_reported(tmp_path, build):
    build.write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"mnist holds only .*t10k-images-idx3-ubyte\.gz \(missing "
                                        r"t10k-labels-idx1-ubyte\)"):
        load_dataset("mnist", tmp_path, download=False)
