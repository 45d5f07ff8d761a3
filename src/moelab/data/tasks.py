"""Tasks built on a data set: the classes as they are, or a task whose classes are *latent* clusters.

``rotate`` (Chen, Deng, Wu, Gu, Li, "Towards Understanding the Mixture-of-Experts Layer in Deep
Learning", NeurIPS 2022, CIFAR-10-Rotate): each image is rotated by ``deg`` degrees or left upright
(half of each class, drawn by a seeded generator per split), and the label is "rotated or not"; the
original class becomes the latent label that a mixture's routing can be measured against
(I(latent class; expert) / H). Both kinds of image go through the same bilinear resampling and the
same centre crop, so neither black corners nor interpolation blur tell them apart.

``tilt`` (ours): the same binary task without the resampling cue. ``rotate`` resamples only the rotated
half (an upright image is read at exact pixel positions, a rotated one is interpolated, which blurs it):
a network can tell the halves apart from the blur alone (measured: dense CNNs of ``cifar10-moe`` reach
95-96% test accuracy on *white-noise* images after one epoch; one number per image, the mean absolute
Laplacian, separates the halves with AUC 0.84 on MNIST and 0.73 on CIFAR-10). ``tilt`` turns every image,
by ``-deg / 2`` (label 0) or ``+deg / 2`` (label 1): bilinear rotation by ``-a`` is the mirror image of
rotation by ``+a``, so both halves are blurred alike and only the direction tells them apart. (A horizontal
flip turns one tilt into the other: the families refuse flip augmentation with it.)

The leak guard: a colour JPEG copy of CIFAR-10 carries 16x16 chroma blocks whose edges cross the image
centre and turn with it (a dense CNN reads the label off them: 100% test accuracy from epoch 2 on our
JPEG-75 copy); ``grayscale`` removes colour before rotating. A run of a rotate task should still show
that a dense network does not solve it trivially (its dense rows do).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from moelab.data.dataset import ImageDataset
from moelab.errors import MoelabError

TASKS = ("classes", "rotate", "tilt")


@dataclasses.dataclass(eq=False)
class TaskDataset(ImageDataset):
    """An :class:`ImageDataset` whose labels are a task's; ``*_latent`` are the original classes."""

    train_latent: np.ndarray | None = dataclasses.field(default=None, repr=False)
    test_latent: np.ndarray | None = dataclasses.field(default=None, repr=False)
    latent_classes: list[str] = dataclasses.field(default_factory=list)


