"""Seed-2 experiments (family ``jacobs``) end to end through the runner, on small slices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from equal_cost_checks import assert_closest_width

from moelab.cost import count_params, flops_per_example
from moelab.errors import ConfigError
from moelab.experiments import resolve_config
from moelab.experiments.runner import run_experiment
from moelab.models.mlp_mixture import SeedMLP, mlp


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _mnist_dir() -> str:
    d = os.environ.get("MOELAB_DATA_DIR")
    if not d:
        pytest.skip("MOELAB_DATA_DIR is not set (MNIST tests need the data set there)")
    if not (Path(d) / "mnist").is_dir():
        pytest.skip(f"no MNIST under MOELAB_DATA_DIR={d}")
    return d


MODELS = {"moe", "single", "dense-equal-params", "dense-equal-flops"}


def _check_summary(s: dict, out: Path, num_experts: int, dense, probe: torch.Tensor, num_classes: int = 10) -> None:
    """``dense(hidden)``: the family's dense network of that width, whose FLOPs are counted on ``probe``."""
    assert set(s["models"]) == MODELS
    for m in s["models"].values():
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["test_error_pct"] == pytest.approx(100 * (1 - m["test_accuracy"]), abs=1e-3)
        assert m["params"] > 0 and m["flops_per_example"] > 0 and m["train_time_s"] >= 0
    _check_equal_cost(s["models"], dense, probe)
    assert s["test_accuracy"] == s["models"]["moe"]["test_accuracy"]
    share = s["lead_share"]
    assert len(share) == num_experts and sum(share) == pytest.approx(1.0, abs=1e-5)
    assert sum(s["lead_share_pct"]) == pytest.approx(100.0, abs=0.05)
    mat = s["class_expert_matrix"]
    assert len(mat) == num_classes and all(len(r) == num_experts for r in mat)
    n_test = sum(map(sum, mat))
    assert [round(sum(r[e] for r in mat) / n_test, 4) for e in range(num_experts)] == \
        pytest.approx(share, abs=1e-4)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["moe"]["test_accuracy"] == s["models"]["moe"]["test_accuracy"]
    assert (out / "eval" / "moe.safetensors").is_file() and (out / "eval" / "single.safetensors").is_file()
    assert (out / "eval" / "dense-equal-params.safetensors").is_file()


def _check_equal_cost(models: dict, dense, probe: torch.Tensor) -> None:
    """The dense-gated mixture runs every expert, so one dense MLP has both its parameters and its FLOPs:
    trained once, the FLOPs row repeats the params row. Its rows report the exact counts of ``dense`` at its
    width, and that width is the closest to the mixture's counts (within half a hidden unit's cost)."""
    moe, p, f = models["moe"], models["dense-equal-params"], models["dense-equal-flops"]

    def params(h):
        return count_params(dense(h))

    def flops(h):
        return flops_per_example(dense(h), probe)

    assert p["params"] == params(p["hidden"])
    assert f["flops_per_example"] == pytest.approx(flops(f["hidden"]), abs=0.1)  # summaries round FLOPs to 0.1
    assert_closest_width(params, p["hidden"], moe["params"], "dense-equal-params")
    assert_closest_width(flops, f["hidden"], moe["flops_per_example"], "dense-equal-flops")
    assert f["same_model_as"] == "dense-equal-params" and "same_model_as" not in p
    assert f["test_accuracy"] == p["test_accuracy"] and f["hidden"] == p["hidden"]
    assert f["matched_to"] == "flops_per_example" and p["matched_to"] == "params"
    assert "smaller network" in models["single"]["note"]
    assert models["single"]["params"] < moe["params"]


def test_digits_jacobs_default_learns(tmp_path):
    out = tmp_path / "run"
    s = run_experiment("digits-jacobs", ["train.epochs=10"], out=out, quiet=True)
    _check_summary(s, out, resolve_config("digits-jacobs")[1]["model"]["num_experts"], lambda h: mlp(64, h, 10),
                   torch.zeros(4, 64))
    assert s["models"]["moe"]["test_accuracy"] > 0.85  # chance is 0.10
    assert s["models"]["single"]["test_accuracy"] > 0.8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"moe", "single", "dense-equal-params"}  # the FLOPs row: trained once
    # 4 experts 64-16-10, the 64-16-4 gate, and the combine sum_i g_i z_i (4 gates x 10 classes)
    assert s["models"]["moe"]["flops_per_example"] == 2 * (4 * (64 * 16 + 16 * 10) + 64 * 16 + 16 * 4 + 4 * 10)
    assert all(len(r["lead_share"]) == 4 for r in rows if r["phase"] == "moe")


def test_modern_options_run(tmp_path):
    """Every loss and balance option trains (digits, 3 epochs each)."""
    for i, (loss, balance) in enumerate([("jacobs_loglik", "importance"), ("logit_mixture_ce", "switch"),
                                         ("competitive", "entropy"), ("mixture_ce", "z")]):
        s = run_experiment("digits-jacobs", ["train.epochs=3", f"train.loss={loss}", f"train.balance={balance}",
                                             "train.balance_weight=0.01", "train.label_smoothing=0.1",
                                             "train.lr=0.01", "train.shift=1", "data.val_size=100"],
                           out=tmp_path / f"r{i}", quiet=True)
        assert s["models"]["moe"]["test_accuracy"] > 0.3, (loss, balance)  # chance: 0.1
        assert "val_error_pct" in s["models"]["moe"]


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train.loss"):
        run_experiment("digits-jacobs", ["train.loss=nope"], out=tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="faithful"):
        run_experiment("digits-jacobs", ["seed_protocol.train_on_test=true"], out=tmp_path / "b", quiet=True)
    with pytest.raises(ConfigError):
        resolve_config("mnist-jacobs", ["train.epochs=1.5"])


