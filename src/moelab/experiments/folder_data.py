"""``data.folder``: any image folder as the data set of an experiment family (the digit families and
``cifar10-moe``). The folder (``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/...``, or a .tar/.tar.gz of
one) is read by :func:`moelab.data.load_image_folder`; the run names it ``folder:<name>``. A folder replaces
``data.dataset``: setting both (``data.dataset`` other than the experiment's own) is refused by name."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from moelab.config import Text
from moelab.data.dataset import ImageDataset
from moelab.errors import ConfigError

EXPECTED = ('a non-blank path to an image folder (train/<class>/*.png|jpg|jpeg and test/<class>/...) or a .tar/.tar.gz '
            'archive of one ("": use data.dataset)')


class FolderRule(Text):
    """A path, or "" (no folder); blank text is refused."""

    expected = EXPECTED

    def ok(self, value: Any) -> bool:
        return value == "" or super().ok(value)


FolderPath = Annotated[str, FolderRule()]


def load_folder(folder: str) -> ImageDataset:
    """The image folder ``folder`` as an :class:`ImageDataset` named ``folder:<name>`` (a missing or
    malformed folder: the reader's one-line :class:`~moelab.errors.DataError` naming the path)."""
    from moelab.data import load_image_folder

    ds = load_image_folder(folder)
    return dataclasses.replace(ds, name=f"folder:{ds.name}")


def check_folder_and_dataset(base: dict, cfg: dict, where: str) -> None:
    """Refuse ``data.folder`` together with a ``data.dataset`` that is not ``base``'s (the experiment file's own):
    two data sets named at once. ``cfg`` is the config after the overrides."""
    data, base_data = cfg.get("data"), base.get("data")
    if not isinstance(data, dict) or not data.get("folder") or "dataset" not in data:
        return
    if not isinstance(base_data, dict) or data["dataset"] != base_data.get("dataset"):
        raise refuse_both(data["dataset"], data["folder"], base_data.get("dataset") if isinstance(base_data, dict)
                          else None, where)


def refuse_both(dataset: Any, folder: Any, own: Any, where: str) -> ConfigError:
    keep = f" (leave data.dataset at {own!r})" if own is not None else ""
    return ConfigError(f"{where}: data.dataset = {dataset!r} and data.folder = {folder!r} both name the data set; "
                       f"set only one of them: data.folder replaces data.dataset{keep}.")


def check_file_body(body: dict, where: str) -> None:
    """A config file that sets both ``data.dataset`` and ``data.folder`` itself: refused (:func:`refuse_both`)."""
    data = body.get("data")
    if isinstance(data, dict) and data.get("folder") and "dataset" in data:
        raise refuse_both(data["dataset"], data["folder"], None, where)


__all__ = ["EXPECTED", "FolderPath", "check_file_body", "check_folder_and_dataset", "load_folder"]
