"""The seed-1 CIFAR-10 experts pipeline end to end on a small slice of the real data."""

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
from moelab.models.cifar_cnn import Seed1CNN
from moelab.reproductions.gating import GATE_KINDS
from moelab.train.checkpoint import load_checkpoint
from moelab.train.evaluation import load_eval

# two pairs (airplane/ship, automobile/truck): 4 classes x 250 = 1000 training images (200 held out for validation),
# one epoch each in batches of 32; 4 x 250 test images
SLICE = [
    "data.pairs=[[0, 8], [1, 9]]",
    "data.train_per_class=250",
    "data.test_per_class=250",
    "data.val_size=200",
    "experts.epochs=1",
    "experts.batch_size=32",
    "gate.epochs=1",
    "gate.batch_size=32",
    "generalist.batch_size=32",
    "baseline.epochs=1",
    "baseline.batch_size=32",
    "eval.batch_size=500",
]
# Chance on the test images of the 4 classes is 0.25; every model (mixtures, baselines, the generalist, the
# oracle routing) measured 0.36-0.48 on seeds 0-1 (one standard error on 1000 images: 0.015). An expert's own
# pair is a confusable one (airplane/ship): 0.51-0.64 after one epoch on 100 images, too close to its chance of
# 0.5 to test, so experts learn as far as oracle-pair (each image to its pair's expert) shows.
MIN_ACCURACY = 0.3


def _learned(models: dict, names) -> None:
    for name, row in models.items():
        assert 0.0 <= row["test_accuracy"] <= 1.0, name
    for name in names:
        assert MIN_ACCURACY < models[name]["test_accuracy"], (name, models[name]["test_accuracy"])


def _phases(out: Path) -> set[str]:
    return {json.loads(line)["phase"] for line in (out / "metrics.jsonl").read_text().splitlines()}


def _check_equal_cost(models: dict) -> None:
    """One Seed1CNN widened to the mixture's counted parameters / inference FLOPs: each row reports the exact
    counts of the CNN at its width, and that width is the closest to the mixture's counts."""
    moe, probe = models["moe-standard"], torch.randn(2, 3, 32, 32)

    def params(w):
        return count_params(Seed1CNN(10, width=w))

    def flops(w):
        return flops_per_example(Seed1CNN(10, width=w), probe)

    for name, key, cost in (("dense-equal-params", "params", params), ("dense-equal-flops", "flops_per_example", flops)):
        row = models[name]
        assert row["matched_to"] == key and row["train_time_s"] >= 0
        assert row[key] == pytest.approx(cost(row["width"]), abs=0.1), name  # summaries round FLOPs to 0.1
        assert_closest_width(cost, row["width"], moe[key], name)
        assert row["width"] > 32  # wider than one expert: the mixture has two experts and a gate


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
def test_pipeline_trains_and_caches_the_experts_and_every_baseline(cifar_dir, tmp_path):
    """cifar10-experts end to end with its baselines: the experts are trained and cached once; every model
    learns; the equal-cost rows are the closest widths."""
    cache = Path(os.environ["MOELAB_CACHE_DIR"])  # per-test tmp folder (conftest)
    s1 = run_experiment("cifar10-experts", SLICE + ["baselines=true"], out=tmp_path / "a",
                        data_dir=str(cifar_dir), quiet=True)
    models = s1["models"]
    _learned(models, ("moe-standard", "baseline-uniform", "baseline-single-cnn", "baseline-gate-trunk", "oracle-pair",
                      "dense-equal-params", "dense-equal-flops"))
    assert s1["dataset"] == "CIFAR-10 (JPEG-75 copy)"
    _check_equal_cost(models)
    assert not s1["timings"]["experts"]["cached"]
    files = list((cache / "experts").glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == s1["expert_key"]
    out = tmp_path / "a"
    assert (out / "eval" / "moe-standard.safetensors").is_file()
    assert _phases(out) >= {"expert0", "expert1", "gate", "baseline-single-cnn"}


@pytest.fixture(scope="module")
def cached_experts(cifar_source, _decoded_store, tmp_path_factory):
    """A cache folder holding the experts (and their outputs) of one plain cifar10-experts run on the slice,
    and that run's summary: the tests below reuse them, as a user's second run would (under pytest-xdist,
    once per worker)."""
    data, root = cifar_source, tmp_path_factory.mktemp("experts")
    cache = root / "cache"
    cache.mkdir()
    (cache / "decoded").symlink_to(_decoded_store, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_CACHE_DIR", str(cache))
        s = run_experiment("cifar10-experts", SLICE, out=root / "plain", data_dir=str(data), quiet=True)
    assert not s["timings"]["experts"]["cached"]
    return cache, data, s


@pytest.mark.parametrize("kind", [k for k in GATE_KINDS if k != "standard"])
def test_every_gate_kind_reuses_the_cached_experts(cached_experts, kind, tmp_path, monkeypatch):
    """Every other gate variant reuses the cached experts and their cached outputs: no expert phase runs.
    (hierarchical needs a generalist: tested below.)"""
    cache, data, first = cached_experts
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(cache))
    s = run_experiment("cifar10-experts", SLICE + [f"gate.kind={kind}"], out=tmp_path / kind, data_dir=str(data),
                       quiet=True)
    assert s["timings"]["experts"]["cached"] and s["timings"]["expert_outputs"]["cached"], kind
    assert s["expert_key"] == first["expert_key"]
    _learned(s["models"], (f"moe-{kind}",))
    assert _phases(tmp_path / kind) == {"gate"}, kind
    # identical expert outputs -> identical expert reports
    assert s["models"]["expert0-airplane-ship"] == first["models"]["expert0-airplane-ship"]


def test_trunkless_expert_aware_gate_on_unmirrored_outputs(cached_experts, tmp_path, monkeypatch):
    """The trunk-less expert-aware gate reads only the cached expert outputs; without mirrored outputs they
    are computed again (the cached ones hold the flips)."""
    cache, data, _ = cached_experts
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(cache))
    s = run_experiment("cifar10-experts", SLICE + ["gate.kind=expert-aware", "gate.trunk=false",
                                                   "experts.cache_flipped=false"],
                       out=tmp_path / "mlp", data_dir=str(data), quiet=True)
    assert s["timings"]["experts"]["cached"] and not s["timings"]["expert_outputs"]["cached"]
    _learned(s["models"], ("moe-expert-aware",))


