"""Image folders: ``<split>/<class>/*.png|jpg|jpeg`` as a directory or a (compressed) tar.

Splits ``train`` and ``test`` are required; class indices follow the sorted class folder
names of ``train``. All images must have the same height and width; grayscale images give
one channel, anything else three (a mix of grayscale and colour gives three).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from moelab.data.archive import error_text, is_tar_name, iter_tar
from moelab.errors import DataError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}

Key = tuple[str, str, str]  # (split, class, file name)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """uint8 (H, W) for grayscale images, (H, W, 3) otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
            im.load()
        if im.mode not in ("L", "RGB"):
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
        return np.asarray(im, dtype=np.uint8)
    except Image.UnidentifiedImageError:  # PIL names the in-memory buffer, not the file: say what it holds
        head = f"it starts with bytes {data[:8].hex(' ')}" if data else "it is empty"
        raise DataError(f"{where}: cannot decode the image (not PNG or JPEG data; {head}); "
                        "expected a readable PNG or JPEG file.") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{where}: cannot decode the image ({error_text(e)}); expected a readable PNG or JPEG "
                        "file.") from None


def _ignored(parts: list[str]) -> bool:
    """Hidden files/folders and macOS resource forks are not part of the data."""
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _split_key(name: str) -> tuple[str, Key] | None:
    """(prefix, key) for ``[prefix/]split/class/file``; None for anything else."""
    parts = name.split("/")
    if _ignored(parts):
        return None
    if len(parts) == 3 and parts[0] in SPLITS:
        return "", (parts[0], parts[1], parts[2])
    if len(parts) == 4 and parts[1] in SPLITS:
        return parts[0], (parts[1], parts[2], parts[3])
    return None


def _class_dir_key(name: str) -> tuple[str, tuple[str, str]] | None:
    parts = name.split("/")
    if _ignored(parts):
        return None
    if len(parts) == 2 and parts[0] in SPLITS:
        return "", (parts[0], parts[1])
    if len(parts) == 3 and parts[1] in SPLITS:
        return parts[0], (parts[1], parts[2])
    return None


def _read_dir(root: Path) -> tuple[dict[Key, np.ndarray], set[tuple[str, str]], dict[Key, str]]:
    if not (root / "train").is_dir():
        subdirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
        if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
            root = subdirs[0]
    for split in SPLITS:
        if not (root / split).is_dir():
            found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise DataError(
                f"Image folder {root}: expected sub-folders train/<class>/ and test/<class>/ holding "
                f"{'/'.join(IMAGE_SUFFIXES)} images; '{split}/' is missing (found: {', '.join(found) or 'nothing'})."
            )
    images: dict[Key, np.ndarray] = {}
    where: dict[Key, str] = {}
    class_dirs: set[tuple[str, str]] = set()
    for split in SPLITS:
        for cdir in sorted(p for p in (root / split).iterdir() if p.is_dir() and not p.name.startswith(".")):
            class_dirs.add((split, cdir.name))
            for f in sorted(cdir.iterdir()):
                if f.is_file() and _is_image(f.name) and not f.name.startswith("."):
                    key = (split, cdir.name, f.name)
                    try:
                        data = f.read_bytes()
                    except OSError as e:
                        raise DataError(f"Cannot read image {f}: {e.strerror or e}.") from None
                    images[key] = decode_image(data, f"Image {f}")
                    where[key] = str(f)
    return images, class_dirs, where


def _read_tar(archive: Path) -> tuple[dict[Key, np.ndarray], set[tuple[str, str]], dict[Key, str]]:
    images: dict[Key, np.ndarray] = {}
    where: dict[Key, str] = {}
    class_dirs: set[tuple[str, str]] = set()
    prefixes: set[str] = set()
    links: dict[Key, str] = {}
    by_name: dict[str, Key] = {}

    def want(name: str) -> bool:
        return _is_image(name) and _split_key(name) is not None

    for m in iter_tar(archive, want):
        if m.kind == "dir":
            ck = _class_dir_key(m.name)
            if ck:
                prefixes.add(ck[0])
                class_dirs.add(ck[1])
            continue
        sk = _split_key(m.name) if _is_image(m.name) else None
        if sk is None:
            continue
        prefix, key = sk
        prefixes.add(prefix)
        class_dirs.add(key[:2])
        where[key] = f"Archive {archive}, member '{m.name}'"
        by_name[m.name] = key
        if m.kind == "link":
            links[key] = m.link_target or ""
        else:
            images[key] = decode_image(m.data or b"", where[key])
    for key, target in links.items():
        tkey = by_name.get(target)
        if tkey is None or tkey not in images:
            raise DataError(f"{where[key]} is a link to '{target}', which is not an image in the archive.")
        images[key] = images[tkey]
    if len(prefixes) > 1:
        raise DataError(
            f"Archive {archive}: expected one image folder (train/<class>/..., test/<class>/...), "
            f"found several top-level folders: {', '.join(sorted(p or '.' for p in prefixes))}."
        )
    for split in SPLITS:
        if not any(s == split for s, _ in class_dirs):
            raise DataError(
                f"Archive {archive}: expected members train/<class>/<image> and test/<class>/<image> "
                f"(optionally under one top-level folder) with {'/'.join(IMAGE_SUFFIXES)} images; found no '{split}/' images."
            )
    return images, class_dirs, where


def read_image_folder(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes, train_x, train_y, test_x, test_y); x is uint8 (N, H, W, C), y int64."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"Image folder {path} does not exist.")
    if path.is_dir():
        images, class_dirs, where = _read_dir(path)
    elif is_tar_name(path.name):
        images, class_dirs, where = _read_tar(path)
    else:
        raise DataError(f"{path}: expected an image folder or a .tar/.tar.gz archive of one.")

    classes = sorted(c for s, c in class_dirs if s == "train")
    for split, cls in sorted(class_dirs):
        if not any(k[0] == split and k[1] == cls for k in images):
            raise DataError(
                f"Image folder {path}: class folder '{split}/{cls}/' holds no images "
                f"(expected {'/'.join(IMAGE_SUFFIXES)} files); remove it or add images."
            )
        if cls not in classes:
            raise DataError(
                f"Image folder {path}: class '{cls}' appears in '{split}/' but not in 'train/'; "
                f"train classes are {', '.join(classes)}."
            )

    class_index = {c: i for i, c in enumerate(classes)}
    keys = sorted(images, key=lambda k: (SPLITS.index(k[0]), class_index[k[1]], k[2]))
    ref = keys[0]
    ref_hw = images[ref].shape[:2]
    for k in keys:
        if images[k].shape[:2] != ref_hw:
            h, w = images[k].shape[:2]
            raise DataError(
                f"{where[k]}: image is {h}x{w} (HxW) but the images in {path} must all have one size; "
                f"expected {ref_hw[0]}x{ref_hw[1]} like {where[ref]}."
            )
    color = any(images[k].ndim == 3 for k in keys)

    out = []
    for split in SPLITS:
        split_keys = [k for k in keys if k[0] == split]
        x = np.empty((len(split_keys), *ref_hw, 3 if color else 1), dtype=np.uint8)
        for i, k in enumerate(split_keys):
            img = images[k]
            x[i] = img if img.ndim == 3 else img[..., None]
        y = np.fromiter((class_index[k[1]] for k in split_keys), dtype=np.int64, count=len(split_keys))
        out += [x, y]
    return classes, out[0], out[1], out[2], out[3]
