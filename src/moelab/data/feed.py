"""Feeding training batches to the device the run computes on.

A data set reaches the device one of two ways, decided per tensor (:func:`fits_on_device`):

* **resident**: the tensor is copied to the device once (on first use) and every batch is gathered there
  (``index_select`` on the device); augmentation runs there too. For a CUDA device and data sets that are
  small next to its memory: CIFAR-10 as uint8 is 184 MB, MNIST 55 MB (``MOELAB_DEVICE_DATA_MB`` sets the
  limit, 0 turns it off).
* **host**: the tensor stays in host memory; each batch is gathered on the host and, for a CUDA device,
  gathered straight into pinned (page-locked) memory and copied asynchronously (``non_blocking``), which is
  what lets the copy overlap the host's work (a ``non_blocking`` copy from ordinary pageable memory does
  not). On the CPU this is plain indexing, exactly what the families did before.

Random draws (batch order, flips, shifts, rotations) always come from the run's CPU generators, on the host,
in the same order as before, so a run draws the same numbers on any device; the few numbers a batch needs on
the device (its indices, flips, offsets) travel together in one pinned tensor, one asynchronous copy
(:func:`send`). Nothing here synchronises the host with the device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEVICE_DATA_ENV", "DeviceAugment", "Rows", "device_data_budget", "fits_on_device", "send"]

#: the largest tensor (MB) kept on a CUDA device for batching (default: an eighth of its memory, at most 4 GiB);
#: 0: never (every batch goes through pinned host memory)
DEVICE_DATA_ENV = "MOELAB_DEVICE_DATA_MB"
MAX_DEFAULT_BYTES = 4 << 30


def device_data_budget(device: torch.device | str) -> int:
    """Bytes one data tensor may take on ``device`` to live there (0: none may; the CPU: 0)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return 0
    env = os.environ.get(DEVICE_DATA_ENV, "").strip()
    if env:
        return int(float(env) * (1 << 20))
    total = torch.cuda.get_device_properties(dev.index if dev.index is not None else 0).total_memory
    return min(MAX_DEFAULT_BYTES, total // 8)


def fits_on_device(t: Tensor, device: torch.device | str) -> bool:
    """Whether ``t`` should live on ``device`` for batching: a CUDA device, and ``t`` within the budget."""
    return t.numel() * t.element_size() <= device_data_budget(device) if torch.device(device).type == "cuda" \
        else False


def _pinned(shape: Sequence[int], dtype: torch.dtype, pin: bool = True) -> Tensor:
    # torch's caching host allocator reuses a pinned block only once the copies reading it have finished
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pin)


def send(tensors: Sequence[Tensor | None], device: torch.device | str, pack: bool | None = None
         ) -> list[Tensor | None]:
    """Small host tensors of one batch (1-D, equal length: indices, flips, offsets, labels) on ``device``:
    packed (``pack``; None: for any device but the CPU) into one int64 tensor, pinned for CUDA, and sent with
    one asynchronous copy (bool and integer values are converted back, 8-byte floats travel bit for bit);
    unpacked, for the CPU, returned as they are. None stays None."""
    dev = torch.device(device)
    if not (dev.type != "cpu" if pack is None else pack):
        return list(tensors)
    present = [t for t in tensors if t is not None]
    if not present:
        return list(tensors)
    n = present[0].shape[0]
    if any(t.dim() != 1 or t.shape[0] != n for t in present):
        raise ValueError(f"send: expected 1-D tensors of one length, got shapes {[tuple(t.shape) for t in present]}")
    buf = _pinned((len(present), n), torch.int64, pin=dev.type == "cuda")
    for i, t in enumerate(present):
        if t.dtype == torch.float64:
            buf[i].copy_(t.view(torch.int64))
        elif t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"send: only integer, bool and float64 tensors travel packed, got {t.dtype}")
        else:
            buf[i].copy_(t)
    moved = buf.to(dev, non_blocking=True)
    out, j = [], 0
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        row = moved[j]
        j += 1
        out.append(row.view(torch.float64) if t.dtype == torch.float64 else
                   row.bool() if t.dtype == torch.bool else row.to(t.dtype))
    return out