def test_finetune_of_the_cached_experts_and_resume_of_the_finished_run(cached_experts, tmp_path, monkeypatch):
    """Joint fine-tuning of the cached experts and the gate; resuming the finished run restores every phase
    from its checkpoint and gives the same result."""
    cache, data, _ = cached_experts
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(cache))
    s = run_experiment("cifar10-experts", SLICE + ["gate.finetune_epochs=1"], out=tmp_path / "ft",
                       data_dir=str(data), quiet=True)
    assert s["timings"]["experts"]["cached"] and _phases(tmp_path / "ft") == {"gate", "finetune"}
    _learned(s["models"], ("moe-standard", "moe-standard-finetuned"))
    s2 = run_experiment(None, [], resume=tmp_path / "ft", data_dir=str(data), quiet=True)

    def untimed(row: dict) -> dict:  # wall-clock differs between the two processes
        return {k: v for k, v in row.items() if not k.endswith("time_s")}

    for name in ("moe-standard", "moe-standard-finetuned"):
        assert untimed(s2["models"][name]) == untimed(s["models"][name]), name
    assert s2["test_accuracy"] == s["test_accuracy"]


@pytest.mark.slow
def test_warm_start_pipeline_budget_baseline_and_hierarchical_mixture(cifar_dir, tmp_path):
    """cifar10-experts-warm: generalist first (cached), specialists + gate trunk start from it, and the
    single-CNN baseline gets the mixture's measured budget in epochs. Then cifar10-hierarchical on the same
    generalist and specialists (cached): no gate is trained; the experts' outputs are computed for val and
    test only, the blend is fitted on val, and the equal-budget baseline counts generalist + specialists +
    those outputs + the generalist's own inference."""
    cache = Path(os.environ["MOELAB_CACHE_DIR"])
    # (the equal-cost rows are tested above; they are left out here)
    args = SLICE + ["generalist.epochs=1", "baselines=true", "baseline.epochs=0", "baseline.equal_cost=false"]
    s = run_experiment("cifar10-experts-warm", args, out=tmp_path / "w", data_dir=str(cifar_dir), quiet=True)
    models, t = s["models"], s["timings"]
    _learned(models, ("generalist", "moe-standard", "baseline-single-cnn", "oracle-pair"))
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

    # a second warm run reuses the cached generalist and specialists (the keys: test below)
    s2 = run_experiment("cifar10-experts-warm", SLICE + ["generalist.epochs=1", "gate.kind=sparse"],
                        out=tmp_path / "w2", data_dir=str(cifar_dir), quiet=True)
    assert s2["timings"]["generalist"]["cached"] and s2["timings"]["experts"]["cached"]
    assert s2["expert_key"] == s["expert_key"]
    # cifar10-hierarchical on the cached generalist and specialists of the first run; their cached outputs are
    # removed, so that the run computes those it needs: val and test only
    for p in (cache / "expert-outputs").iterdir():
        p.unlink()
    args = SLICE + ["generalist.epochs=1", "baselines=true", "baseline.equal_cost=false"]
    s = run_experiment("cifar10-hierarchical", args, out=tmp_path / "h", data_dir=str(cifar_dir), quiet=True)
    models, t = s["models"], s["timings"]
    key = s["expert_key"]
    assert t["generalist"]["cached"] and t["experts"]["cached"] and not t["expert_outputs"]["cached"]
    m = models["moe-hierarchical"]
    _learned(models, ("moe-hierarchical", "generalist", "baseline-single-cnn"))
    assert 0.0 <= m["blend"] <= 1.0 and 0.0 <= m["val_accuracy"] <= 1.0
    assert _phases(tmp_path / "h") == {"baseline-single-cnn"}  # no gate; generalist and experts from the cache
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


