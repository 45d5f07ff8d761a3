"""Data sets for moelab: loading, caching, downloading, checking, and batch transforms.

    from moelab.data import load_dataset
    ds = load_dataset("mnist")          # also "fashion-mnist", "cifar10", "digits"
    ds.train_x  # uint8 (N, H, W, C);  ds.train_y  # int64 (N,)
"""

from moelab.data.check import check_datasets, format_check_report
from moelab.data.dataset import ImageDataset, as_tensors
from moelab.data.location import cache_dir, resolve_data_dir
from moelab.data.registry import DATASET_NAMES, download_dataset, load_dataset, load_image_folder

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "as_tensors",
    "cache_dir",
    "check_datasets",
    "download_dataset",
    "format_check_report",
    "load_dataset",
    "load_image_folder",
    "resolve_data_dir",
]
