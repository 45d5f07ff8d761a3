"""``data.folder``: any image folder as the data set of the digit families and cifar10-moe, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moelab.cli import main
from moelab.train.evaluation import load_eval

CLASSES = ("bars", "columns", "diagonal")


def pattern(cls: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) float image in [0, 1]: class 0 horizontal bars, 1 vertical bars, 2 a diagonal band; a
    random phase and noise, so the classes must be learnt, not memorised."""
    yy, xx = np.mgrid[:size, :size]
    phase = rng.integers(0, 4)
    if cls == 0:
        img = ((yy + phase) % 4 < 2).astype(float)
    elif cls == 1:
        img = ((xx + phase) % 4 < 2).astype(float)
    else:
        img = (np.abs(yy - xx + phase - 2) < 2).astype(float)
    return np.clip(img * 0.8 + rng.normal(0, 0.15, img.shape), 0, 1)


def make_folder(root: Path, size: int = 12, n_train: int = 40, n_test: int = 15, rgb: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                g = (255 * pattern(c, size, rng)).astype(np.uint8)
                if rgb:  # colour that tells nothing: a random tint per image
                    tint = rng.uniform(0.6, 1.0, 3)
                    img = Image.fromarray((g[..., None] * tint).astype(np.uint8), "RGB")
                else:
                    img = Image.fromarray(g, "L")
                img.save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _no_kernels(monkeypatch):
    monkeypatch.setenv("MOELAB_KERNELS", "off")  # the PyTorch paths: building the fused kernels takes ~40 s


@pytest.fixture(scope="module")
def gray12(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("img") / "shapes")


@pytest.fixture(scope="module")
def rgb12(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("img") / "tinted", rgb=True)


SPARSE = ["--set", "data.resize=none", "--set", "data.val_size=30", "--set", "train.epochs=8",
          "--set", "train.batch_size=30", "--set", "train.lr=0.01", "--set", "compute.threads=1",
          "--set", "model.num_experts=4", "--set", "model.hidden=32", "--set", "model.dim=32"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_mnist_sparse_learns_a_folder_with_its_dense_baselines(gray12, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "mnist-sparse", "--quiet", "--set", f"data.folder={gray12}", *SPARSE, "--out", str(out)]) == 0
    s = _summary(out)
    assert set(s["models"]) == {"moe", "dense-equal-params", "dense-equal-flops"}
    assert s["models"]["moe"]["test_accuracy"] > 0.8  # chance: 1/3
    assert s["protocol"]["dataset"] == "folder:shapes" and s["protocol"]["val_size"] == 30
    log = (out / "run.log").read_text()
    assert "data: folder:shapes 12x12, 90 train / 30 val / 45 test" in log
    assert load_eval(out, "moe")[1]["classes"] == list(CLASSES)  # the reports' class names: the folder's


def test_digits_jacobs_reads_a_colour_folder_as_luma(rgb12, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "digits-jacobs", "--quiet", "--set", f"data.folder={rgb12}", "--set", "train.epochs=15",
                 "--set", "compute.threads=1", "--out", str(out)]) == 0
    s = _summary(out)
    assert {"moe", "single", "dense-equal-params", "dense-equal-flops"} <= set(s["models"])
    assert s["models"]["moe"]["test_accuracy"] > 0.8
    assert s["protocol"]["dataset"] == "folder:tinted"
    log = (out / "run.log").read_text()
    assert "folder:tinted has colour images: converted to grayscale" in log and "folder:tinted 12x12" in log


def test_tilt_task_on_a_folder_reports_the_latent_classes(gray12, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "mnist-sparse", "--quiet", "--set", f"data.folder={gray12}", *SPARSE, "--set",
                 "data.task=tilt", "--set", "data.rotate_deg=40", "--set", "train.shift=0",
                 "--set", "baselines.equal_cost=false", "--out", str(out)]) == 0
    moe = _summary(out)["models"]["moe"]
    assert "latent_expert_info" in moe and len(moe["latent_expert_matrix"]) == 3


def test_seed_half_resize_works_on_any_size(gray12, tmp_path):
    out = tmp_path / "r"
    assert main(["run", "mnist-sparse", "--quiet", "--set", f"data.folder={gray12}", *SPARSE, "--set",
                 "data.resize=seed_half", "--set", "train.epochs=1", "--set", "baselines.equal_cost=false",
                 "--out", str(out)]) == 0
    assert "folder:shapes 6x6" in (out / "run.log").read_text()


