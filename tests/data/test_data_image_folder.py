"""Image folders <split>/<class>/*.png|jpg as a directory or a tar archive."""

from __future__ import annotations

import numpy as np
import pytest

from moelab.data import check_datasets, load_dataset, load_image_folder
from moelab.data.cifar import CLASSES as CIFAR_CLASSES
from moelab.data.image_folder import read_image_folder
from moelab.errors import DataError


def _check(ds_or_tuple, expected):
    classes, train_x, train_y, test_x, test_y = ds_or_tuple
    assert classes == expected["classes"]
    np.testing.assert_array_equal(train_x, expected["train_x"])
    np.testing.assert_array_equal(train_y, expected["train_y"])
    np.testing.assert_array_equal(test_x, expected["test_x"])
    np.testing.assert_array_equal(test_y, expected["test_y"])


@pytest.mark.parametrize("rgb", [True, False])
def test_directory(tmp_path, build, rgb):
    entries, expected = build.image_folder_entries(rgb=rgb)
    build.write_entries_as_dir(tmp_path / "pets", entries)
    _check(read_image_folder(tmp_path / "pets"), expected)
    ds = load_image_folder(tmp_path / "pets")
    assert ds.name == "pets" and ds.image_shape == (6, 5, 3 if rgb else 1)


@pytest.mark.parametrize("archive_name, prefix", [("pets.tar.gz", ""), ("pets.tar", "pets/")])
def test_archive(tmp_path, build, archive_name, prefix):
    entries, expected = build.image_folder_entries(prefix=prefix)
    build.make_tar(tmp_path / archive_name, entries)
    _check(read_image_folder(tmp_path / archive_name), expected)
    assert load_image_folder(tmp_path / archive_name).name == "pets"


def test_archive_without_directory_entries_and_with_jpeg(tmp_path, build):
    img = np.full((8, 8, 3), 120, np.uint8)
    entries = [(f"{split}/{cls}/a.jpg", build.jpeg_bytes(img)) for split in ("train", "test") for cls in ("b", "a")]
    build.make_tar(tmp_path / "x.tgz", entries)
    classes, train_x, train_y, test_x, _ = read_image_folder(tmp_path / "x.tgz")
    assert classes == ["a", "b"] and train_x.shape == (2, 8, 8, 3) and list(train_y) == [0, 1]
    assert np.abs(train_x.astype(int) - 120).max() <= 2


def test_hidden_and_macos_entries_are_ignored(tmp_path, build):
    entries, expected = build.image_folder_entries(prefix="pets/")
    entries += [("pets/train/.cache", None), ("pets/train/cat/._0000.png", b"junk"),
                ("__MACOSX/pets/train/cat/._0000.png", b"junk"), ("pets/README.txt", b"hello")]
    build.make_tar(tmp_path / "pets.tar.gz", entries)
    _check(read_image_folder(tmp_path / "pets.tar.gz"), expected)


def test_in_archive_symlink_is_followed(tmp_path, build):
    entries, expected = build.image_folder_entries()
    entries.append(("test/cat/9999.png", "symlink", "0000.png"))
    build.make_tar(tmp_path / "pets.tar", entries)
    _, _, _, test_x, test_y = read_image_folder(tmp_path / "pets.tar")
    assert len(test_x) == len(expected["test_x"]) + 1
    np.testing.assert_array_equal(test_x[2], test_x[0])  # cat: 0000, 0001, 9999 -> same as 0000


def test_cifar10_finds_image_folder_archive(tmp_path, build):
    entries, expected = build.image_folder_entries(CIFAR_CLASSES, n_train=1, n_test=1, size=(32, 32))
    build.make_tar(tmp_path / "cifar10-jpeg75.tar.gz", entries)
    ds = load_dataset("cifar10", tmp_path, download=False)
    assert ds.source == str(tmp_path / "cifar10-jpeg75.tar.gz")
    np.testing.assert_array_equal(ds.train_x, expected["train_x"])


