"""The ``cifar_moe`` family's images: CIFAR-10 or an image folder, limited per class, made into ``data.task``,
split into train / validation / test :class:`moelab.experiments.cifar.Images`."""

from __future__ import annotations

import torch

from moelab.config import refuse
from moelab.errors import ConfigError
from moelab.experiments.cifar import Images, limit_per_class
from moelab.experiments.cifar_moe.config import Config
from moelab.train.run import Run


def load_images(cfg: Config, run: Run) -> dict:
    """The train / val / test :class:`Images` of ``data.task`` (:func:`moelab.data.tasks.task_from_config`, made
    of the images kept); a rotate task's crop runs through the CNN and its augmentation at its own size, and
    its original classes are ``test_latent`` (None for ``classes``), for the routing rows."""
    import dataclasses

    from moelab.data import load_dataset
    from moelab.data.tasks import task_from_config
    from moelab.data.transforms import train_val_split
    from moelab.train.run import seeded_generator

    d, cl = cfg.data, cfg.compute.channels_last
    ds = load_rgb_folder(d.folder, run) if d.folder else load_dataset(d.dataset, data_dir=run.data_dir)
    classes = list(range(len(ds.classes)))
    tr_keep = limit_per_class(ds.train_y, classes, d.train_per_class)
    te_keep = limit_per_class(ds.test_y, classes, d.test_per_class)
    ds = task_from_config(dataclasses.replace(ds, train_x=ds.train_x[tr_keep], train_y=ds.train_y[tr_keep],
                                              test_x=ds.test_x[te_keep], test_y=ds.test_y[te_keep]), d,
                          int(seeded_generator(run.seed, "task").initial_seed()), min_side=9,
                          why="the CNN's 2x2 whitening and three 2x poolings")
    x, y, latent = ds.train_x, ds.train_y, getattr(ds, "train_latent", None)
    if d.val_size >= len(y):
        raise refuse("data.val_size", d.val_size, f"fewer than the {len(y)} training images")
    if cfg.train.batch_size > len(y) - d.val_size:
        raise refuse("train.batch_size", cfg.train.batch_size,
                     f"at most the {len(y) - d.val_size} training images left after data.val_size")
    strata = y if latent is None else latent * len(ds.classes) + y  # a task: by (latent class, label)
    tr, va = train_val_split(strata, d.val_size, seed=run.seed, stratified=True)
    dev = run.device
    return {"train": Images(x[tr], y[tr], cl, dev), "val": Images(x[va], y[va], cl, dev),
            "test": Images(ds.test_x, ds.test_y, cl, dev), "classes": list(ds.classes),
            "test_latent": None if latent is None else torch.from_numpy(ds.test_latent),
            "latent_classes": list(getattr(ds, "latent_classes", [])), "dataset": ds.name}


MIN_FOLDER_SIDE = 17  # 16 after the 2x2 whitening, 2 after three 2x poolings


def load_rgb_folder(folder: str, run: Run):
    """``data.folder`` (:func:`moelab.experiments.folder_data.load_folder`) as RGB images: a grayscale folder's one
    channel repeated three times (said in the log); sides under :data:`MIN_FOLDER_SIDE` px refused (the CNN pools
    globally, so any larger size runs, at a cost that grows with the pixels)."""
    import dataclasses

    from moelab.experiments.folder_data import load_folder

    ds = load_folder(folder)
    h, w, c = ds.image_shape
    if min(h, w) < MIN_FOLDER_SIDE:
        raise ConfigError(f"data.folder = {folder!r} holds {h}x{w} images; cifar10-moe needs a side of at least "
                          f"{MIN_FOLDER_SIDE} px (after the CNN's 2x2 whitening and three 2x poolings its last block "
                          f"must see 2x2 positions: a block expert given one image of 1x1 cannot batch-normalise).")
    if c == 1:
        ds = dataclasses.replace(ds, train_x=ds.train_x.repeat(3, axis=-1), test_x=ds.test_x.repeat(3, axis=-1))
        run.log(f"data: {ds.name} has grayscale images: their channel repeated as R, G and B")
    run.log(f"data: {ds.name}, {h}x{w} images, {len(ds.classes)} classes ({', '.join(ds.classes)})")
    return ds
