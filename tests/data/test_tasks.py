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
    with pytest.raises(MoelabError, match="data.task must be one of classes, rotate, tilt, got 'flip'"):
        make_task(ds, "flip")
    with pytest.raises(MoelabError, match=r"data.rotate_crop must be in \[1, 32\] for toy"):
        make_task(ds, "rotate", crop=40)
    assert torch.is_tensor(torch.from_numpy(t.train_x))


def test_task_from_config_refuses_crops_naming_the_key():
    from types import SimpleNamespace

    from moelab.data.tasks import task_from_config
    from moelab.errors import ConfigError

    ds = toy()
    d = SimpleNamespace(task="rotate", rotate_deg=30.0, rotate_crop=0, grayscale=True)
    t = task_from_config(ds, d, seed=1)
    assert np.array_equal(t.train_x, make_task(ds, "rotate", deg=30.0, grayscale=True, seed=1).train_x)
    assert task_from_config(ds, SimpleNamespace(**{**vars(d), "task": "classes", "grayscale": False}), 0) is ds
    with pytest.raises(ConfigError, match=r"^data.rotate_crop = 33 is out of range: expected a side in \[1, 32\] "
                                          r"for the 32x32 images of toy, or 0") as e:
        task_from_config(ds, SimpleNamespace(**{**vars(d), "rotate_crop": 33}), 0)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"expected a side in \[23, 32\] .* \(the net\), or 0 \(the largest crop "
                                          r"with no empty corner, which is 22 px here\)"):
        task_from_config(ds, d, 0, min_side=23, why="the net")


def _blur_auc(t: TaskDataset) -> float:
    """AUC of one number per image, its mean absolute Laplacian, at telling label 1 from label 0."""
    x = torch.from_numpy(t.train_x[..., 0]).float()
    lap = (4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]).abs().mean((1, 2))
    a, b = lap[torch.from_numpy(t.train_y) == 1], lap[torch.from_numpy(t.train_y) == 0]
    return float((a[:, None] > b[None, :]).float().mean())


def test_tilt_has_no_blur_cue_where_rotate_has_one():
    """On white noise (no content: only the resampling can differ) the rotate task's halves are told apart by
    their blur alone, the tilt task's (-deg/2 vs +deg/2, mirrored resampling) are not."""
    ds = toy(n=400, h=28, c=1, classes=2, seed=3)
    rot, tilt = make_task(ds, "rotate", deg=30, seed=0), make_task(ds, "tilt", deg=30, seed=0)
    assert _blur_auc(rot) < 0.05 or _blur_auc(rot) > 0.95  # the rotated half is visibly smoother
    assert 0.4 < _blur_auc(tilt) < 0.6
    assert tilt.classes == ["tilted -15", "tilted +15"] and tilt.image_shape[0] == valid_crop(28, 28, 15)
    up = tilt.train_y == 0
    crop = tilt.image_shape[0]
    assert np.array_equal(tilt.train_x[up], rotate(ds.train_x[up], -15.0, crop))
    assert np.array_equal(tilt.train_x[~up], rotate(ds.train_x[~up], 15.0, crop))
    assert np.array_equal(tilt.train_latent, ds.train_y)
