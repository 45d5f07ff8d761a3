"""The canonical CIFAR-10 python format, as an archive and as an extracted folder."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from moelab.data import load_dataset
from moelab.errors import DataError


def _archive(tmp_path, build, members=None, name="cifar-10-python.tar.gz"):
    if members is None:
        members, _ = build.cifar_members()
    return build.make_tar(tmp_path / name, list(members.items()))


@pytest.mark.parametrize("canonical_names", [True, False])
def test_canonical_archive(tmp_path, build, canonical_names):
    members, expected = build.cifar_members(canonical_names=canonical_names)
    _archive(tmp_path, build, members)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.classes == build.cifar_members.__globals__["CIFAR_CLASSES"]
    assert ds.train_x.shape == (15, 32, 32, 3) and ds.test_x.shape == (3, 32, 32, 3)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(ds, key), expected[key])
    assert ds.source == str(tmp_path / "cifar-10-python.tar.gz")


def test_extracted_batch_folder(tmp_path, build):
    members, expected = build.cifar_members()
    for name, data in members.items():
        build.write_file(tmp_path / "cifar10" / name, data)
    ds = load_dataset("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.test_x, expected["test_x"])
    assert ds.source == str(tmp_path / "cifar10" / "cifar-10-batches-py")


def test_canonical_archive_wins_over_image_folder(tmp_path, build):
    entries, _ = build.image_folder_entries(size=(32, 32))
    build.make_tar(tmp_path / "cifar10-jpeg75.tar.gz", entries)
    _archive(tmp_path, build)
    assert load_dataset("cifar10", tmp_path, download=False).source.endswith("cifar-10-python.tar.gz")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_with_code_is_refused(tmp_path, build):
    members, _ = build.cifar_members()
    marker = tmp_path / "pwned"
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps({"data": _Evil(marker)}, protocol=3)
    _archive(tmp_path, build, members)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz, member 'cifar-10-batches-py/data_batch_2': "
                                        r"refusing to unpickle it: it references '(posix|os)\.system', which is not allowed"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_truncated_pickle(tmp_path, build):
    members, _ = build.cifar_members()
    members["cifar-10-batches-py/test_batch"] = members["cifar-10-batches-py/test_batch"][:500]
    _archive(tmp_path, build, members)
    with pytest.raises(DataError, match=r"member 'cifar-10-batches-py/test_batch': cannot unpickle it, the file is "
                                        r"truncated or corrupted"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_member(tmp_path, build):
    members, _ = build.cifar_members()
    del members["cifar-10-batches-py/data_batch_3"]
    _archive(tmp_path, build, members)
    with pytest.raises(DataError, match=r"is not a complete CIFAR-10 python archive: missing members "
                                        r"cifar-10-batches-py/data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_wrong_batch_shape(tmp_path, build):
    members, _ = build.cifar_members()
    members["cifar-10-batches-py/data_batch_1"] = build.cifar_pickle(
        {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
    _archive(tmp_path, build, members)
    with pytest.raises(DataError, match=r"member 'cifar-10-batches-py/data_batch_1': 'data' must be a uint8 array "
                                        r"of shape \(N, 3072\), found uint8 array of shape \(3, 100\)"):
        load_dataset("cifar10", tmp_path, download=False)


def test_label_count_mismatch(tmp_path, build):
    members, _ = build.cifar_members()
    members["cifar-10-batches-py/test_batch"] = build.cifar_pickle(
        {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]})
    _archive(tmp_path, build, members)
    with pytest.raises(DataError, match=r"test_batch': 3 images but 2 labels"):
        load_dataset("cifar10", tmp_path, download=False)


def test_truncated_archive(tmp_path, build):
    path = _archive(tmp_path, build)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"Cannot read archive .*cifar-10-python\.tar\.gz: it is truncated or corrupted"):
        load_dataset("cifar10", tmp_path, download=False)


def test_missing_cifar_message(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(err.value)
    assert "Data set 'cifar10' not found. Looked in:" in msg
    assert "cifar-10-python.tar.gz (from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)" in msg
    assert "cifar10*.tar.gz" in msg and f"into {tmp_path / 'cifar10'}/ or {tmp_path}/" in msg