def test_cifar10_moe_on_a_folder_and_a_grey_one(tmp_path_factory, tmp_path):
    rgb32 = make_folder(tmp_path_factory.mktemp("img") / "rgb32", size=32, n_train=20, n_test=10, rgb=True)
    small = ["--set", "data.val_size=15", "--set", "train.batch_size=15", "--set", "train.epochs=2",
             "--set", "model.width=16", "--set", "eval.batch_size=500", "--set", "compute.threads=1",
             "--set", "baselines.equal_cost=false", "--quiet"]
    out = tmp_path / "r"
    assert main(["run", "cifar10-moe", "--set", f"data.folder={rgb32}", *small, "--out", str(out)]) == 0
    s = _summary(out)
    assert {"moe", "dense-reference"} <= set(s["models"]) and s["protocol"]["dataset"] == "folder:rgb32"
    assert 0 <= s["models"]["moe"]["test_accuracy"] <= 1
    gray20 = make_folder(tmp_path_factory.mktemp("img") / "gray20", size=20, n_train=10, n_test=5)
    out = tmp_path / "g"  # a 20x20 grey folder: the CNN pools globally; one channel repeated as RGB
    assert main(["run", "cifar10-moe", "--set", f"data.folder={gray20}", *small, "--set", "baselines.reference=false",
                 "--set", "train.epochs=1", "--out", str(out)]) == 0
    assert "folder:gray20 has grayscale images: their channel repeated" in (out / "run.log").read_text()


def _refused(capsys, argv: list[str], out: Path, *words: str) -> None:
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()


def test_refusals_name_the_path_or_the_keys_and_leave_no_run(tmp_path, capsys, gray12):
    missing = tmp_path / "nowhere"
    _refused(capsys, ["run", "mnist-sparse", "--set", f"data.folder={missing}"], tmp_path / "r1", str(missing))
    bad = tmp_path / "bad"
    (bad / "train" / "a").mkdir(parents=True)
    _refused(capsys, ["run", "digits-jacobs", "--set", f"data.folder={bad}"], tmp_path / "r2", str(bad), "test/")
    _refused(capsys, ["run", "mnist-sparse", "--set", "data.dataset=fashion-mnist", "--set", f"data.folder={gray12}"],
             tmp_path / "r3", "data.dataset", "data.folder")
    _refused(capsys, ["run", "cifar10-moe", "--set", f"data.folder={bad}"], tmp_path / "r4", str(bad))
    _refused(capsys, ["run", "cifar10-moe", "--set", f"data.folder={gray12}", "--set", "data.val_size=3"],
             tmp_path / "r5", "12x12", "data.folder", "17 px")
    _refused(capsys, ["run", "mnist-sparse", "--set", f"data.folder={make_folder(tmp_path / 'mini', size=3)}"],
             tmp_path / "r6", "data.resize", "data.folder", "3x3")


def test_folder_is_not_resumable():
    from moelab.experiments import get_family

    for fam in ("sparse_mlp", "jacobs", "cifar_moe"):
        f = get_family(fam)
        assert f.defaults["data"]["folder"] == ""
        assert "data.folder" not in f.resumable


def test_study_takes_a_folder_and_a_grid_of_folders(gray12, rgb12, tmp_path):
    common = [*SPARSE, "--set", "train.epochs=1", "--set", "baselines.equal_params=false", "--seeds", "1", "--quiet"]
    out = tmp_path / "study"
    assert main(["study", "mnist-sparse", "--set", f"data.folder={gray12}", "--grid", "model.k=2,3",
                 *common, "--out", str(out)]) == 0
    summaries = sorted(out.rglob("summary.json"))
    assert len(summaries) >= 2
    assert {json.loads(p.read_text()).get("protocol", {}).get("dataset") for p in summaries} >= {"folder:shapes"}
    out = tmp_path / "grid"
    assert main(["study", "mnist-sparse", "--grid", f"data.folder={gray12},{rgb12}", *common, "--out", str(out)]) == 0
    found = {json.loads(p.read_text()).get("protocol", {}).get("dataset") for p in out.rglob("summary.json")}
    assert {"folder:shapes", "folder:tinted"} <= found
