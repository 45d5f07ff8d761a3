"""Every config key declares what it accepts; a bad value is exit status 2, a one-line error and no run
directory; ``--resume R`` continues R with its own config.

The battery runs the real CLI (``moelab.cli.main``) in-process: a refused value never reaches training,
so each case takes milliseconds. Data-dependent sizes (``data.val_size`` larger than the training set...)
are checked once the data set is loaded, before training: the run directory made for them is removed.
"""

from __future__ import annotations

import math

import pytest

from moelab import experiments
from moelab.cli import main
from moelab.config import Check, Choice, Float, Int, Text, check_rules, flatten, needs_rule
from moelab.errors import ConfigError
from moelab.experiments import family_names, get_family, keys_without_rules

FAMILIES = family_names()
BUILTIN = {"jacobs": "digits-jacobs", "sparse_mlp": "mnist-sparse", "cifar_experts": "cifar10-experts",
           "cifar_moe": "cifar10-moe"}


def refused(capsys, argv: list[str], out) -> str:
    """Run ``moelab run ...``; assert exit 2, one error line, no traceback, nothing left at ``out``."""
    code = main(["run", *argv, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("moelab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists(), f"a refused run left {sorted(p.name for p in out.rglob('*'))}"
    return err


# ------------------------------------------------------------------ the schema
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_key_declares_its_rule(fam):
    """A new key without a declared range or choices fails here (booleans list their own values)."""
    f = get_family(fam)
    assert keys_without_rules(f) == [], f"family {fam}: keys without a rule in its RULES"
    assert set(f.rules) <= set(flatten(f.defaults))
    assert set(f.resumable) <= set(flatten(f.defaults))


@pytest.mark.parametrize("fam", FAMILIES)
def test_defaults_and_builtins_pass_their_rules(fam):
    f = get_family(fam)
    check_rules(f.defaults, f.rules)
    for name in experiments.builtin_configs():
        experiments.resolve_config(name)  # every shipped config is valid


CHECK_BAD = {"data.pairs": [[0, 0]], "model.moe_blocks": [3, 3]}


def _bad_values(key: str, rule) -> list:
    """Values of the key's own type (so the type check passes) that its rule must refuse."""
    if isinstance(rule, Float):
        bad = [math.nan, math.inf, -math.inf]
        for bound, delta in ((rule.ge, -0.5), (rule.gt, 0.0), (rule.le, 0.5), (rule.lt, 0.0)):
            if bound is not None:
                bad.append(float(bound) + delta)
        return [v for v in bad if v not in rule.also]
    if isinstance(rule, Int):
        bad = []
        for bound, delta in ((rule.ge, -1), (rule.gt, 0), (rule.le, 1), (rule.lt, 0)):
            if bound is not None:
                bad.append(int(bound) + delta)
        return [v for v in bad if v not in rule.also] or [None]
    if isinstance(rule, Choice):
        return ["no-such-choice"]
    if isinstance(rule, Text):
        return [" "]
    if isinstance(rule, Check):  # a value of the right type that the check refuses
        return [CHECK_BAD[key]]
    raise AssertionError(f"no bad values for {rule!r}")


def _cases():
    for fam in FAMILIES:
        f = get_family(fam)
        for key, rule in sorted(f.rules.items()):
            for v in _bad_values(key, rule):
                if v is not None:
                    yield pytest.param(fam, key, v, id=f"{fam}:{key}={v!r}")


def _toml(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return f'"{v}"'
    return repr(v).replace("'", '"')


@pytest.mark.parametrize("fam,key,value", list(_cases()))
def test_out_of_range_value_is_refused(fam, key, value, tmp_path, capsys):
    """One case per rule bound of every key of every family: the error names key, value and what is valid."""
    err = refused(capsys, [BUILTIN[fam], "--set", f"{key}={_toml(value)}"], tmp_path / "r")
    rule = get_family(fam).rules[key]
    assert f"{key} = " in err and f"is out of range: expected {rule.expected}." in err


@pytest.mark.parametrize("argv,message", [
    (["digits-jacobs", "--set", "train.lr=fast"],
     "key 'train.lr' expects a number (default 0.005), got a string 'fast'."),
    (["digits-jacobs", "--set", "train.epochs=2.5"], "key 'train.epochs' expects an integer"),
    (["digits-jacobs", "--set", "model.hidden=true"], "key 'model.hidden' expects an integer"),
    (["mnist-sparse", "--set", "model.k=9", "--set", "model.num_experts=8"],
     "model.k = 9 is out of range: expected at most model.num_experts = 8 (experts per example)."),
    (["digits-jacobs", "--set", "seed_protocol.train_on_test=true"],
     "seed_protocol.train_on_test = true applies to mode = \"faithful\" only (mode is 'modern')."),
    (["cifar10-experts", "--set", "gate.kind=hierarchical", "--set", "gate.finetune_epochs=2"],
     "gate.finetune_epochs = 2 is out of range: expected 0 with gate.kind = \"hierarchical\""),
    (["cifar10-experts", "--set", "gate.kind=sparse", "--set", "gate.top_k=11"],
     "gate.top_k = 11 is out of range: expected at most the 10 experts (data.pairs)."),
    (["cifar10-moe", "--set", "model.moe=blocks", "--set", "model.k=5"],
     "model.k = 5 is out of range: expected at most model.num_experts = 4 (experts per image)."),
    (["cifar10-moe", "--set", "model.moe=tokens", "--set", "model.k=1"],
     "model.k = 1 is out of range: expected at least 2 with model.router = topk: its weights are a softmax over"),
    (["cifar10-moe", "--set", "model.moe_blocks=[3, 3]"],
     "model.moe_blocks = [3, 3] is out of range: expected a non-empty list of distinct block numbers 1..3."),
    (["cifar10-experts", "--set", "data.pairs=[[0, 10]]"],
     "data.pairs = [[0, 10]] is out of range: expected a non-empty list of [a, b] pairs of distinct CIFAR-10"),
])
def test_wrong_type_and_cross_key_rules(argv, message, tmp_path, capsys):
    assert message in refused(capsys, argv, tmp_path / "r")


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_seeds_must_be_at_least_one(seeds, tmp_path, capsys):
    err = refused(capsys, ["digits-jacobs", "--seeds", seeds], tmp_path / "r")
    assert f"--seeds N expects N >= 1 (the number of seeds to run), got {seeds}." in err


def test_negative_nproc_is_refused(tmp_path, capsys):
    assert "--nproc N expects N >= 1" in refused(capsys, ["digits-jacobs", "--nproc", "-1"], tmp_path / "r")


# ------------------------------------------------------------------ sizes that must fit the data
@pytest.mark.parametrize("sets,message", [
    (["data.val_size=1437"], "data.val_size = 1437 is out of range: expected fewer than the 1437 training images of digits."),
    (["data.train_limit=5000"], "data.train_limit = 5000 is out of range: expected at most the 1437 training images of digits (0: all)."),
    (["data.test_limit=361"], "data.test_limit = 361 is out of range: expected at most the 360 test images of digits"),
    (["data.train_limit=300", "data.val_size=100", "train.batch_size=201"],
     "train.batch_size = 201 is out of range: expected at most the 200 training images left after data.val_size = 100."),
])
def test_size_that_does_not_fit_the_data_leaves_no_run_directory(sets, message, tmp_path, capsys):
    argv = ["digits-jacobs"] + [a for s in sets for a in ("--set", s)]
    assert message in refused(capsys, argv, tmp_path / "r")
    existing = tmp_path / "kept"
    existing.mkdir()  # an empty --out the user made stays, empty
    refused_there = main(["run", *argv, "--out", str(existing), "--quiet"])
    assert refused_there == 2 and existing.is_dir() and list(existing.iterdir()) == []
    capsys.readouterr()


def test_seeds_run_refused_by_the_data_leaves_nothing(tmp_path, capsys):
    err = refused(capsys, ["digits-jacobs", "--seeds", "2", "--set", "data.val_size=2000"], tmp_path / "r")
    assert "data.val_size = 2000" in err


# ------------------------------------------------------------------ resume
RESUME_DEFAULTS = {"train": {"epochs": 3, "log_every": 1, "lr": 0.1}, "die_at": 0}


@experiments.family("rulestoy", RESUME_DEFAULTS, {"train.epochs": Int(ge=1), "train.log_every": Int(ge=1),
                                                  "train.lr": Float(gt=0), "die_at": Int(ge=0)},
                    resumable=("train.log_every", "die_at"))
def _run_rulestoy(cfg, run):
    import torch

    from moelab.train.trainer import Trainer

    torch.manual_seed(run.seed)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["train"]["lr"])

    def epoch_fn(epoch):
        if cfg["die_at"] == epoch + 1:
            raise KeyboardInterrupt  # as a user's Ctrl-C: the checkpoints so far stay
        loss = model(torch.ones(1, 2)).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    Trainer(run, "toy", model, opt, epochs=cfg["train"]["epochs"]).fit(epoch_fn=epoch_fn)
    return {"test_accuracy": 1.0, "weight": model.weight.detach().flatten().tolist()}


@pytest.fixture
def toy_toml(tmp_path):
    path = tmp_path / "rulestoy.toml"
    path.write_text('family = "rulestoy"\n')
    return path


def test_resume_uses_the_runs_own_config(toy_toml, tmp_path, capsys):
    import json

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["run", str(toy_toml), "--set", "train.epochs=5", "--set", "train.lr=0.05", "--out", str(ref),
                 "--quiet"]) == 0
    assert main(["run", str(toy_toml), "--set", "train.epochs=5", "--set", "train.lr=0.05", "--set", "die_at=3",
                 "--out", str(run), "--quiet"]) == 130  # interrupted in epoch 3
    # resumed without repeating the overrides; die_at (resumable here) switched off, log_every changed
    assert main(["run", str(toy_toml), "--resume", str(run), "--set", "die_at=0", "--set", "train.log_every=2",
                 "--quiet"]) == 0
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert got["weight"] == want["weight"] and got["resumed"] is True
    assert "log_every = 2" in (run / "config.toml").read_text()  # the run goes on with the changed key
    capsys.readouterr()
    assert main(["run", "--resume", str(run), "--set", "train.lr=0.1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moelab: error: cannot resume '{run}': train.lr cannot change on resume (train.lr: run has "
                   f"0.05, asked 0.1); the run continues with its own config.toml. Keys a resumed run may change: "
                   f"train.log_every, die_at. To train with other values, start a new run.\n")
    assert main(["run", "--resume", str(run), "--seed", "4", "--quiet"]) == 2
    assert f"cannot resume '{run}': it is a run with seed 0, not --seed 4." in capsys.readouterr().err


def test_check_rules_names_key_value_and_what_is_valid():
    rules = {"a.lr": Float(gt=0), "a.p": Float(ge=0, lt=1), "b": Choice("x", "y"), "n": Int(ge=1, also=(-1,))}
    check_rules({"a": {"lr": 1e-3, "p": 0.0}, "b": "x", "n": -1}, rules)
    for cfg, msg in (({"a": {"lr": 0.0}}, "a.lr = 0.0 is out of range: expected a finite number > 0."),
                     ({"a": {"p": 1.0}}, "a.p = 1.0 is out of range: expected a finite number >= 0 and < 1."),
                     ({"b": "z"}, "b = \"z\" is out of range: expected one of 'x', 'y'."),
                     ({"n": 0}, "n = 0 is out of range: expected an integer >= 1, or -1.")):
        with pytest.raises(ConfigError) as e:
            check_rules(cfg, rules, "here")
        assert str(e.value) == f"here: {msg}"
    assert not needs_rule(True) and needs_rule(0) and needs_rule("s") and needs_rule([1])


def test_family_rules_must_name_real_keys():
    with pytest.raises(ValueError, match="rules name keys that are not in its defaults: train.nope"):
        experiments.family("badtoy", {"train": {"lr": 0.1}}, {"train.nope": Int(ge=1)})
