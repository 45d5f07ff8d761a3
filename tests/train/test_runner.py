"""The runner, config schema and resumable loop, on a tiny in-test experiment family."""

import json

import pytest
import torch

from moelab import experiments
from moelab.config import apply_overrides, dumps_toml, merge, parse_override
from moelab.errors import ConfigError, MoelabError
from moelab.experiments.runner import run_experiment
from moelab.train.trainer import NonFiniteLoss, Trainer

DEFAULTS = {"train": {"epochs": 3, "lr": 0.1, "blow_up_at": 0}, "die_at": 0, "data": {"name": "toy", "sizes": [1, 2]}}


@experiments.family("toy", DEFAULTS)
def _run_toy(cfg, run):
    torch.manual_seed(run.seed)
    x = torch.randn(64, 4, generator=run.generator("data"))
    y = (x.sum(1) > 0).long()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["train"]["lr"])

    def epoch_fn(epoch):
        if cfg["die_at"] == epoch + 1:
            raise RuntimeError("killed")
        perm = torch.randperm(64, generator=run.generator("toy", epoch))
        for i in range(0, 64, 16):
            idx = perm[i : i + 16]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            if cfg["train"]["blow_up_at"] and epoch + 1 == cfg["train"]["blow_up_at"]:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"loss": loss.item()}

    def eval_fn(epoch):
        return {"acc": (model(x).argmax(1) == y).float().mean().item()}

    last = Trainer(run, "toy", model, opt, epochs=cfg["train"]["epochs"]).fit(epoch_fn=epoch_fn, evaluate=eval_fn)
    return {"test_accuracy": last["acc"], "weight": model.weight.detach().flatten().tolist()}


@pytest.fixture
def toy_config(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text('family = "toy"\ndescription = "a toy"\n[train]\nepochs = 4\n')
    return path


def test_run_writes_run_directory(toy_config, tmp_path):
    out = tmp_path / "run"
    summary = run_experiment(str(toy_config), ["train.lr=0.5"], out=out, seed=3, quiet=True)
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "run.log", "ckpt/toy.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    cfg_text = (out / "config.toml").read_text()
    assert "lr = 0.5" in cfg_text and "seed = 3" in cfg_text
    saved = json.loads((out / "summary.json").read_text())
    assert saved["wall_time_s"] > 0 and saved["test_accuracy"] == summary["test_accuracy"]


def test_resume_of_finished_and_partial_runs_matches(toy_config, tmp_path):
    full = run_experiment(str(toy_config), [], out=tmp_path / "a", quiet=True)
    # A partial run: 2 epochs, then "continue" the same config in a copy with 4 epochs is refused...
    run_experiment(str(toy_config), [], out=tmp_path / "b", quiet=True)
    again = run_experiment(str(toy_config), [], out=tmp_path / "b", resume=tmp_path / "b", quiet=True)
    assert again["weight"] == full["weight"]
    with pytest.raises(MoelabError, match=r"train.epochs cannot change on resume \(train.epochs: run has 4, asked 5\)"):
        run_experiment(str(toy_config), ["train.epochs=5"], out=tmp_path / "b", resume=tmp_path / "b", quiet=True)


def test_resume_mid_run_equals_uninterrupted(toy_config, tmp_path):
    full = run_experiment(str(toy_config), [], out=tmp_path / "a", quiet=True)
    out = tmp_path / "b"
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(str(toy_config), ["die_at=3"], out=out, quiet=True)
    # the config differs only in die_at: resume with the same config but die_at=0
    (out / "config.toml").write_text((out / "config.toml").read_text().replace("die_at = 3", "die_at = 0"))
    resumed = run_experiment(None, [], resume=out, quiet=True)
    assert resumed["weight"] == full["weight"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3, 4]


def test_non_finite_loss_stops_with_step(toy_config, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"phase 'toy': metric 'loss' became nan at epoch 2"):
        run_experiment(str(toy_config), ["train.blow_up_at=2"], out=tmp_path / "r", quiet=True)


def test_existing_output_folder_is_refused(toy_config, tmp_path):
    run_experiment(str(toy_config), [], out=tmp_path / "r", quiet=True)
    with pytest.raises(MoelabError, match="already holds files; to continue that run use --resume"):
        run_experiment(str(toy_config), [], out=tmp_path / "r", quiet=True)


def test_locked_run_directory_is_refused(toy_config, tmp_path):
    from moelab.train.run import Run

    with Run(tmp_path / "r", "toy", {"family": "toy"}, seed=0, quiet=True):
        with pytest.raises(MoelabError, match="is in use by another moelab process"):
            run_experiment(str(toy_config), [], out=tmp_path / "r", resume=tmp_path / "r", quiet=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=abc", r"key 'train.epochs' expects an integer \(default 4\), got a string 'abc'"),
        ("train.lr=true", r"key 'train.lr' expects a number"),
        ("train.nope=1", r"unknown key 'train.nope'. Valid keys: data.name, data.sizes, die_at, train.blow_up_at"),
        ("epochs", r"expected KEY=VALUE"),
        ("data.sizes=[1, \"x\"]", r"key 'data.sizes\[1\]' expects an integer"),
    ],
)
def test_bad_overrides(toy_config, override, message):
    _, cfg = experiments.resolve_config(str(toy_config))
    with pytest.raises(ConfigError, match=message):
        apply_overrides(cfg, [override])


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('family = "toy"\n[train]\nepoch = 4\n')
    with pytest.raises(ConfigError, match=r"bad.toml: unknown key 'train.epoch'. Valid keys here: train.blow_up_at, train.epochs, train.lr"):
        experiments.resolve_config(str(bad))
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        experiments.resolve_config(str(bad))
    bad.write_text("[train]\nepochs = 1\n")
    with pytest.raises(ConfigError, match="must name its experiment family"):
        experiments.resolve_config(str(bad))
    with pytest.raises(ConfigError, match="unknown experiment 'no-such-thing'. Built-in experiments"):
        experiments.resolve_config("no-such-thing")


def test_toml_round_trip():
    import tomllib

    d = {"family": "x", "a": {"b": 1, "c": [1.5, 2.0], "d": {"e": "q\"uote", "f": True}}}
    assert tomllib.loads(dumps_toml(d)) == d
    assert parse_override("a.b=[1,2]") == ("a.b", [1, 2])
    assert merge({"a": 1.0}, {"a": 2}, "w") == {"a": 2.0}


def test_zero_epochs_is_done(tmp_path):
    from moelab.train.run import Run

    with Run(tmp_path / "r", "t", {"family": "toy"}, seed=0, quiet=True) as run:
        m = torch.nn.Linear(2, 2)
        assert Trainer(run, "p", m, epochs=0).fit(epoch_fn=lambda e: {}) == {}
