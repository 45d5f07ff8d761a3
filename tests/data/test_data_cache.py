"""The decoded-array cache: hits, changed sources, damaged entries, and where it is written."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from moelab.data import load_dataset
from moelab.data import registry as registry_module
from moelab.data.cache import MEMO_NAME, entry_dir


@pytest.fixture
def mnist_dir(tmp_path, build):
    build.write_idx_set(tmp_path / "data" / "mnist")
    return tmp_path / "data"


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = registry_module._decode

    def counting(name, source):
        calls.append(name)
        return real(name, source)

    monkeypatch.setattr(registry_module, "_decode", counting)
    return calls


def _entry(ds):
    return entry_dir(ds.name, ds.checksum)


def test_second_load_hits_cache(mnist_dir, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    first = load_dataset("mnist", mnist_dir, download=False)
    second = load_dataset("mnist", mnist_dir, download=False)
    assert calls == ["mnist"]
    assert second.checksum == first.checksum and second.classes == first.classes
    for key in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(second, key), getattr(first, key))
        assert getattr(second, key).dtype == getattr(first, key).dtype
    assert _entry(first).parent.parent == tmp_path / "cache"
    assert sorted(p.name for p in (mnist_dir / "mnist").iterdir()) == sorted(
        ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz"])  # nothing written beside the data
    assert (tmp_path / "cache" / MEMO_NAME).is_file()


def test_changed_source_is_detected(mnist_dir, build, monkeypatch):
    first = load_dataset("mnist", mnist_dir, download=False)
    labels = mnist_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"
    build.write_file(labels, build.idx_bytes(np.full(10, 7, np.uint8)), gz=True)
    os.utime(labels, ns=(1, 1))  # even with an odd mtime, the size/mtime stamp changed
    second = load_dataset("mnist", mnist_dir, download=False)
    assert second.checksum != first.checksum
    assert (second.test_y == 7).all()


def test_checksum_key_is_file_sha256_for_single_file(tmp_path, build):
    members, _ = build.cifar_members()
    archive = build.make_tar(tmp_path / "cifar-10-python.tar.gz", list(members.items()))
    import hashlib

    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.checksum == hashlib.sha256(archive.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "garble", "manifest_shape", "manifest_json", "missing_array"])
def test_damaged_cache_is_rebuilt(mnist_dir, monkeypatch, caplog, damage):
    first = load_dataset("mnist", mnist_dir, download=False)
    entry = _entry(first)
    npy = entry / "train_x.npy"
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:-50])
    elif damage == "garble":
        raw = bytearray(npy.read_bytes())
        raw[-10] ^= 0xFF
        npy.write_bytes(bytes(raw))
    elif damage == "manifest_shape":
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["arrays"]["train_x"]["shape"] = [19, 28, 28, 1]
        (entry / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "manifest_json":
        (entry / "manifest.json").write_text("{not json")
    else:
        npy.unlink()
    calls = _count_decodes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="moelab.data"):
        again = load_dataset("mnist", mnist_dir, download=False)
    assert calls == ["mnist"]
    assert "is damaged" in caplog.text and "rebuilding it from the source" in caplog.text
    np.testing.assert_array_equal(again.train_x, first.train_x)
    # the rebuilt entry is valid again
    calls.clear()
    caplog.clear()
    load_dataset("mnist", mnist_dir, download=False)
    assert calls == [] and "damaged" not in caplog.text


def test_cache_disabled_writes_nothing(mnist_dir, tmp_path):
    load_dataset("mnist", mnist_dir, download=False, cache=False)
    assert not (tmp_path / "cache" / "decoded").exists()


def test_damaged_checksum_memo_is_ignored(mnist_dir, tmp_path):
    first = load_dataset("mnist", mnist_dir, download=False)
    (tmp_path / "cache" / MEMO_NAME).write_text("[broken")
    assert load_dataset("mnist", mnist_dir, download=False).checksum == first.checksum
