"""moelab.data.augment: rotation / zoom geometry, and Augment's distortions on top of the seed pipeline."""

import math

import pytest
import torch

from moelab.data.augment import Augment, random_rotate_scale, rotate_zoom, shift_matrix
from moelab.errors import MoelabError


def _f64(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_rotate_zoom_quarter_turn_is_rot90_and_zero_is_identity():
    x = torch.rand(3, 6, 6)
    quarter = rotate_zoom(x, _f64(*[math.pi / 2] * 3), _f64(1, 1, 1))
    torch.testing.assert_close(quarter, torch.rot90(x, 1, (1, 2)), rtol=0, atol=1e-5)  # anticlockwise
    torch.testing.assert_close(rotate_zoom(x, _f64(0, 0, 0), _f64(1, 1, 1)), x, rtol=0, atol=1e-5)


def test_rotate_zoom_magnifies_about_the_centre():
    x = torch.zeros(1, 8, 8)
    x[0, 3:5, 3:5] = 1.0  # a 2x2 square in the middle
    big = rotate_zoom(x, _f64(0), _f64(2.0))[0]
    assert big[2:6, 2:6].min() > 0.2 and big.sum() > 3 * x.sum()  # ~4x the area, still centred
    assert big[0].abs().sum() == 0 and big[:, 0].abs().sum() == 0
    small = rotate_zoom(x, _f64(0), _f64(0.5))[0]
    assert small.sum() < x.sum()


def test_random_rotate_scale_draws_per_image_and_is_reproducible():
    x = torch.rand(16, 10, 10)
    a = random_rotate_scale(x, 15.0, 0.1, torch.Generator().manual_seed(3))
    b = random_rotate_scale(x, 15.0, 0.1, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    same = random_rotate_scale(x[:1].expand(16, -1, -1).contiguous(), 15.0, 0.1, torch.Generator().manual_seed(4))
    assert (same[1:] - same[:1]).abs().amax(dim=(1, 2)).min() > 1e-3  # every image its own angle / zoom


def test_shift_matrix_moves_rows():
    v = torch.arange(5, dtype=torch.float64)
    assert (shift_matrix(5, 2) @ v).tolist() == [0, 0, 0, 1, 2]
    assert (shift_matrix(5, -1) @ v).tolist() == [1, 2, 3, 4, 0]


def _data(n=6, size=28):
    raw = torch.randint(0, 256, (n, size, size), dtype=torch.uint8)
    return {"resize": "none", "pixel_affine": (0.0, 255.0), "train_raw": raw}


def test_augment_rotation_only_matches_rotate_zoom_with_the_same_draws():
    d = _data()
    out = Augment(d, 0, rotate=20.0)(d["train_raw"], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1, (6,), generator=g), torch.randint(0, 1, (6,), generator=g)  # Augment's shift draws
    ref = random_rotate_scale(d["train_raw"].float(), 20.0, 0.0, g).flatten(1) / 255.0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert Augment(d, 0, rotate=20.0).active and not Augment(d, 0).active


@pytest.mark.parametrize("kw, needle", [({"shift": -1}, "shift=-1"), ({"shift": 1, "rotate": -5.0}, "rotate=-5.0"),
                                        ({"shift": 1, "scale": 1.5}, "scale=1.5")])
def test_augment_rejects_bad_ranges(kw, needle):
    with pytest.raises(MoelabError, match=needle):
        Augment(_data(), **kw)