def rotate(x: np.ndarray, deg: float, crop: int) -> np.ndarray:
    """uint8 (N, H, W, C) rotated counter-clockwise by ``deg`` degrees (bilinear, about the centre) and
    centre-cropped to ``crop`` x ``crop`` (``deg = 0``: the same path, so upright images are treated alike)."""
    return _rotate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), deg, crop).round().clamp(0, 255).to(
        torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _rotate(t: torch.Tensor, deg: float, crop: int) -> torch.Tensor:
    n, c, h, w = t.shape
    a = torch.deg2rad(torch.tensor(float(deg)))
    theta = torch.tensor([[torch.cos(a), -torch.sin(a), 0.0], [torch.sin(a), torch.cos(a), 0.0]]).expand(n, 2, 3)
    grid = F.affine_grid(theta, (n, c, h, w), align_corners=False)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    top, left = (h - crop) // 2, (w - crop) // 2
    return out[:, :, top:top + crop, left:left + crop]


def valid_crop(h: int, w: int, deg: float) -> int:
    """The largest centre crop in which every rotated pixel is interpolated from image pixels only (no
    zero padding blended in: a blended corner would give the rotation away)."""
    ones = torch.ones(1, 1, h, w)
    for crop in range(min(h, w), 0, -1):
        if bool((_rotate(ones, deg, crop) > 1 - 1e-4).all()):
            return crop
    raise MoelabError(f"no pixel of a {h}x{w} image stays inside the frame when rotated by {deg} degrees.")


def to_gray(x: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, H, W, 3) grey (ITU-R 601 luma in every channel: the network is unchanged)."""
    if x.shape[-1] == 1:
        return x
    luma = (x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).round().clip(0, 255)
    return np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)


def make_task(ds: ImageDataset, task: str = "classes", *, deg: float = 30.0, crop: int = 0,
              grayscale: bool = False, seed: int = 0) -> ImageDataset:
    """``ds`` as the task asks: ``classes`` returns it (grey if asked); ``rotate`` / ``tilt`` the binary tasks
    above (``crop`` 0: :func:`valid_crop`, the largest centre square with no empty corner)."""
    if task not in TASKS:
        raise MoelabError(f"data.task must be one of {', '.join(TASKS)}, got {task!r}.")
    tr_x, te_x = (to_gray(ds.train_x), to_gray(ds.test_x)) if grayscale else (ds.train_x, ds.test_x)
    if task == "classes":
        return dataclasses.replace(ds, train_x=tr_x, test_x=te_x) if grayscale else ds
    angles = (0.0, deg) if task == "rotate" else (-deg / 2, deg / 2)
    h, w = ds.image_shape[:2]
    crop = crop or valid_crop(h, w, max(abs(a) for a in angles))
    if not 1 <= crop <= min(h, w):
        raise MoelabError(f"data.rotate_crop must be in [1, {min(h, w)}] for {ds.name} ({h}x{w}), got {crop}.")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split, x, y in (("train", tr_x, ds.train_y), ("test", te_x, ds.test_y)):
        turned = np.zeros(len(y), dtype=np.int64)
        for cls in np.unique(y):  # half of every class rotated: the latent classes are balanced in both labels
            idx = np.flatnonzero(y == cls)
            pick = idx[torch.randperm(len(idx), generator=g).numpy()[: len(idx) // 2]]
            turned[pick] = 1
        images = np.empty((len(y), crop, crop, x.shape[-1]), dtype=np.uint8)
        for flag, angle in enumerate(angles):
            sel = np.flatnonzero(turned == flag)
            for i in range(0, len(sel), 4096):  # bounded memory for the float copy
                images[sel[i:i + 4096]] = rotate(x[sel[i:i + 4096]], angle, crop)
        out[split] = (images, turned)
    classes = ["upright", f"rotated {deg:g}"] if task == "rotate" else [f"tilted {-deg / 2:g}", f"tilted +{deg / 2:g}"]
    return TaskDataset(name=f"{ds.name}-{task}{deg:g}", classes=classes,
                       train_x=out["train"][0], train_y=out["train"][1], test_x=out["test"][0],
                       test_y=out["test"][1], source=ds.source, checksum=ds.checksum,
                       train_latent=ds.train_y.copy(), test_latent=ds.test_y.copy(), latent_classes=list(ds.classes))


def task_from_config(ds: ImageDataset, d, seed: int, min_side: int = 1, why: str = "") -> ImageDataset:
    """:func:`make_task` with the options of a config's ``data`` section ``d`` (``task``, ``rotate_deg``,
    ``rotate_crop``, ``grayscale``); a crop side outside [``min_side`` (``why``), the image side] is refused as a
    :class:`~moelab.errors.ConfigError` naming ``data.rotate_crop``."""
    from moelab.config import refuse

    if d.task != "classes":
        h, w = ds.image_shape[:2]
        side = d.rotate_crop or valid_crop(h, w, d.rotate_deg if d.task == "rotate" else d.rotate_deg / 2)
        if not min_side <= side <= min(h, w):
            auto = f", which is {side} px here" if not d.rotate_crop else ""
            raise refuse("data.rotate_crop", d.rotate_crop, f"a side in [{min_side}, {min(h, w)}] for the {h}x{w} "
                         f"images of {ds.name}{' (' + why + ')' if why else ''}, or 0 (the largest crop with no "
                         f"empty corner{auto})")
    return make_task(ds, d.task, deg=d.rotate_deg, crop=d.rotate_crop, grayscale=d.grayscale, seed=seed)
