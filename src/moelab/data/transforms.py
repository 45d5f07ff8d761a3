"""Batch transforms: whole tensors at once, no per-image Python loops.

Image tensors are float NCHW (what :func:`to_float` returns); numpy arrays, as stored in an
:class:`~moelab.data.ImageDataset`, are uint8 NHWC. Every random transform takes an explicit
``torch.Generator`` so that augmentation is reproducible (None falls back to torch's global RNG).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

ArrayLike = np.ndarray | torch.Tensor


def to_float(x: ArrayLike) -> torch.Tensor:
    """uint8 NHWC (or NHW) images -> float32 NCHW in [0, 1]."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(x if x.flags.writeable else x.copy())
    else:
        t = x
    if t.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 images, got {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(-1)
    if t.ndim != 4:
        raise ValueError(f"to_float expects (N, H, W, C) or (N, H, W) images, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of a float NCHW batch."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------- cubic zoom


@functools.lru_cache(maxsize=32)
def zoom_matrix(n_in: int, factor: float) -> np.ndarray:
    """(n_out, n_in) matrix M with M @ v == scipy.ndimage.zoom(v, factor, order=3) for 1-D v.

    A 2-D cubic-spline zoom is separable (prefilter and interpolation are both per axis), so
    zoom(img) == M_h @ img @ M_w.T exactly up to float rounding, which lets us zoom a whole
    stack with two matrix products instead of one scipy call per image.
    """
    eye = np.eye(n_in)
    return np.stack([ndimage.zoom(eye[j], factor, order=3) for j in range(n_in)], axis=1)


def _cast_like_scipy(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scipy.ndimage's float -> output-dtype conversion (round half away from zero, clip for uint8)."""
    if dtype.is_floating_point:
        return y.to(dtype)
    if dtype == torch.uint8:
        return torch.where(y > 0, torch.floor(y + 0.5), torch.zeros_like(y)).clamp_(0, 255).to(dtype)
    info = torch.iinfo(dtype)
    return torch.trunc(y + 0.5 * torch.sign(y)).clamp_(info.min, info.max).to(dtype)


def zoom_cubic(x: ArrayLike, factor: float, chunk: int = 8192) -> ArrayLike:
    """Per-image ``scipy.ndimage.zoom(img, factor, order=3)`` for a whole batch.

    numpy input: (N, H, W) or (N, H, W, C); torch input: (N, H, W) or (N, C, H, W).
    Returns the same type, layout and dtype (integers rounded and clipped like scipy does).
    """
    is_numpy = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_numpy else x
    if t.ndim not in (3, 4):
        raise ValueError(f"zoom_cubic expects a batch of 2-D images (3 or 4 dims), got shape {tuple(t.shape)}")
    channels_last = is_numpy and t.ndim == 4
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    lead = t.shape[:-2]
    h, w = t.shape[-2:]
    mh = torch.from_numpy(zoom_matrix(int(h), float(factor))).to(t.device)
    mw = torch.from_numpy(zoom_matrix(int(w), float(factor))).to(t.device)
    flat = t.reshape(-1, h, w)
    out = torch.empty((flat.shape[0], mh.shape[0], mw.shape[0]), dtype=t.dtype, device=t.device)
    for start in range(0, flat.shape[0], chunk):
        block = flat[start:start + chunk].to(torch.float64)
        out[start:start + chunk] = _cast_like_scipy(mh @ block @ mw.T, t.dtype)
    out = out.reshape(*lead, mh.shape[0], mw.shape[0])
    if channels_last:
        out = out.permute(0, 2, 3, 1)
    return np.ascontiguousarray(out.numpy()) if is_numpy else out


def resize_cubic_half_like_seed(x: ArrayLike) -> ArrayLike:
    """Halve image size (MNIST 28 -> 14) exactly like the seed's ``scipy.ndimage.zoom(img, 0.5, order=3)``."""
    return zoom_cubic(x, 0.5)


# ---------------------------------------------------------------- random geometry


def _shift_bound(max_shift: int | float, size: int) -> int:
    """Pixels; a float below 1 is a fraction of the image size (Keras' width_shift_range)."""
    if isinstance(max_shift, float) and 0 < max_shift < 1:
        return int(round(max_shift * size))
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return int(max_shift)


def _device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    """Random numbers are drawn on the generator's device (None: torch's global generator, on x's)."""
    return generator.device if generator is not None else x.device


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fill: str = "edge") -> torch.Tensor:
    """Shift image ``i`` of an NCHW batch down by ``dy[i]`` and right by ``dx[i]`` pixels (negative: up/left).

    ``fill="edge"`` repeats the border pixels into the uncovered area (Keras' fill_mode="nearest");
    ``fill="zero"`` fills it with zeros.
    """
    if fill not in ("edge", "zero"):
        raise ValueError(f"fill must be 'edge' or 'zero', got {fill!r}")
    n, _, h, w = x.shape
    dy = dy.to(x.device, torch.long).reshape(n, 1)
    dx = dx.to(x.device, torch.long).reshape(n, 1)
    rows = torch.arange(h, device=x.device).unsqueeze(0) - dy  # (N, H): source row of each output row
    cols = torch.arange(w, device=x.device).unsqueeze(0) - dx  # (N, W)
    out = x[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows.clamp(0, h - 1)[:, None, :, None],
        cols.clamp(0, w - 1)[:, None, None, :],
    ]
    if fill == "zero":
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        out = torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def translate_offsets(n: int, max_shift: int | float | tuple[int | float, int | float], h: int, w: int,
                      generator: torch.Generator | None, device: torch.device | str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The random offsets ``(dy, dx)`` (each (n,) long) :func:`random_translate` draws for n images of h x w:
    dy then dx, on the generator's device (None: torch's global generator, on ``device``). Drawing them
    apart from the images lets a caller draw on the host and shift on another device."""
    my, mx = max_shift if isinstance(max_shift, tuple) else (max_shift, max_shift)
    by, bx = _shift_bound(my, h), _shift_bound(mx, w)
    dev = generator.device if generator is not None else torch.device(device or "cpu")
    dy = torch.randint(-by, by + 1, (n,), generator=generator, device=dev)
    dx = torch.randint(-bx, bx + 1, (n,), generator=generator, device=dev)
    return dy, dx


def random_translate(x: torch.Tensor, max_shift: int | float | tuple[int | float, int | float],
                     generator: torch.Generator | None, fill: str = "edge") -> torch.Tensor:
    """Shift every NCHW image by its own random integer offset in [-max_shift, max_shift] (per axis).

    ``max_shift`` is pixels, or a float below 1 meaning a fraction of the image size; a pair
    gives (vertical, horizontal) bounds. The offsets are :func:`translate_offsets`.
    """
    n, _, h, w = x.shape
    dy, dx = translate_offsets(n, max_shift, h, w, generator, x.device)
    return translate(x, dy, dx, fill)


def random_crop_padded(x: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-pad each side by ``pad`` and take a random crop of the original size (the CIFAR augmentation).

    Equivalent to a random shift in [-pad, pad] with zero fill, which is how it is computed.
    """
    return random_translate(x, int(pad), generator, fill="zero")


def random_hflip(x: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Mirror each NCHW image left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], generator=generator, device=_device(generator, x)).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------- subsets and splits


def class_subset(x: ArrayLike, y: ArrayLike, classes: Sequence[int], remap: bool = True
                 ) -> tuple[ArrayLike, ArrayLike]:
    """Keep the samples whose label is in ``classes``; with ``remap`` labels become 0..len(classes)-1
    in the order given, else the original labels are kept."""
    wanted = list(classes)
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"classes has duplicates: {wanted}")
    if isinstance(y, torch.Tensor):
        keep_t = torch.isin(y, torch.as_tensor(wanted, dtype=y.dtype, device=y.device))
        ys = y[keep_t]
        if remap:
            lut = torch.full((int(max(wanted)) + 1,), -1, dtype=y.dtype, device=y.device)
            lut[torch.as_tensor(wanted, device=y.device)] = torch.arange(len(wanted), dtype=y.dtype, device=y.device)
            ys = lut[ys]
        return x[keep_t.to(x.device) if isinstance(x, torch.Tensor) else keep_t.cpu().numpy()], ys
    y = np.asarray(y)
    keep = np.isin(y, wanted)
    ys = y[keep]
    if remap:
        lut = np.full(int(max(wanted)) + 1, -1, dtype=y.dtype)
        lut[wanted] = np.arange(len(wanted), dtype=y.dtype)
        ys = lut[ys]
    return x[torch.from_numpy(keep) if isinstance(x, torch.Tensor) else keep], ys


