"""What the CIFAR families share (``cifar_moe``, ``cifar_experts``): uint8 images as normalised, augmented batches
on the run's device (:class:`Images`), an epoch's shuffled batches, per-class limits."""

from __future__ import annotations

import numpy as np
import torch

from moelab.data.feed import Rows, send
from moelab.data.transforms import random_translate, translate, translate_offsets

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class Images:
    """uint8 NHWC images -> normalised float NCHW (channels_last) batches on ``device``, augmented on the whole
    batch at once (no per-image Python work), on that device. ``x`` and ``y`` (the labels metrics read) stay
    on the host; batches come through :class:`moelab.data.feed.Rows`: gathered on a CUDA device that the
    images fit on (``resident``; None: decided by their size), else gathered on the host, into pinned memory
    and copied asynchronously; on the CPU, plain indexing (the same batches on every path)."""

    def __init__(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, channels_last: bool,
                 device: torch.device | str = "cpu", resident: bool | None = None):
        self.x = x if torch.is_tensor(x) else torch.from_numpy(np.ascontiguousarray(x))  # (N, 32, 32, 3) uint8
        self.y = y if torch.is_tensor(y) else torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.channels_last = channels_last
        self.device = torch.device(device)
        self.mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
        self.rows = Rows(self.x, self.device, resident)
        self.labels = Rows(self.y, self.device, self.rows.resident)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def resident(self) -> bool:
        """Whether the images live on the device (and batches are gathered there)."""
        return self.rows.resident

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None, shift: int = 0,
              gen: torch.Generator | None = None) -> torch.Tensor:
        """Images ``idx`` on the device, normalised, then mirrored where ``flip``, then shifted by a random
        offset in [-shift, shift] per axis (edge fill) drawn from ``gen``."""
        return self._take(idx, flip, shift, gen, labels=False)[0]

    def take(self, idx: torch.Tensor, flip: torch.Tensor | None = None, shift: int = 0,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch(idx, flip, shift, gen), labels of idx)``, both on the device."""
        return self._take(idx, flip, shift, gen, labels=True)

    def _take(self, idx, flip, shift, gen, labels: bool):
        # the shift offsets are drawn here, on the host, as random_translate draws them (dy, then dx)
        dy = dx = None
        if shift > 0 and gen is not None:
            dy, dx = translate_offsets(len(idx), shift, self.x.shape[1], self.x.shape[2], gen)
        y = self.y[idx] if labels and not self.resident else None
        idx_d, flip, dy, dx, y = send([idx if self.resident else None, flip, dy, dx, y], self.device)  # one copy
        x = self.rows.take(idx_d if self.resident else idx)  # uint8 on the device: 4x less to copy than float
        if labels and self.resident:
            y = self.labels.take(idx_d)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # NCHW view of NHWC = channels_last
        x = (x - self.mean) / self.std
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if dy is not None:
            x = translate(x, dy, dx, fill="edge")
        elif shift > 0:  # no generator: torch's global one, on the device (as random_translate does)
            x = random_translate(x, shift, gen, fill="edge")
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x, y


def limit_per_class(y: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    keep = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        keep.append(idx[:per_class] if per_class > 0 else idx)
    return np.sort(np.concatenate(keep))


def index_batches(n: int, batch: int, gen: torch.Generator, hflip: bool, max_steps: int | None = None):
    """An epoch's shuffled batches (at most ``max_steps``): yields ``(indices, flip)`` (``flip`` a random
    half of the batch when ``hflip``, else None), drawn lazily from ``gen`` so the augmentation that
    follows each batch draws from it in the same order."""
    perm = torch.randperm(n, generator=gen)
    for step, i in enumerate(range(0, n, batch)):
        if max_steps is not None and step >= max_steps:
            return
        idx = perm[i : i + batch]
        yield idx, (torch.rand(len(idx), generator=gen) < 0.5 if hflip else None)


def image_batches(images: Images, batch: int, gen: torch.Generator, hflip: bool, shift: int,
                  max_steps: int | None = None, summed: bool = False):
    """:func:`index_batches` as augmented images: yields ``(x, y, loss weight)`` for
    :func:`moelab.train.trainer.minibatch_epoch`; the weight is 1 (a mean loss), or the batch size when
    ``summed`` (a loss summed over the batch, as airbench's recipe has it)."""
    for idx, flip in index_batches(len(images), batch, gen, hflip, max_steps):
        x, y = images.take(idx, flip, shift, gen)  # both on images.device
        yield x, y, (len(idx) if summed else 1.0)


class Mirrored:
    """``images``, every one mirrored, as :class:`moelab.train.trainer.Batches` (the experts' outputs on the
    flipped training images)."""

    def __init__(self, images: Images):
        self.images, self.device = images, images.device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images.batch(idx, flip=torch.ones(len(idx), dtype=torch.bool))


def images_of(images: Images, classes: list[int]) -> Images:
    keep = torch.isin(images.y, torch.tensor(classes))
    return Images(images.x[keep], images.y[keep], images.channels_last, images.device, resident=images.resident)
