"""The named data sets: where their files are looked for, how they are downloaded and decoded."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moelab.data import cifar
from moelab.data.archive import TAR_SUFFIXES, is_tar_name
from moelab.data.cache import load_with_cache
from moelab.data.dataset import ImageDataset
from moelab.data.download import DownloadFailed, RemoteFile, content_md5, download_file, mirrors_from_env
from moelab.data.idx import read_idx_pair
from moelab.data.image_folder import read_image_folder
from moelab.data.location import cache_dir, is_writable_dir, resolve_data_dir, search_dirs
from moelab.errors import DataError

DATASET_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "digits")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar_10": "cifar10"}

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# SHA-256 of the canonical .gz files; MNIST mirrors that recompress are checked by the MD5 of the
# uncompressed content instead (the well-known reference values).
MNIST_FILES = (
    RemoteFile("train-images-idx3-ubyte.gz", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
               "6bbc9ace898e44ae57da46a324031adb"),
    RemoteFile("train-labels-idx1-ubyte.gz", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
               "a25bea736e30d166cdddb491f175f624"),
    RemoteFile("t10k-images-idx3-ubyte.gz", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
               "2646ac647ad5339dbf082846283269ea"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
               "27ae3e4e09519cfbb04c329615203637"),
)
FASHION_FILES = (  # content MD5s: of the uncompressed files (Debian's dataset-fashion-mnist recompresses them)
    RemoteFile("train-images-idx3-ubyte.gz", "08dc20ab1689590a0bcd66e874647b6ee8464e2d501b5a3f1f78831db19a3fdc",
               "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    RemoteFile("train-labels-idx1-ubyte.gz", "b0197879cbda89f3dc7b894f9fd52b858e68ea4182b6947c9d8c2b67e5f18dcc",
               "9018921c3c673c538a1fc5bad174d6f9"),
    RemoteFile("t10k-images-idx3-ubyte.gz", "78dcbbfb5a27efaf1b6c1d616caca68560be8766c5bffcb2791df9273a534229",
               "8181f5470baa50b63fa0f6fddb340f0a"),
    RemoteFile("t10k-labels-idx1-ubyte.gz", "42bd18137a62d5998cdeae52bf3a0676ac6b706f5cf8439b47bb5b151ae3dccf",
               "15d484375f8d13e6eb1aabb0c3f46965"),
)
CIFAR_FILES = (
    RemoteFile(cifar.ARCHIVE_NAME, "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class Spec:
    name: str
    folder: str  # sub-folder of the data dir
    kind: str  # "idx" or "cifar10"
    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]
    classes: tuple[str, ...] = ()


SPECS = {
    "mnist": Spec("mnist", "mnist", "idx",
                  ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
                  MNIST_FILES, tuple(str(i) for i in range(10))),
    "fashion-mnist": Spec("fashion-mnist", "fashion-mnist", "idx",
                          ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
                          FASHION_FILES, FASHION_CLASSES),
    "cifar10": Spec("cifar10", "cifar10", "cifar10", ("https://www.cs.toronto.edu/~kriz/",), CIFAR_FILES,
                    tuple(cifar.CLASSES)),
}


@dataclass(frozen=True)
class Source:
    """Located files of a data set: ``kind`` is "idx", "cifar-python" or "image-folder"."""

    kind: str
    paths: tuple[Path, ...]

    def describe(self) -> str:
        if len(self.paths) == 1:
            return str(self.paths[0])
        folder = self.paths[0].parent
        if all(p.parent == folder for p in self.paths):
            return f"{folder}/ ({', '.join(p.name for p in self.paths)})"
        return ", ".join(map(str, self.paths))


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DataError(f"Unknown data set {name!r}; valid names are: {', '.join(DATASET_NAMES)}.")
    return key


def _find_idx(folder: Path) -> tuple[list[Path], list[str]]:
    found, missing = [], []
    for stem in IDX_STEMS:
        hit = next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
        if hit is None:
            missing.append(stem)
        else:
            found.append(hit)
    return found, missing


def _image_folder_candidates(folder: Path, spec: Spec, data_dir: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    if folder == data_dir / spec.folder and (folder / "train").is_dir():
        out.append(folder)
    for p in sorted(folder.iterdir()):
        low = p.name.lower()
        if not low.startswith(("cifar10", "cifar-10")) or p.name == cifar.ARCHIVE_NAME:
            continue
        if (p.is_file() and is_tar_name(low)) or (p.is_dir() and (p / "train").is_dir()):
            out.append(p)
    return out


def _locate_in(spec: Spec, dirs: Sequence[Path], root: Path) -> tuple[Source | None, list[str]]:
    notes: list[str] = []
    if spec.kind == "idx":
        for d in dirs:
            found, missing = _find_idx(d)
            if not missing:
                return Source("idx", tuple(found)), notes
            if found:
                notes.append(f"{d} holds only {', '.join(p.name for p in found)} (missing {', '.join(missing)}).")
        return None, notes
    for d in dirs:  # the canonical format wins over an image-folder copy
        for candidate in (d / cifar.ARCHIVE_NAME, d / cifar.BATCH_DIR):
            if candidate.exists():
                return Source("cifar-python", (candidate,)), notes
    for d in dirs:
        hits = _image_folder_candidates(d, spec, root)
        if hits:
            return Source("image-folder", (hits[0],)), notes
    return None, notes


def locate(name: str, data_dir: str | os.PathLike | None = None) -> tuple[Source | None, list[Path], list[str]]:
    """(source or None, folders looked in, notes about partial finds) for a named data set (not digits)."""
    spec = SPECS[canonical_name(name)]
    root = resolve_data_dir(data_dir)
    dirs = search_dirs(spec.folder, root)
    source, notes = _locate_in(spec, dirs, root)
    return source, dirs, notes


def missing_message(spec: Spec, root: Path, dirs: Sequence[Path], notes: Sequence[str], download_note: str) -> str:
    looked = ", ".join(str(d) for d in dirs)
    if spec.kind == "idx":
        put = (f"Put the four IDX files {', '.join(f.filename for f in spec.files)} (gzipped, or uncompressed "
               f"without the .gz) into {root / spec.folder}/")
    else:
        put = (f"Put {cifar.ARCHIVE_NAME} (from {spec.mirrors[0]}{cifar.ARCHIVE_NAME}) or its extracted "
               f"{cifar.BATCH_DIR}/ folder, or an image-folder archive named cifar10*.tar.gz holding "
               f"train/<class>/*.png|jpg and test/<class>/*.png|jpg, into {root / spec.folder}/ or {root}/")
    parts = [f"Data set '{spec.name}' not found. Looked in: {looked}.", *notes,
             f"{put}, or point --data-dir or MOELAB_DATA_DIR at the folder that holds them.", download_note]
    return " ".join(p for p in parts if p)


def _present(folder: Path, remote: RemoteFile) -> bool:
    """The file, or its uncompressed form, is already there."""
    stem = remote.filename.removesuffix(".gz")
    return (folder / remote.filename).is_file() or (folder / stem).is_file()


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first."""
    out = []
    while not folder.exists() and folder != folder.parent:
        out.append(folder)
        folder = folder.parent
    return out


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first that is not empty
        try:
            folder.rmdir()
        except OSError:
            return