def train_val_split(n_or_y: int | ArrayLike, val_size: int | float, seed: int = 0, stratified: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train_idx, val_idx), both sorted int64 and disjoint.

    ``n_or_y`` is a sample count or the label array (needed for ``stratified``, which keeps each
    class's share in both parts, apportioning rounding by largest remainder). ``val_size`` is a
    count, or a float in (0, 1) meaning a fraction.
    """
    if isinstance(n_or_y, int | np.integer):
        y, n = None, int(n_or_y)
    else:
        y = n_or_y.cpu().numpy() if isinstance(n_or_y, torch.Tensor) else np.asarray(n_or_y)
        n = len(y)
    n_val = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 <= n_val <= n:
        raise ValueError(f"val_size {val_size} does not fit {n} samples")
    rng = np.random.default_rng(seed)
    if y is None or not stratified:
        val = rng.permutation(n)[:n_val]
    else:
        _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
        quota = counts * (n_val / n) if n else counts * 0.0
        take = np.floor(quota).astype(np.int64)
        leftover = n_val - int(take.sum())
        take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
        order = np.argsort(inverse, kind="stable")  # indices grouped by class, ascending within a class
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        val = np.concatenate([
            order[s:s + c][rng.permutation(c)[:k]] for s, c, k in zip(starts, counts, take)
        ]) if len(counts) else np.empty(0, dtype=np.int64)
    val = np.sort(val).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val] = False
    return np.flatnonzero(mask).astype(np.int64), val