def test_cifar10_extracted_image_folder(tmp_path, build):
    entries, expected = build.image_folder_entries(CIFAR_CLASSES, n_train=1, n_test=1, size=(32, 32))
    build.write_entries_as_dir(tmp_path / "cifar10", entries)
    ds = load_dataset("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.test_x, expected["test_x"])


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_image_folder_with_an_extra_class_is_refused(tmp_path, build, as_tar):
    """11 class folders would reach training as label 10 (IndexError there); refused at load and by data check."""
    entries, _ = build.image_folder_entries([*CIFAR_CLASSES, "zebra"], n_train=1, n_test=1, size=(8, 8))
    if as_tar:
        path = build.make_tar(tmp_path / "cifar10-extra.tar.gz", entries)
    else:
        path = build.write_entries_as_dir(tmp_path / "cifar10", entries)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert msg.startswith(f"Image folder {path}: cifar10 has the 10 classes airplane, automobile, ")
    assert "unexpected class folder train/zebra/" in msg and "no folder for" not in msg and "\n" not in msg
    assert "Remove or rename the class folders" in msg
    (row,) = check_datasets(tmp_path, names=["cifar10"])
    assert row["status"] == f"ERROR: {msg}"
    assert load_image_folder(path).classes == sorted([*CIFAR_CLASSES, "zebra"])  # under its own name: fine


def test_cifar10_image_folder_with_a_missing_class_is_refused(tmp_path, build):
    entries, _ = build.image_folder_entries(CIFAR_CLASSES[:9], n_train=1, n_test=1, size=(8, 8))
    build.write_entries_as_dir(tmp_path / "cifar10", entries)
    with pytest.raises(DataError, match=r"cifar10 has the 10 classes .* but found no folder for truck\. Remove"):
        load_dataset("cifar10", tmp_path, download=False)


def test_unreadable_image(tmp_path, build):
    entries, _ = build.image_folder_entries()
    entries.append(("train/dog/broken.png", b"\x89PNG\r\n\x1a\n garbage"))
    build.make_tar(tmp_path / "pets.tar.gz", entries)
    with pytest.raises(DataError, match=r"Archive .*pets\.tar\.gz, member 'train/dog/broken\.png': cannot decode the "
                                        r"image .*expected a readable PNG or JPEG file"):
        read_image_folder(tmp_path / "pets.tar.gz")


def test_unreadable_image_in_directory(tmp_path, build):
    entries, _ = build.image_folder_entries()
    build.write_entries_as_dir(tmp_path / "pets", entries)
    (tmp_path / "pets" / "test" / "emu" / "0000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"Image .*test/emu/0000\.png: cannot decode the image"):
        read_image_folder(tmp_path / "pets")


@pytest.mark.parametrize("payload, says", [(b"not an image", "not PNG or JPEG data; it starts with bytes 6e 6f 74"),
                                           (b"", "it is empty")])
def test_undecodable_member_names_the_archive_and_member(tmp_path, build, payload, says):
    """PIL reads archive members from memory and names the buffer (<_io.BytesIO object at 0x...>): the
    message names the archive and the member instead."""
    entries, _ = build.image_folder_entries()
    entries.append(("train/dog/broken.png", payload))
    archive = build.make_tar(tmp_path / "pets.tar.gz", entries)
    with pytest.raises(DataError) as e:
        read_image_folder(archive)
    msg = str(e.value)
    assert msg.startswith(f"Archive {archive}, member 'train/dog/broken.png': cannot decode the image (")
    assert says in msg and "BytesIO" not in msg and "0x" not in msg


@pytest.mark.parametrize("as_tar", [False, True])
def test_empty_class_folder(tmp_path, build, as_tar):
    entries, _ = build.image_folder_entries()
    entries.append(("train/zebra", None))
    if as_tar:
        path = build.make_tar(tmp_path / "pets.tar.gz", entries)
    else:
        path = build.write_entries_as_dir(tmp_path / "pets", entries)
    with pytest.raises(DataError, match=r"class folder 'train/zebra/' holds no images"):
        read_image_folder(path)


def test_mismatched_image_sizes(tmp_path, build):
    entries, _ = build.image_folder_entries(size=(4, 4))
    entries.append(("train/dog/odd.png", build.png_bytes(np.zeros((5, 4, 3), np.uint8))))
    build.make_tar(tmp_path / "pets.tar.gz", entries)
    with pytest.raises(DataError, match=r"member 'train/dog/odd\.png': image is 5x4 \(HxW\) but the images in .* must "
                                        r"all have one size; expected 4x4 like Archive .*member 'train/cat/0000\.png'"):
        read_image_folder(tmp_path / "pets.tar.gz")


def test_missing_test_split(tmp_path, build):
    entries, _ = build.image_folder_entries()
    build.write_entries_as_dir(tmp_path / "pets", [e for e in entries if not e[0].startswith("test")])
    with pytest.raises(DataError, match=r"expected sub-folders train/<class>/ and test/<class>/.*'test/' is missing"):
        read_image_folder(tmp_path / "pets")


def test_test_class_not_in_train(tmp_path, build):
    entries, _ = build.image_folder_entries()
    entries.append(("test/yak/0.png", build.png_bytes(np.zeros((6, 5, 3), np.uint8))))
    build.make_tar(tmp_path / "pets.tar", entries)
    with pytest.raises(DataError, match=r"class 'yak' appears in 'test/' but not in 'train/'"):
        read_image_folder(tmp_path / "pets.tar")


def test_not_an_image_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=r"notes\.txt: expected an image folder or a \.tar/\.tar\.gz archive"):
        read_image_folder(tmp_path / "notes.txt")
    with pytest.raises(DataError, match=r"Image folder .*nowhere does not exist"):
        load_image_folder(tmp_path / "nowhere")
