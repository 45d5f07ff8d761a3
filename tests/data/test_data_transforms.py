"""Batch transforms: shapes, exact values on tiny hand examples, determinism with a generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from moelab.data.transforms import (
    class_subset,
    normalize,
    random_crop_padded,
    random_hflip,
    random_translate,
    resize_cubic_half_like_seed,
    to_float,
    train_val_split,
    translate,
    zoom_cubic,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_to_float_and_normalize():
    x = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    t = to_float(x)
    assert t.shape == (2, 3, 3, 4) and t.dtype == torch.float32 and t.is_contiguous()
    assert t[1, 2, 0, 3].item() == pytest.approx(x[1, 0, 3, 2] / 255)
    assert to_float(x[..., 0]).shape == (2, 1, 3, 4)
    n = normalize(t, (0.5, 0.25, 0.0), (0.5, 0.5, 1.0))
    torch.testing.assert_close(n[:, 1], (t[:, 1] - 0.25) / 0.5)
    with pytest.raises(TypeError):
        to_float(x.astype(np.float32))


def _mnist_like(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x[x < 150] = 0  # flat zero regions and sharp edges, as in MNIST (spline overshoot is clipped)
    return x


def test_cubic_half_equals_per_image_scipy_uint8():
    x = _mnist_like()
    seed = np.stack([ndimage.zoom(img, 0.5, order=3) for img in x])
    out = resize_cubic_half_like_seed(x[..., None])
    assert out.shape == (6, 14, 14, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], seed)
    np.testing.assert_array_equal(resize_cubic_half_like_seed(x), seed)  # (N, H, W) too


def test_cubic_half_equals_per_image_scipy_float_torch():
    x = to_float(_mnist_like()[..., None])  # (N, 1, 28, 28)
    seed = np.stack([ndimage.zoom(img[0].numpy(), 0.5, order=3) for img in x])
    out = resize_cubic_half_like_seed(x)
    assert isinstance(out, torch.Tensor) and out.shape == (6, 1, 14, 14) and out.dtype == torch.float32
    np.testing.assert_allclose(out[:, 0].numpy(), seed, atol=1e-6)


def test_zoom_other_sizes_and_rgb():
    rng = np.random.default_rng(1)
    x = rng.random((3, 10, 12, 3))
    seed = np.stack([np.stack([ndimage.zoom(img[..., c], 1.5, order=3) for c in range(3)], -1) for img in x])
    np.testing.assert_allclose(zoom_cubic(x, 1.5), seed, atol=1e-12)


def test_translate_hand_example():
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3)
    # [[1 2 3], [4 5 6], [7 8 9]] moved down 1 and left 1
    edge = translate(x, torch.tensor([1]), torch.tensor([-1]), fill="edge")
    zero = translate(x, torch.tensor([1]), torch.tensor([-1]), fill="zero")
    assert edge[0, 0].tolist() == [[2, 3, 3], [2, 3, 3], [5, 6, 6]]
    assert zero[0, 0].tolist() == [[0, 0, 0], [2, 3, 0], [5, 6, 0]]
    same = translate(x, torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(same, x)


def test_translate_per_image_shifts_and_uint8():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.uint8).reshape(2, 2, 4, 4)
    out = translate(x, torch.tensor([0, -2]), torch.tensor([1, 0]), fill="zero")
    assert out.dtype == torch.uint8
    assert torch.equal(out[0, :, :, 1:], x[0, :, :, :3]) and (out[0, :, :, 0] == 0).all()
    assert torch.equal(out[1, :, :2], x[1, :, 2:]) and (out[1, :, 2:] == 0).all()


def test_random_translate_is_reproducible_and_bounded():
    x = torch.rand(64, 3, 8, 8)
    a = random_translate(x, 2, _gen(5))
    b = random_translate(x, 2, _gen(5))
    c = random_translate(x, 2, _gen(6))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    # with a one-hot image, the peak moves by at most 2 pixels in each direction
    one = torch.zeros(200, 1, 9, 9)
    one[:, 0, 4, 4] = 1
    moved = random_translate(one, 2, _gen(0), fill="zero")
    pos = moved.reshape(200, -1).argmax(1)
    dy, dx = pos // 9 - 4, pos % 9 - 4
    assert dy.abs().max() == 2 and dx.abs().max() == 2 and len(set(zip(dy.tolist(), dx.tolist()))) == 25
    # a fraction of the size, like Keras' width_shift_range
    frac = random_translate(one, 0.25, _gen(0), fill="zero").reshape(200, -1).argmax(1)
    assert (frac // 9 - 4).abs().max() == 2


def test_random_crop_padded():
    x = torch.rand(32, 3, 6, 6)
    a = random_crop_padded(x, 2, _gen(1))
    assert a.shape == x.shape and torch.equal(a, random_crop_padded(x, 2, _gen(1)))
    ones = random_crop_padded(torch.ones(100, 1, 6, 6), 2, _gen(1))
    assert (ones.sum((1, 2, 3)) < 36).any() and ones.sum((1, 2, 3)).min() >= 16  # zero padding enters


def test_random_hflip():
    x = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 1, 1, 4)
    out = random_hflip(x, _gen(3))
    flipped = (out != x).any(-1).flatten()
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert 5 < flipped.sum() < 35
    assert torch.equal(out, random_hflip(x, _gen(3)))
    assert torch.equal(random_hflip(x, _gen(3), p=0.0), x)
    assert torch.equal(random_hflip(x, _gen(3), p=1.0), x.flip(-1))


@pytest.mark.parametrize("as_torch", [False, True])
def test_class_subset(as_torch):
    x = np.arange(10)[:, None] * np.ones((1, 2))
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    if as_torch:
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    xs, ys = class_subset(x, y, [3, 1])
    assert list(np.asarray(ys)) == [1, 0, 1, 0] and list(np.asarray(xs)[:, 0]) == [1, 3, 6, 8]
    _, kept = class_subset(x, y, [3, 1], remap=False)
    assert list(np.asarray(kept)) == [1, 3, 1, 3]


def test_train_val_split_stratified_deterministic():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    tr, va = train_val_split(y, 0.2, seed=7)
    tr2, va2 = train_val_split(y, 0.2, seed=7)
    _, va3 = train_val_split(y, 0.2, seed=8)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2) and not np.array_equal(va, va3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr) & set(va) and set(tr) | set(va) == set(range(100))
    assert np.bincount(y[va]).tolist() == [10, 6, 3, 1]
    assert tr.dtype == np.int64 and np.all(np.diff(va) > 0)


def test_train_val_split_plain_and_torch_labels():
    tr, va = train_val_split(10, 3, seed=0)
    assert len(va) == 3 and len(tr) == 7 and not set(tr) & set(va)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    _, va = train_val_split(y, 3, seed=0)
    assert np.bincount(y.numpy()[va]).tolist() == [1, 2]
    with pytest.raises(ValueError):
        train_val_split(10, 11)


def test_random_transforms_accept_global_generator():
    x = torch.rand(4, 1, 5, 5)
    assert random_translate(x, 1, None).shape == x.shape and random_hflip(x, None).shape == x.shape
