"""The seed-1 CIFAR-10 experts pipeline end to end on a small slice of the real data."""

import json
import os
from pathlib import Path

import pytest
import torch

from moelab.errors import ConfigError
from moelab.experiments import resolve_config
from moelab.experiments.runner import run_experiment
from moelab.models.gating import GATE_KINDS
from moelab.train.checkpoint import load_checkpoint
from moelab.train.evaluation import load_eval

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"

# two pairs (airplane/ship, automobile/truck): 4 classes x 250 = 1000 training images, one epoch each
SLICE = [
    "data.pairs=[[0, 8], [1, 9]]",
    "data.train_per_class=250",
    "data.test_per_class=50",
    "data.val_size=200",
    "experts.epochs=1",
    "gate.epochs=1",
    "baseline.epochs=1",
    "compute.eval_batch=200",
]


@pytest.fixture
def cifar_dir() -> Path:
    d = Path(os.environ.get("MOELAB_DATA_DIR", SHARED))
    if not (d / "cifar10-jpeg75.tar.gz").is_file() and not (d / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 not found in {d} (set MOELAB_DATA_DIR)")
    return d


def test_builtin_configs_resolve():
    _, cfg = resolve_config("cifar10-experts", ["gate.kind=sparse"])
    assert cfg["gate"]["kind"] == "sparse" and len(cfg["data"]["pairs"]) == 10
    # experts 5-9 get the pairs the seed intended, not class 5 as every second class
    assert cfg["data"]["pairs"][5:] == [[0, 9], [1, 8], [2, 7], [3, 6], [4, 5]]
    _, warm = resolve_config("cifar10-experts-warm")
    assert warm["experts"]["init"] == warm["gate"]["init"] == "generalist" and warm["baseline"]["epochs"] == 0
    with pytest.raises(ConfigError, match="experts.init = \"pretrained\" is out of range: expected one of "
                                          "'scratch', 'generalist'."):
        resolve_config("cifar10-experts", ["experts.init=pretrained"])
    _, base = resolve_config("cifar10-baselines")
    assert base["baselines"] is True and base["gate"]["kind"] == "none"
    with pytest.raises(ConfigError):
        resolve_config("cifar10-experts", ["gate.kind=3"])


@pytest.mark.slow
def test_pipeline_end_to_end_and_expert_cache(cifar_dir, tmp_path):
    cache = Path(os.environ["MOELAB_CACHE_DIR"])  # per-test tmp folder (conftest)
    s1 = run_experiment("cifar10-experts", SLICE + ["baselines=true"], out=tmp_path / "a",
                        data_dir=str(cifar_dir), quiet=True)
    models = s1["models"]
    for name in ("moe-standard", "baseline-uniform", "baseline-single-cnn", "baseline-gate-trunk", "oracle-pair",
                 "expert0-airplane-ship", "expert1-automobile-truck"):
        assert 0.0 <= models[name]["test_accuracy"] <= 1.0, name
    assert s1["dataset"] == "CIFAR-10 (JPEG-75 copy)"
    # the equal-cost rows: one Seed1CNN widened to the mixture's counted parameters / inference FLOPs
    moe = models["moe-standard"]
    for name, key in (("dense-equal-params", "params"), ("dense-equal-flops", "flops_per_example")):
        row = models[name]
        assert row["matched_to"] == key and 0.0 <= row["test_accuracy"] <= 1.0 and row["train_time_s"] >= 0
        assert row[key] == pytest.approx(moe[key], rel=0.1), name
        assert row["width"] > 32  # wider than one expert: the mixture has two experts and a gate
    assert not s1["timings"]["experts"]["cached"]
    files = list((cache / "experts").glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == s1["expert_key"]
    out = tmp_path / "a"
    assert (out / "eval" / "moe-standard.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} >= {"expert0", "expert1", "gate", "baseline-single-cnn"}

    # every other variant reuses the cached experts (and their cached outputs): no expert phase runs
    for kind in [k for k in GATE_KINDS if k != "standard"]:  # (hierarchical needs a generalist: tested below)
        s = run_experiment("cifar10-experts", SLICE + [f"gate.kind={kind}"], out=tmp_path / kind,
                           data_dir=str(cifar_dir), quiet=True)
        assert s["timings"]["experts"]["cached"] and s["timings"]["expert_outputs"]["cached"], kind
        assert s["expert_key"] == s1["expert_key"]
        assert 0.0 <= s["models"][f"moe-{kind}"]["test_accuracy"] <= 1.0
        phases = {json.loads(line)["phase"] for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()}
        assert phases == {"gate"}, phases
        # identical expert outputs -> identical expert reports
        assert s["models"]["expert0-airplane-ship"] == models["expert0-airplane-ship"]

    # the trunk-less expert-aware gate (reads only the cached expert outputs), without mirrored outputs
    s = run_experiment("cifar10-experts", SLICE + ["gate.kind=expert-aware", "gate.trunk=false",
                                                   "experts.cache_flipped=false"],
                       out=tmp_path / "mlp", data_dir=str(cifar_dir), quiet=True)
    assert s["timings"]["experts"]["cached"] and not s["timings"]["expert_outputs"]["cached"]
    assert 0.0 <= s["models"]["moe-expert-aware"]["test_accuracy"] <= 1.0


@pytest.mark.slow
def test_finetune_and_resume(cifar_dir, tmp_path):
    args = SLICE + ["gate.finetune_epochs=1"]
    s = run_experiment("cifar10-experts", args, out=tmp_path / "r", data_dir=str(cifar_dir), quiet=True)
    assert "moe-standard-finetuned" in s["models"]
    # resuming a finished run restores every phase from its checkpoint and gives the same result
    s2 = run_experiment(None, [], resume=tmp_path / "r", data_dir=str(cifar_dir), quiet=True)
    def untimed(row: dict) -> dict:  # wall-clock differs between the two processes
        return {k: v for k, v in row.items() if not k.endswith("time_s")}

    assert untimed(s2["models"]["moe-standard"]) == untimed(s["models"]["moe-standard"])
    assert torch.isfinite(torch.tensor(s2["test_accuracy"]))


@pytest.mark.slow
def test_warm_start_pipeline_and_equal_budget_baseline(cifar_dir, tmp_path):
    """cifar10-experts-warm: generalist first (cached), specialists + gate trunk start from it, and the
    single-CNN baseline gets the mixture's measured budget in epochs."""
    cache = Path(os.environ["MOELAB_CACHE_DIR"])
    # (the equal-cost rows are tested above; they are left out here)
    args = SLICE + ["generalist.epochs=1", "baselines=true", "baseline.epochs=0", "baseline.equal_cost=false"]
    s = run_experiment("cifar10-experts-warm", args, out=tmp_path / "w", data_dir=str(cifar_dir), quiet=True)
    models, t = s["models"], s["timings"]
    for name in ("generalist", "moe-standard", "baseline-single-cnn"):
        assert 0.0 <= models[name]["test_accuracy"] <= 1.0, name
    assert "baseline-gate-trunk" not in models  # trunk_epochs = -1 in the config
    assert not t["generalist"]["cached"] and len(list((cache / "generalist").glob("*.safetensors"))) == 1
    assert t["mixture_budget_s"] >= t["generalist"]["train_s"] + t["gate"]["train_s"]
    want = max(1, int(t["mixture_budget_s"] * t["generalist"]["train_img_per_s"] / 800))  # 4 classes x 200 train
    assert models["baseline-single-cnn"]["epochs"] == want
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert {"generalist", "expert0", "gate", "baseline-single-cnn"} <= {r["phase"] for r in rows}
    # each specialist's kept checkpoint is the best on its pair's val images, the generalist (epoch 0) included
    _, meta = load_checkpoint(cache / "experts" / f"{s['expert_key']}.safetensors")
    for i in range(2):
        accs = {r["epoch"]: r["val_acc"] for r in rows if r["phase"] == f"expert{i}"}
        assert sorted(accs) == [0, 1]
        assert meta["best_val"][i] == max(accs.values()) and accs[meta["best_epoch"][i]] == meta["best_val"][i]

    # the specialists start from the generalist: their cache key depends on it, a scratch run's does not
    s2 = run_experiment("cifar10-experts-warm", SLICE + ["generalist.epochs=1", "gate.kind=sparse"],
                        out=tmp_path / "w2", data_dir=str(cifar_dir), quiet=True)
    assert s2["timings"]["generalist"]["cached"] and s2["timings"]["experts"]["cached"]
    assert s2["expert_key"] == s["expert_key"]
    s3 = run_experiment("cifar10-experts-warm", SLICE + ["generalist.epochs=2"], out=tmp_path / "w3",
                        data_dir=str(cifar_dir), quiet=True)
    assert s3["expert_key"] != s["expert_key"] and not s3["timings"]["experts"]["cached"]


@pytest.mark.slow
def test_hierarchical_mixture_and_its_budget(cifar_dir, tmp_path):
    """cifar10-hierarchical: no gate is trained; the experts' outputs are computed for val and test
    only, the blend is fitted on val, and the equal-budget baseline counts generalist + specialists +
    those outputs + the generalist's own inference."""
    cache = Path(os.environ["MOELAB_CACHE_DIR"])
    args = SLICE + ["generalist.epochs=1", "baselines=true", "baseline.equal_cost=false"]
    s = run_experiment("cifar10-hierarchical", args, out=tmp_path / "h", data_dir=str(cifar_dir), quiet=True)
    models, t = s["models"], s["timings"]
    m = models["moe-hierarchical"]
    assert 0.0 <= m["test_accuracy"] <= 1.0 and 0.0 <= m["blend"] <= 1.0 and 0.0 <= m["val_accuracy"] <= 1.0
    assert "generalist" in models and "baseline-single-cnn" in models
    phases = {json.loads(line)["phase"] for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()}
    assert "gate" not in phases and {"generalist", "expert0", "expert1", "baseline-single-cnn"} <= phases
    key = s["expert_key"]
    assert [p.name for p in (cache / "expert-outputs").iterdir()] == [f"{key}-eval.safetensors"]
    budget = t["generalist"]["train_s"] + t["experts"]["train_s"] + t["expert_outputs"]["infer_s"] + t["gate"]["train_s"]
    assert abs(t["mixture_budget_s"] - budget) < 0.2
    assert s["routing"] is not None
    ev, _ = load_eval(tmp_path / "h", "moe-hierarchical")  # expert weights: each row sums to 1
    assert torch.allclose(ev["gates"].sum(1), torch.ones(len(ev["gates"])), atol=1e-4)

    # a fixed blend of 0 is the generalist alone; the cached experts and outputs are reused
    s0 = run_experiment("cifar10-hierarchical", SLICE + ["generalist.epochs=1", "gate.blend=0.0"],
                        out=tmp_path / "h0", data_dir=str(cifar_dir), quiet=True)
    assert s0["timings"]["experts"]["cached"] and s0["timings"]["expert_outputs"]["cached"]
    assert s0["models"]["moe-hierarchical"]["test_accuracy"] == models["generalist"]["test_accuracy"]
    with pytest.raises(ConfigError, match=r"gate.blend = 1.5 is out of range: expected a finite number <= 1."):
        run_experiment("cifar10-hierarchical", SLICE + ["gate.blend=1.5"], out=tmp_path / "bad",
                       data_dir=str(cifar_dir), quiet=True)