def test_mnist_modern_learns(tmp_path):
    data_dir = _mnist_dir()
    out = tmp_path / "run"
    s = run_experiment("mnist-jacobs", ["data.train_limit=3000", "data.test_limit=1000", "train.epochs=8", "compute.threads=1"],
                       out=out, data_dir=data_dir, quiet=True)
    _check_summary(s, out, 10, lambda h: mlp(196, h, 10), torch.zeros(4, 196))
    assert s["models"]["moe"]["test_accuracy"] > 0.8
    assert s["models"]["single"]["test_accuracy"] > 0.7
    assert s["models"]["moe"]["params"] == 11 * (197 * 25 + 26 * 10)
    assert s["models"]["dense-equal-params"]["hidden"] == 275  # 196-275-10: 56935 parameters, 113300 FLOPs
    assert s["models"]["moe"]["flops_per_example"] == 2 * (11 * (196 * 25 + 25 * 10) + 10 * 10)  # + the combine


def test_equal_cost_rows_can_be_turned_off(tmp_path):
    s = run_experiment("digits-jacobs", ["train.epochs=1", "baselines.equal_cost=false"], out=tmp_path / "r",
                       quiet=True)
    assert set(s["models"]) == {"moe", "single"}


def test_mnist_faithful_learns(tmp_path):
    data_dir = _mnist_dir()
    out = tmp_path / "run"
    s = run_experiment("mnist-jacobs-faithful",
                       ["data.train_limit=2000", "data.test_limit=500", "faithful.moe_epochs=120", "compute.threads=1",
                        "faithful.single_epochs=120", "faithful.log_every=40", "faithful.checkpoint_every=60"],
                       out=out, data_dir=data_dir, quiet=True)
    _check_summary(s, out, 10, lambda h: SeedMLP(196, h, 10), torch.ones(4, 197))  # bias column
    assert s["models"]["moe"]["test_accuracy"] > 0.6  # full-batch GD from the seed's init is slow; chance 0.1
    assert s["models"]["single"]["test_accuracy"] > 0.6
    assert s["models"]["moe"]["trained_on"] == "train"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    moe_rows = [r for r in rows if r["phase"] == "moe"]
    assert [r["epoch"] for r in moe_rows] == [40, 80, 120]  # lead shares over training
    assert all(sum(r["lead_share"]) == pytest.approx(1.0, abs=1e-3) for r in moe_rows)


def test_mnist_faithful_train_on_test(tmp_path):
    data_dir = _mnist_dir()
    s = run_experiment("mnist-jacobs-faithful",
                       ["data.train_limit=1000", "data.test_limit=500", "faithful.moe_epochs=40", "compute.threads=1",
                        "faithful.single_epochs=10", "faithful.log_every=20", "faithful.dtype=float64",
                        "seed_protocol.train_on_test=true"],
                       out=tmp_path / "run", data_dir=data_dir, quiet=True)
    moe = s["models"]["moe"]
    assert moe["trained_on"] == "test" and s["models"]["single"]["trained_on"] == "train"
    assert 0 <= moe["unseen_error_pct"] <= 100 and moe["unseen_error_pct"] == moe["train_error_pct"]


def test_gradcheck_faithful(capsys):
    from moelab.experiments.jacobs.gradcheck import gradcheck_main

    data_dir = _mnist_dir()
    code = gradcheck_main("mnist-jacobs-faithful", ["data.train_limit=50", "data.test_limit=10"],
                          data_dir=data_dir, max_coords=60)
    text = capsys.readouterr().out
    assert code == 0, text
    for group in ("gate hidden", "gate softmax", "experts hidden", "experts output"):
        assert group in text


def test_gradcheck_modern_digits(capsys):
    from moelab.experiments.jacobs.gradcheck import gradcheck_main

    assert gradcheck_main("digits-jacobs", [], max_coords=40) == 0, capsys.readouterr().out


@pytest.mark.parametrize("name", ["digits-jacobs", "mnist-jacobs"])
def test_augment_is_shift_then_the_seed_preprocessing(name):
    """Augment's matrix form equals translating the original images, then the seed's zoom and scaling."""
    from moelab.data.augment import Augment
    from moelab.data.transforms import resize_cubic_half_like_seed, translate
    from moelab.experiments.digits import load_data
    from moelab.experiments.jacobs import Config
    from moelab.schema import typed

    data_dir = _mnist_dir() if name.startswith("mnist") else None
    c = typed(Config, resolve_config(name, ["data.train_limit=300", "data.test_limit=10"])[1])
    d = load_data(c.data, 0, data_dir)
    raw = d["train_raw"]
    x = Augment(d, 1)(raw, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 3, (len(raw),), generator=g) - 1, torch.randint(0, 3, (len(raw),), generator=g) - 1
    shifted = translate(raw.unsqueeze(1), dy, dx, fill="zero").squeeze(1).numpy()
    if d["resize"] == "seed_half":
        shifted = resize_cubic_half_like_seed(shifted)
    ref = (torch.from_numpy(shifted).double().flatten(1) + d["pixel_affine"][0]) / d["pixel_affine"][1]
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)
    assert (dy != 0).any() and (dx != 0).any()
    # no shift: exactly the data set's own images
    torch.testing.assert_close(Augment(d, 0)(raw, g).double(), d["train_x"], rtol=0, atol=1e-6)