class Rows:
    """A host tensor whose rows (slices along ``dim``) are taken in batches onto ``device``.

    ``resident`` (None: :func:`fits_on_device`): the tensor is copied to ``device`` on first use and batches
    are gathered there; else each batch is gathered on the host, into pinned memory and copied
    asynchronously when ``device`` is CUDA (plain indexing when it is the CPU). ``take(idx)`` gives the same
    values either way; ``idx`` may be on the host or, for a resident tensor, already on the device."""

    def __init__(self, t: Tensor, device: torch.device | str, resident: bool | None = None, dim: int = 0):
        self.host, self.device, self.dim = t, torch.device(device), dim
        self.resident = fits_on_device(t, self.device) if resident is None else bool(resident)
        self._on_device: Tensor | None = None

    def __len__(self) -> int:
        return self.host.shape[self.dim]

    @property
    def data(self) -> Tensor:
        """The whole tensor where batches are gathered from (the device copy of a resident tensor)."""
        if not self.resident:
            return self.host
        if self._on_device is None:
            self._on_device = self.host.to(self.device)
        return self._on_device

    def take(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (1-D long) on the device."""
        if self.resident:
            return self.data.index_select(self.dim, idx.to(self.device, non_blocking=True))
        idx = idx.cpu()
        if self.device.type == "cpu":
            return self.host.index_select(self.dim, idx)
        shape = list(self.host.shape)
        shape[self.dim] = idx.shape[0]
        out = _pinned(shape, self.host.dtype, pin=self.device.type == "cuda")
        torch.index_select(self.host, self.dim, idx, out=out)
        return out.to(self.device, non_blocking=True)


class DeviceAugment:
    """:class:`moelab.data.augment.Augment` computed on ``device``, with the same random draws.

    The draws come from the CPU generator in Augment's order (shift rows, shift columns, then angle and zoom),
    on the host; the shift / zoom matrices live on the device; the images (gathered there) never leave it.
    On the CPU the result is bit for bit Augment's (``tests/data/test_feed.py`` holds the two together:
    change both or neither). On a GPU the geometry runs in float64: a float32 matmul there may run in TF32
    (:func:`moelab.device.configure`), whose ~1e-3 relative error would move many pixels across the seed
    pipeline's rounding to integers; in float64 the result is the CPU's up to a rare rounding tie."""

    def __init__(self, augment, device: torch.device | str):
        self.augment, self.device = augment, torch.device(device)
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.float64
        self.a, self.b = augment.a.to(self.device, self.dtype), augment.b.to(self.device, self.dtype)

    def draw(self, n: int, g: torch.Generator) -> list[Tensor | None]:
        """This batch's draws, on the host: ``[dy, dx, angle, zoom]`` (angle / zoom None without rotate / scale)."""
        aug = self.augment
        dy = torch.randint(0, 2 * aug.shift + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * aug.shift + 1, (n,), generator=g)
        if aug.rotate > 0 or aug.scale > 0:
            angle = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.radians(aug.rotate)
            zoom = 1 + (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * aug.scale
            return [dy, dx, angle, zoom]
        return [dy, dx, None, None]

    def __call__(self, raw: Tensor, draws: Sequence[Tensor | None]) -> Tensor:
        """uint8 (n, h0, w0) on the device + :meth:`draw` (on the device) -> float32 (n, h * w)."""
        aug = self.augment
        dy, dx, angle, zoom = draws
        x = raw.to(self.dtype)
        if angle is not None:
            x = _rotate_zoom(x, angle, zoom)
        x = torch.bmm(torch.bmm(self.a.index_select(0, dy), x), self.b.index_select(0, dx))  # (n, h, w)
        if aug.resize == "seed_half":  # scipy.ndimage.zoom returns uint8 for uint8 images: round half up, clip
            x.add_(0.5).floor_().clamp_(0, 255)
        return x.float().flatten(1).add_(aug.offset).div_(aug.scale_px)


def _rotate_zoom(x: Tensor, angle: Tensor, zoom: Tensor) -> Tensor:
    """:func:`moelab.data.augment.rotate_zoom` with its affine matrices built on ``angle``'s device."""
    n = x.shape[0]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.zeros(n, 2, 3, dtype=cos.dtype, device=cos.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.dtype), [n, 1, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(1)
