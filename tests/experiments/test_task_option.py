"""``data.task``: a task with latent classes (``rotate``) as a data option of the digit and CIFAR families, and
the routing rows' I(latent class; expert) / H(latent class)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from moelab.analysis.routing import analyse_eval, info_ratio, label_expert_counts, latent_routing
from moelab.errors import ConfigError
from moelab.experiments import resolve_config
from moelab.experiments.runner import run_experiment
from moelab.train.evaluation import load_eval


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MOELAB_KERNELS", "off")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_info_ratio_by_hand():
    latent = torch.arange(40) % 4
    assert info_ratio(latent, latent, 4) == pytest.approx(1.0)  # expert = latent class: routing tells it all
    two = torch.tensor([0, 0, 1, 1] * 10)  # classes {0, 1} -> expert 0, {2, 3} -> expert 1: 1 of the 2 bits
    assert info_ratio(latent, two[latent], 4) == pytest.approx(0.5)
    independent = (torch.arange(40) // 4) % 2  # each class split evenly between the two experts
    assert info_ratio(latent, independent, 4) == pytest.approx(0.0, abs=1e-12)
    gates = torch.nn.functional.one_hot(latent, 4).float() * 0.7 + 0.1  # gates: the lead is the argmax
    assert info_ratio(latent, gates, 4) == pytest.approx(1.0)
    assert info_ratio(torch.zeros(8, dtype=torch.long), torch.arange(8) % 2, 1) == 0.0  # H = 0: nothing to tell
    assert label_expert_counts(latent, independent, 4, num_experts=3).tolist() == [[5, 5, 0]] * 4
    row = latent_routing(latent, gates, 4)
    assert row["latent_expert_info"] == 1.0 and row["latent_expert_matrix"] == [[10 if i == j else 0 for j in range(4)]
                                                                               for i in range(4)]
    assert latent_routing(None, gates, 4) == {} and latent_routing(latent, None, 4) == {}
    st = analyse_eval({"labels": latent % 2, "probs": torch.eye(2)[latent % 2], "gates": gates, "latent": latent})
    assert st["routing"]["latent_specialisation"] == pytest.approx(1.0)


@pytest.mark.parametrize("experiment", ["mnist-sparse", "cifar10-moe"])
@pytest.mark.parametrize("bad, said", [
    ("data.task=flip", "data.task = \"flip\" is out of range: expected one of 'classes', 'rotate', 'tilt'"),
    ("data.rotate_deg=180", "data.rotate_deg = 180.0 is out of range: expected a finite number > 0 and < 180"),
    ("data.rotate_deg=0", "data.rotate_deg = 0.0 is out of range"),
    ("data.rotate_crop=-1", "data.rotate_crop = -1 is out of range: expected an integer >= 0"),
    ("data.grayscale=1", "key 'data.grayscale' expects a boolean"),
])
def test_task_keys_are_checked_up_front(experiment, bad, said):
    _, cfg = resolve_config(experiment, ["data.task=rotate", "data.rotate_deg=45", "data.rotate_crop=20",
                                         "data.grayscale=true"])
    assert cfg["data"]["task"] == "rotate" and cfg["data"]["rotate_deg"] == 45.0
    with pytest.raises(ConfigError) as e:
        resolve_config(experiment, [bad])
    assert said in str(e.value) and "\n" not in str(e.value)


SMALL = ["data.train_limit=1200", "data.val_size=400", "data.test_limit=400", "train.epochs=2", "train.batch_size=100",
         "model.dim=16", "model.hidden=32", "model.num_experts=4", "baselines.equal_cost=false"]


def test_mnist_sparse_rotate_reports_latent_routing(real_data_dir, tmp_path):
    """task = rotate on a slice of MNIST: two balanced labels, 20x20 crops zoomed to 10x10 (``seed_half``) and
    augmented at that size, and the mixture's row says how much its routing tells of the digit; a study over
    such runs has the ``latent_expert_info`` column."""
    from moelab.study.grid import Cell
    from moelab.study.report import write_study_report

    cell = Cell(("data.task=rotate",))
    out = tmp_path / "study" / cell.slug / "seed-0"
    s = run_experiment("mnist-sparse", SMALL + ["data.task=rotate", "train.rotate=5"], out=out,
                       data_dir=str(real_data_dir), quiet=True)
    moe = s["models"]["moe"]
    assert 0 <= moe["latent_expert_info"] <= 1 and 0.5 < moe["test_accuracy"] <= 1  # chance: 0.5
    matrix = np.array(moe["latent_expert_matrix"])
    assert matrix.shape == (10, 4) and matrix.sum() == 400
    assert np.array(moe["class_expert_matrix"]).shape == (2, 4)
    tensors, meta = load_eval(out, "moe")
    y, latent = tensors["labels"], tensors["latent"]
    assert meta["classes"] == ["upright", "rotated 30"] and 190 <= y.sum() <= 200  # half of each digit rotated
    for c in range(10):  # half of every digit, up to one image
        assert abs(2 * int(y[latent == c].sum()) - int((latent == c).sum())) <= 1
    assert info_ratio(latent, tensors["gates"], 10) == pytest.approx(moe["latent_expert_info"], abs=1e-4)
    spec = {"experiment": "mnist-sparse", "grid": {"data.task": ["rotate"]}, "sets": [], "seeds": [0]}
    write_study_report(tmp_path / "study", [cell], spec)
    rows = list(csv.DictReader((tmp_path / "study" / "study.csv").open()))
    assert float(rows[0]["latent_expert_info"]) == pytest.approx(moe["latent_expert_info"], abs=1e-4)
    assert "I(latent; expert) / H" in (tmp_path / "study" / "study.md").read_text()


def test_digit_task_crop_is_refused_in_one_line(real_data_dir, tmp_path):
    for crop, said in ((40, "data.rotate_crop = 40 is out of range: expected a side in \\[4, 28\\] for the 28x28 "
                            "images of mnist"), (3, "data.rotate_crop = 3 is out of range")):
        with pytest.raises(ConfigError, match=said) as e:
            run_experiment("mnist-sparse", SMALL + ["data.task=rotate", f"data.rotate_crop={crop}"],
                           out=tmp_path / f"r{crop}", data_dir=str(real_data_dir), quiet=True)
        assert "\n" not in str(e.value)


def test_digit_task_classes_is_unchanged_and_odd_crops_halve(real_data_dir):
    """``classes`` loads what it always did (no latent labels); an odd crop (19 px) goes through the seed's
    cubic zoom (to 10 px) and the augmentation at that size."""
    from moelab.data.augment import Augment
    from moelab.data.transforms import train_val_split
    from moelab.experiments.digits import Splits, load_data
    from moelab.experiments.sparse_mlp import Data

    d = Data(train_limit=300, test_limit=100, val_size=100)
    plain = load_data(d, 0, str(real_data_dir))
    assert plain["shape"] == (14, 14) and plain["train_latent"] is None and plain["num_classes"] == 10
    sp = Splits(plain, 100, 0, True, None)
    assert sp.val_latent is None and sp.test_latent is None and sp.latent_classes == []
    rot = load_data(Data(train_limit=300, test_limit=100, val_size=100, task="rotate", rotate_crop=19,
                         rotate_deg=20.0, grayscale=True), 0, str(real_data_dir))
    assert rot["shape"] == (10, 10) and tuple(rot["train_raw"].shape) == (300, 19, 19)
    assert rot["classes"] == ["upright", "rotated 20"] and rot["latent_classes"] == plain["classes"]
    assert torch.equal(rot["train_latent"], plain["train_y"]) and torch.equal(rot["test_latent"], plain["test_y"])
    aug = Augment(rot, 1, 5.0)
    sp = Splits(rot, 100, 0, True, aug)
    assert aug(sp.raw[:50], torch.Generator().manual_seed(0)).shape == (50, 100)  # 19 px, shifted, zoomed to 10
    assert len(sp.val_latent) == 100 and len(sp.train_latent) == 200 and sp.latent_classes == plain["classes"]
    lat, y = rot["train_latent"], rot["train_y"]
    _, val_idx = train_val_split((2 * lat + y).numpy(), 100, seed=0)
    assert torch.equal(sp.val_latent, lat[val_idx]) and torch.equal(sp.val_y, y[val_idx])  # row by row
    assert torch.allclose(sp.val_x * sp.norm[1] + sp.norm[0], rot["train_x"][val_idx].float(), atol=1e-5)
    # the validation split is stratified by (latent class, label): about half of every digit is rotated
    for c in range(10):
        n, r = int((sp.val_latent == c).sum()), int(sp.val_y[sp.val_latent == c].sum())
        assert abs(2 * r - n) <= 2


def test_cifar_moe_rotate_runs_at_the_crop_size(monkeypatch, tmp_path):
    """cifar10-moe with task = rotate (22 px crops at 30 degrees): the CNN, its flip and shift augmentation and
    the flip + shift TTA at that size, a two-way head, and the latent routing in the routing row. Random images
    stand in for CIFAR-10 (the shapes are what is tested)."""
    import moelab.data
    from moelab.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), np.arange(300, dtype=np.int64) % 10
    fake = ImageDataset("cifar10", [f"c{i}" for i in range(10)], x, y, x[:100].copy(), y[:100].copy())
    monkeypatch.setattr(moelab.data, "load_dataset", lambda name, data_dir=None: fake)
    s = run_experiment("cifar10-moe", ["data.task=rotate", "data.grayscale=true", "data.val_size=100",
                                       "train.batch_size=50", "train.epochs=1", "model.width=8", "eval.tta=2",
                                       "baselines.equal_cost=false", "baselines.reference=false"],
                       out=tmp_path / "r", data_dir=str(tmp_path), quiet=True)
    moe = s["models"]["moe"]
    r = moe["routing"]
    assert 0 <= r["latent_expert_info"] <= 1 and np.array(r["latent_expert_matrix"]).sum() == 100
    assert len(r["latent_expert_matrix"]) == 10 and len(r["class_expert_matrix"]) == 2
    tensors, meta = load_eval(tmp_path / "r", "moe")
    assert tensors["probs"].shape == (100, 2) and meta["classes"] == ["upright", "rotated 30"]
    with pytest.raises(ConfigError, match=r"data.rotate_crop = 8 is out of range: expected a side in \[9, 32\]"):
        run_experiment("cifar10-moe", ["data.task=rotate", "data.rotate_crop=8", "data.val_size=100",
                                       "train.batch_size=50"], out=tmp_path / "bad", data_dir=str(tmp_path), quiet=True)


@pytest.mark.parametrize("experiment, sets, said", [
    ("cifar10-moe", ["data.task=tilt"], "train.flip = true is out of range: expected false with data.task = tilt"),
    ("cifar10-moe", ["data.task=tilt", "train.flip=false"], "eval.tta = 2 is out of range: expected 0 with data.task"),
    ("mnist-sparse", ["data.task=tilt", "train.rotate=15"], "train.rotate = 15.0 is out of range: expected below "
                                                             "data.rotate_deg / 2 = 15"),
    ("mnist-sparse", ["data.task=rotate", "data.rotate_deg=10", "train.rotate=6"], "train.rotate = 6.0"),
])
def test_tasks_refuse_augmentations_that_cross_the_label(experiment, sets, said, tmp_path, capsys):
    from moelab.cli import main

    assert main(["run", experiment, "--out", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err and not (tmp_path / "r").exists()