def download_dataset(name: str, data_dir: str | os.PathLike | None = None,
                     mirrors: Sequence[str] | None = None) -> Path:
    """Download a data set's canonical files into ``<data_dir>/<name>/`` (or the cache folder when the
    data dir is read-only); return that folder. Mirrors: argument > ``MOELAB_MIRRORS`` > built-in.
    Folders created for a download that then fails are removed again."""
    spec = SPECS[canonical_name(name)]
    root = resolve_data_dir(data_dir)
    target = root / spec.folder
    created = _missing_ancestors(target)
    if not is_writable_dir(target):
        _remove_empty(created)
        target = cache_dir() / spec.folder
        created = _missing_ancestors(target)
        if not is_writable_dir(target):
            _remove_empty(created)
            raise DataError(f"Cannot download {spec.name}: neither {root / spec.folder} nor {target} is writable.")
    mirror_list = list(mirrors) if mirrors is not None else (mirrors_from_env() or list(spec.mirrors))
    try:
        for remote in spec.files:
            if not _present(target, remote):
                download_file(remote, target, mirror_list, dataset=spec.name)
    except BaseException:
        _remove_empty(created)
        raise
    return target


def _decode(spec_name: str, source: Source):
    if source.kind == "idx":
        num_classes = len(SPECS[spec_name].classes)
        train_x, train_y = read_idx_pair(source.paths[0], source.paths[1], num_classes)
        test_x, test_y = read_idx_pair(source.paths[2], source.paths[3], num_classes)
        return list(SPECS[spec_name].classes), train_x, train_y, test_x, test_y
    if source.kind == "cifar-python":
        return cifar.read_cifar10_python(source.paths[0])
    return read_image_folder(source.paths[0])


