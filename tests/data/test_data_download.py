"""Downloads from local file:// mirrors: checksums, fallbacks, atomicity, offline messages."""

from __future__ import annotations

import gzip
import hashlib

import numpy as np
import pytest

from moelab.data import download_dataset, load_dataset
from moelab.data import registry as registry_module
from moelab.data.download import DownloadFailed, RemoteFile, download_file, file_url
from moelab.data.registry import MNIST_FILES
from moelab.errors import DataError


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def mirror(tmp_path):
    folder = tmp_path / "mirror"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(b"hello moelab")
    return folder


def test_file_url():
    assert file_url("https://a/b", "f.gz") == "https://a/b/f.gz"
    assert file_url("https://a/b/", "f.gz") == "https://a/b/f.gz"
    assert file_url("file:///m/{name}/", "f.gz", "mnist") == "file:///m/mnist/f.gz"
    assert file_url("https://x/~kriz/f.gz", "f.gz") == "https://x/~kriz/f.gz"


def test_download_ok(tmp_path, mirror):
    dest = tmp_path / "dest"
    path = download_file(RemoteFile("blob.bin", _sha256(b"hello moelab")), dest, [mirror.as_uri()])
    assert path == dest / "blob.bin" and path.read_bytes() == b"hello moelab"


def test_wrong_checksum_rejected_and_nothing_left(tmp_path, mirror):
    dest = tmp_path / "dest"
    dest.mkdir()
    expected = "0" * 64
    with pytest.raises(DataError) as err:
        download_file(RemoteFile("blob.bin", expected), dest, [mirror.as_uri()])
    msg = str(err.value)
    assert f"{mirror.as_uri()}/blob.bin: checksum mismatch: expected SHA-256 {expected}, " \
           f"got {_sha256(b'hello moelab')}" in msg
    assert "the download was discarded" in msg
    assert list(dest.iterdir()) == []


def test_next_mirror_after_failures(tmp_path, mirror):
    bad = tmp_path / "bad-mirror"
    bad.mkdir()
    (bad / "blob.bin").write_bytes(b"tampered")
    dest = tmp_path / "dest"
    path = download_file(RemoteFile("blob.bin", _sha256(b"hello moelab")), dest,
                         [(tmp_path / "offline").as_uri(), bad.as_uri(), mirror.as_uri()])
    assert path.read_bytes() == b"hello moelab"
    assert [p.name for p in dest.iterdir()] == ["blob.bin"]


def test_all_mirrors_fail(tmp_path):
    with pytest.raises(DownloadFailed) as err:
        download_file(RemoteFile("blob.bin", "0" * 64), tmp_path / "d", [(tmp_path / "a").as_uri(), "nope://x"])
    assert len(err.value.failures) == 2 and "a/blob.bin" in err.value.failures[0]


def test_content_md5_accepts_recompressed_gzip(tmp_path):
    content = b"IDX content" * 100
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "f.gz").write_bytes(gzip.compress(content, compresslevel=1))
    remote = RemoteFile("f.gz", "1" * 64, hashlib.md5(content).hexdigest())
    assert download_file(remote, tmp_path / "d", [(tmp_path / "m").as_uri()]).is_file()
    wrong = RemoteFile("f.gz", "1" * 64, "2" * 32)
    with pytest.raises(DataError, match=r"expected SHA-256 1{64} or uncompressed-content MD5 2{32}, got SHA-256 "):
        download_file(wrong, tmp_path / "d2", [(tmp_path / "m").as_uri()])
    assert not (tmp_path / "d2" / "f.gz").exists()


def _fake_mnist_spec(monkeypatch, mirror_dir, build):
    """Point the MNIST spec at checksums of small fake files served from ``mirror_dir``."""
    arrays = build.write_idx_set(mirror_dir, gz=True)
    files = tuple(RemoteFile(f"{stem}.gz", _sha256((mirror_dir / f"{stem}.gz").read_bytes())) for stem in arrays)
    spec = registry_module.SPECS["mnist"]
    monkeypatch.setitem(registry_module.SPECS, "mnist", type(spec)(
        spec.name, spec.folder, spec.kind, spec.mirrors, files, spec.classes))
    return arrays


def test_load_dataset_downloads_from_mirror_argument(tmp_path, build, monkeypatch):
    arrays = _fake_mnist_spec(monkeypatch, tmp_path / "mirror", build)
    data = tmp_path / "data"
    ds = load_dataset("mnist", data, mirrors=[(tmp_path / "mirror").as_uri()])
    np.testing.assert_array_equal(ds.test_x[..., 0], arrays["t10k-images-idx3-ubyte"])
    assert sorted(p.name for p in (data / "mnist").iterdir()) == sorted(f"{s}.gz" for s in arrays)


def test_mirrors_from_env_with_name_placeholder(tmp_path, build, monkeypatch):
    _fake_mnist_spec(monkeypatch, tmp_path / "mirror" / "mnist", build)
    monkeypatch.setenv("MOELAB_MIRRORS", f"{(tmp_path / 'nowhere').as_uri()},{(tmp_path / 'mirror').as_uri()}/{{name}}")
    assert len(load_dataset("mnist", tmp_path / "data").train_x) == 20


def test_canonical_checksum_rejects_fake_files(tmp_path, build):
    build.write_idx_set(tmp_path / "mirror", gz=True)
    data = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_dataset("mnist", data, mirrors=[(tmp_path / "mirror").as_uri()])
    msg = str(err.value)
    assert "Data set 'mnist' not found" in msg and "Download failed for train-images-idx3-ubyte.gz" in msg
    assert f"expected SHA-256 {MNIST_FILES[0].sha256} or uncompressed-content MD5 {MNIST_FILES[0].content_md5}" in msg
    assert not data.exists()  # nothing half-written, not even the folders made for the download


def test_offline_message_says_where_and_what(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "data", mirrors=[(tmp_path / "offline").as_uri()])
    msg = str(err.value)
    assert f"Looked in: {tmp_path / 'data' / 'cifar10'}, {tmp_path / 'data'}" in msg
    assert f"into {tmp_path / 'data' / 'cifar10'}/" in msg
    assert f"Download failed for cifar-10-python.tar.gz: {(tmp_path / 'offline').as_uri()}/cifar-10-python.tar.gz" in msg


def test_read_only_data_dir_downloads_into_cache(tmp_path, build, monkeypatch):
    _fake_mnist_spec(monkeypatch, tmp_path / "mirror", build)
    data = tmp_path / "readonly"
    data.mkdir()
    real = registry_module.is_writable_dir
    monkeypatch.setattr(registry_module, "is_writable_dir", lambda p: not str(p).startswith(str(data)) and real(p))
    target = download_dataset("mnist", data, mirrors=[(tmp_path / "mirror").as_uri()])
    assert target == tmp_path / "cache" / "mnist"
    assert list(data.iterdir()) == []
    ds = load_dataset("mnist", data, download=False)  # found in the cache folder
    assert str(tmp_path / "cache" / "mnist") in ds.source
