"""Tasks built on a data set: the rotate task (latent classes) and the grayscale leak guard."""

import numpy as np
import pytest
import torch

from moelab.data.dataset import ImageDataset
from moelab.data.tasks import TaskDataset, make_task, rotate, to_gray, valid_crop
from moelab.errors import MoelabError


def toy(n=40, h=32, c=3, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, h, h, c), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % classes
    return ImageDataset("toy", [f"c{i}" for i in range(classes)], x, y, x[: n // 2].copy(), y[: n // 2].copy())


def test_rotate_by_zero_is_the_identity_and_by_90_is_rot90():
    x = toy().train_x
    assert np.array_equal(rotate(x, 0.0, 32), x)
    assert np.array_equal(rotate(x, 90.0, 32), np.rot90(x, k=1, axes=(1, 2)))  # counter-clockwise
    crop = rotate(x, 0.0, 24)
    assert crop.shape == (40, 24, 24, 3) and np.array_equal(crop, x[:, 4:28, 4:28])


def test_rotate_task_labels_half_of_every_class_and_keeps_the_class_as_latent():
    ds = toy()
    t = make_task(ds, "rotate", deg=30, seed=1)
    assert isinstance(t, TaskDataset) and t.classes == ["upright", "rotated 30"]
    assert t.latent_classes == ds.classes and np.array_equal(t.train_latent, ds.train_y)
    fit = valid_crop(32, 32, 30)
    assert t.image_shape == (fit, fit, 3) and 20 <= fit <= int(32 / (np.cos(np.pi / 6) + np.sin(np.pi / 6)))
    for y, latent in ((t.train_y, t.train_latent), (t.test_y, t.test_latent)):
        for c in np.unique(latent):
            assert y[latent == c].sum() == (latent == c).sum() // 2
    up = t.train_y == 0
    assert np.array_equal(t.train_x[up], rotate(ds.train_x[up], 0.0, fit))
    assert np.array_equal(t.train_x[~up], rotate(ds.train_x[~up], 30.0, fit))
    again = make_task(ds, "rotate", deg=30, seed=1)
    assert np.array_equal(again.train_y, t.train_y) and np.array_equal(again.train_x, t.train_x)
    assert not np.array_equal(make_task(ds, "rotate", deg=30, seed=2).train_y, t.train_y)


def test_rotated_content_has_no_empty_corners():
    """The crop fits inside the rotated frame: a white image stays white, rotated or not."""
    white = ImageDataset("w", ["a", "b"], np.full((8, 32, 32, 1), 255, np.uint8), np.arange(8) % 2,
                         np.full((4, 32, 32, 1), 255, np.uint8), np.arange(4) % 2)
    t = make_task(white, "rotate", deg=30)
    assert t.train_x.min() == 255
    assert rotate(white.train_x, 30.0, valid_crop(32, 32, 30) + 2).min() < 255  # one step larger: a corner shows


def test_grayscale_guard_and_bad_options():
    ds = toy()
    g = to_gray(ds.train_x)
    assert g.shape == ds.train_x.shape and np.array_equal(g[..., 0], g[..., 2])
    want = np.round(ds.train_x[0, 0, 0].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    assert g[0, 0, 0, 0] == want
    assert np.array_equal(make_task(ds, "classes", grayscale=True).train_x, g)
    assert make_task(ds, "classes") is ds
    t = make_task(ds, "rotate", grayscale=True)
    assert np.array_equal(t.train_x[..., 0], t.train_x[..., 1])
    with pytest.raises(MoelabError, match="data.task must be one of classes, rotate, got 'flip'"):
        make_task(ds, "flip")
    with pytest.raises(MoelabError, match=r"data.rotate_crop must be in \[1, 32\] for toy"):
        make_task(ds, "rotate", crop=40)
    assert torch.is_tensor(torch.from_numpy(t.train_x))
