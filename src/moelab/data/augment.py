"""Random distortions of the *original* digit images, then the experiment's own preprocessing.

The MNIST / digits experiments train on images the seed's pipeline made (a cubic 28 -> 14 zoom, rounded
like scipy does for uint8, then scaled). :class:`Augment` distorts the original images and runs that same
pipeline on whole batches, so every augmented image is what the seed's pipeline makes of a distorted digit:

* ``shift``: random integer translations (zero fill) by up to ``shift`` pixels of the original image;
* ``rotate`` / ``scale``: a random rotation by up to ``rotate`` degrees and zoom by a factor in
  ``[1 - scale, 1 + scale]`` about the image centre (bilinear, zero fill), applied before the shift:
  the elastic-free part of the distortions Simard et al. (2003) found to pay most on MNIST.

Shift and zoom are both linear, so image i becomes ``A[dy_i] X_i B[dx_i]`` with the ``(2 * shift + 1)``
matrices ``A[d] = M_h S_d`` and ``B[d] = (M_w S_d)^T`` precomputed (``S_d`` shifts by d with zero fill, ``M``
is the zoom): two small batched GEMMs, no gather over pixels. The rotation / scaling is one
``grid_sample`` of the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.errors import MoelabError


def shift_matrix(n: int, d: int) -> Tensor:
    """(n, n) float64 ``S`` with ``(S v)[r] = v[r - d]``, 0 where ``r - d`` is outside."""
    m = torch.zeros(n, n, dtype=torch.float64)
    r = torch.arange(max(0, d), min(n, n + d))
    m[r, r - d] = 1.0
    return m


def rotate_zoom(x: Tensor, angle: Tensor, zoom: Tensor) -> Tensor:
    """float (n, h, w) images rotated anticlockwise by ``angle`` (n,) radians and magnified by ``zoom`` (n,)
    about their centre (bilinear, zero fill)."""
    n = x.shape[0]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # grid_sample maps output -> input: the inverse
    theta = torch.zeros(n, 2, 3, dtype=cos.dtype)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.dtype), [n, 1, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)


def random_rotate_scale(x: Tensor, rotate: float, scale: float, g: torch.Generator) -> Tensor:
    """:func:`rotate_zoom` by U(-rotate, rotate) degrees and U(1 - scale, 1 + scale), one draw per image."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(rotate)
    zoom = 1 + (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * scale
    return rotate_zoom(x, angle, zoom)


class Augment:
    """uint8 original images (n, h0, w0) -> float32 (n, h * w), distorted, then preprocessed like the data set's
    images (``data`` is what the jacobs experiments' ``load_data`` returns: ``resize``, ``pixel_affine``,
    ``train_raw``)."""

    def __init__(self, data: dict, shift: int, rotate: float = 0.0, scale: float = 0.0):
        if shift < 0 or rotate < 0 or not 0 <= scale < 1:
            raise MoelabError(f"Augment: shift and rotate must be >= 0 and scale in [0, 1), got shift={shift}, "
                              f"rotate={rotate}, scale={scale}")
        self.shift, self.rotate, self.scale = shift, rotate, scale
        self.resize = data["resize"]
        self.offset, self.scale_px = data["pixel_affine"]
        h0, w0 = data["train_raw"].shape[1:]
        if self.resize == "seed_half":
            from moelab.data.transforms import zoom_matrix

            mh, mw = (torch.from_numpy(zoom_matrix(int(n), 0.5)) for n in (h0, w0))
        else:
            mh, mw = torch.eye(h0, dtype=torch.float64), torch.eye(w0, dtype=torch.float64)
        ds = range(-shift, shift + 1)
        self.a = torch.stack([mh @ shift_matrix(h0, d) for d in ds]).float()  # (2s+1, h, h0)
        self.b = torch.stack([(mw @ shift_matrix(w0, d)).T for d in ds]).float()  # (2s+1, w0, w)

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.rotate > 0 or self.scale > 0

    def __call__(self, raw: Tensor, g: torch.Generator) -> Tensor:
        n = raw.shape[0]
        dy = torch.randint(0, 2 * self.shift + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.shift + 1, (n,), generator=g)
        x = raw.float()
        if self.rotate > 0 or self.scale > 0:
            x = random_rotate_scale(x, self.rotate, self.scale, g)
        x = torch.bmm(torch.bmm(self.a.index_select(0, dy), x), self.b.index_select(0, dx))  # (n, h, w)
        if self.resize == "seed_half":  # scipy.ndimage.zoom returns uint8 for uint8 images: round half up, clip
            x.add_(0.5).floor_().clamp_(0, 255)
        return x.flatten(1).add_(self.offset).div_(self.scale_px)


__all__ = ["Augment", "random_rotate_scale", "rotate_zoom", "shift_matrix"]
