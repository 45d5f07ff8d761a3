"""Unsafe tar members are refused, naming the archive and the member."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.data import load_dataset
from moelab.data.archive import iter_tar
from moelab.data.image_folder import read_image_folder
from moelab.errors import DataError


@pytest.fixture
def good_entries(build):
    entries, _ = build.image_folder_entries()
    return entries


@pytest.mark.parametrize("bad_entry, why", [
    (("/etc/evil.png", b"x"), "has an absolute path"),
    (("train/../../evil.png", b"x"), "has a '\\.\\.' path component"),
    (("train/cat/link.png", "symlink", "../../../etc/passwd"), "is a link pointing outside the archive"),
    (("train/cat/abs.png", "symlink", "/etc/passwd"), "is a link to the absolute path '/etc/passwd'"),
    (("train/cat/hard.png", "hardlink", "../outside.png"), "is a link pointing outside the archive"),
    (("train/cat/dev", "chr"), "is a device, FIFO or other special file"),
])
def test_unsafe_member_rejected(tmp_path, build, good_entries, bad_entry, why):
    archive = build.make_tar(tmp_path / "pets.tar.gz", [*good_entries, bad_entry])
    name = bad_entry[0].replace(".", r"\.")
    with pytest.raises(DataError, match=rf"Unsafe archive .*pets\.tar\.gz: member '{name}' {why}"):
        read_image_folder(archive)
    assert [p.name for p in tmp_path.iterdir()] == ["pets.tar.gz"]  # nothing was extracted


def test_unsafe_member_in_cifar_archive(tmp_path, build):
    members, _ = build.cifar_members()
    entries = [*members.items(), ("../cifar-10-batches-py/data_batch_1", b"x")]
    build.make_tar(tmp_path / "cifar-10-python.tar.gz", entries)
    with pytest.raises(DataError, match=r"Unsafe archive .*cifar-10-python\.tar\.gz: member "
                                        r"'\.\./cifar-10-batches-py/data_batch_1' has a '\.\.' path component"):
        load_dataset("cifar10", tmp_path, download=False)


def test_safe_links_and_dot_prefix(tmp_path, build):
    archive = build.make_tar(tmp_path / "a.tar", [
        ("./dir", None), ("./dir/f.bin", b"abc"), ("dir/link", "symlink", "f.bin"), ("dir/hard", "hardlink", "dir/f.bin"),
    ])
    members = list(iter_tar(archive))
    assert [(m.name, m.kind) for m in members] == [("dir", "dir"), ("dir/f.bin", "file"), ("dir/link", "link"),
                                                    ("dir/hard", "link")]
    assert members[1].data == b"abc"
    assert members[2].link_target == "dir/f.bin" and members[3].link_target == "dir/f.bin"


def test_not_a_tar(tmp_path):
    (tmp_path / "x.tar.gz").write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match=r"Cannot read archive .*x\.tar\.gz"):
        list(iter_tar(tmp_path / "x.tar.gz"))