def test_the_generalist_starts_from_weights_the_seed_fixes(monkeypatch, tmp_path):
    """train_generalist's initial weights depend on the run seed only (they were drawn before seeding once)."""
    from types import SimpleNamespace

    from moelab.experiments import get_family
    from moelab.experiments.cifar_experts import pretrain
    from moelab.schema import typed
    from moelab.train.run import seeded_generator

    _, raw = resolve_config("cifar10-experts-warm", ["experts.cache=false"])
    cfg = typed(get_family(raw["family"]).schema, raw)
    data = SimpleNamespace(classes=list("abcdefghij"), device=torch.device("cpu"), key="k", val=None,
                           used_classes=list(range(10)), train=None)
    starts = []

    def fake_train(run, phase, model, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"train_img_per_s": 1.0}

    monkeypatch.setattr(pretrain, "train_classifier", fake_train)
    monkeypatch.setattr(pretrain, "full_classes", lambda d: None)
    for seed, noise in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(noise)  # whatever the global RNG held before
        run = SimpleNamespace(seed=seed, generator=lambda *salt, seed=seed: seeded_generator(seed, *salt),
                              phase_times={"generalist": {"elapsed_s": 0.0}}, log=lambda *a: None)
        pretrain.train_generalist(cfg, run, data)
    same, other = starts[0], starts[2]
    assert all(torch.equal(same[k], starts[1][k]) for k in same)  # same seed: same start
    assert not all(torch.equal(same[k], other[k]) for k in same)  # another seed: another start


def test_the_specialists_cache_key_follows_the_generalist_and_a_scratch_experts_key_does_not():
    """The specialists start from the generalist, so their cache key depends on how it was trained (another
    generalist: the experts are trained again); experts trained from scratch keep one key."""
    from types import SimpleNamespace

    from moelab.experiments import get_family
    from moelab.experiments.cifar_experts.pretrain import expert_key, generalist_key
    from moelab.schema import typed

    def cfg(name, *sets):
        _, raw = resolve_config(name, list(sets))
        return typed(get_family(raw["family"]).schema, raw)

    data = SimpleNamespace(key="slice", device=torch.device("cpu"))
    one, two = cfg("cifar10-hierarchical", "generalist.epochs=1"), cfg("cifar10-hierarchical", "generalist.epochs=2")
    assert generalist_key(one, data, 0) != generalist_key(two, data, 0)
    assert expert_key(one, data, 0) != expert_key(two, data, 0)
    assert expert_key(one, data, 0) != expert_key(one, data, 1)  # the seed too
    scratch1, scratch2 = cfg("cifar10-experts", "generalist.epochs=1"), cfg("cifar10-experts", "generalist.epochs=2")
    assert expert_key(scratch1, data, 0) == expert_key(scratch2, data, 0)