def load_source(name: str, source: Source, *, cache: bool = True, refresh: bool = False) -> ImageDataset:
    """Decode a located source, through the decoded-array cache."""
    if source.kind == "idx":
        check_not_another(name, source)
    ds = load_with_cache(name, source.paths, source.describe(), lambda: _decode(name, source),
                         use_cache=cache, refresh=refresh)
    if source.kind == "image-folder":
        check_classes(name, ds.classes, source.paths[0])
    return ds


def check_not_another(name: str, source: Source) -> None:
    """MNIST and Fashion-MNIST share their file names, and a data folder is also searched flat: refuse the
    files of one loaded as the other (their training labels' content MD5 tells them apart, 60 kB read)."""
    labels = next((p for p in source.paths if p.name.startswith("train-labels")), None)
    if labels is None:
        return
    md5 = content_md5(labels)
    for other, spec in SPECS.items():
        if other != name and any(f.content_md5 == md5 for f in spec.files if f.filename.startswith("train-labels")):
            raise DataError(f"{labels}: these are the {other} files, not {name}'s (their content is {other}'s "
                            f"canonical data). Put the {name} files into {labels.parent.parent / SPECS[name].folder}/ "
                            f"or point --data-dir at the folder that holds {name}/.")


def check_classes(name: str, classes: Sequence[str], where: Path) -> None:
    """An image folder of a named data set must hold exactly its classes: an extra folder would give
    labels the model has no output for (an IndexError deep in training), a missing one a silent gap."""
    spec = SPECS.get(name)
    if spec is None or not spec.classes or sorted(classes) == sorted(spec.classes):
        return
    extra = [c for c in classes if c not in spec.classes]
    missing = [c for c in spec.classes if c not in classes]
    found = []
    if extra:
        found.append(f"unexpected class folder{'s' if len(extra) > 1 else ''} "
                     f"{', '.join(f'train/{c}/' for c in extra)}")
    if missing:
        found.append(f"no folder for {', '.join(missing)}")
    raise DataError(
        f"Image folder {where}: {name} has the {len(spec.classes)} classes {', '.join(spec.classes)}, but "
        f"found {'; '.join(found)}. Remove or rename the class folders (in train/ and test/) so that they are "
        f"exactly these, or load the folder under its own name (moelab.data.load_image_folder)."
    )


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True, *,
                 mirrors: Sequence[str] | None = None, cache: bool = True) -> ImageDataset:
    """Load a named data set (see ``DATASET_NAMES``), downloading it if missing and ``download``."""
    name = canonical_name(name)
    if name == "digits":
        from moelab.data.digits import load_digits_dataset

        return load_digits_dataset()
    spec = SPECS[name]
    source, dirs, notes = locate(name, data_dir)
    if source is None:
        root = resolve_data_dir(data_dir)
        if not download:
            raise DataError(missing_message(spec, root, dirs, notes, "Automatic download is off."))
        try:
            target = download_dataset(name, data_dir, mirrors)
        except DownloadFailed as e:
            raise DataError(missing_message(
                spec, root, dirs, notes, f"Download failed for {e.filename}: {'; '.join(e.failures)}.")) from None
        source, _ = _locate_in(spec, [target], root)
        if source is None:  # pragma: no cover - download_dataset() guarantees the files
            raise DataError(missing_message(spec, root, dirs, notes, f"Downloaded into {target} but found nothing."))
    return load_source(name, source, cache=cache)


def load_image_folder(path: str | os.PathLike, name: str | None = None, *, cache: bool = True) -> ImageDataset:
    """Load any ``<split>/<class>/*.png|jpg|jpeg`` folder or .tar/.tar.gz archive of one (train and test splits)."""
    path = Path(path).expanduser().absolute()
    if name is None:
        name = path.name
        for suffix in sorted(TAR_SUFFIXES, key=len, reverse=True):
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
    if not path.exists():
        raise DataError(f"Image folder {path} does not exist.")
    return load_with_cache(name, (path,), str(path), lambda: read_image_folder(path), use_cache=cache)
