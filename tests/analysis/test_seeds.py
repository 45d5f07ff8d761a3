"""`moelab run NAME --seeds N`: OUT/seed-K run folders, then the compare table (mean +- std)."""

import csv
import json
import re

import pytest
import torch

from moelab import experiments
from moelab.cli import main
from moelab.train.evaluation import save_eval
from moelab.train.trainer import Trainer


@experiments.family("seedtoy", {"train": {"epochs": 2}})
def _run_seedtoy(cfg, run):
    torch.manual_seed(run.seed)
    x = torch.randn(64, 4, generator=run.generator("data"))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def epoch_fn(epoch):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    Trainer(run, "moe", model, opt, epochs=cfg["train"]["epochs"]).fit(epoch_fn=epoch_fn)
    with torch.no_grad():
        probs = model(x).softmax(1)
    save_eval(run, "moe", y, probs, gates=torch.stack([probs[:, 0], probs[:, 1]], 1))
    acc = float((probs.argmax(1) == y).float().mean())
    return {"test_accuracy": acc, "models": {"moe": {"test_accuracy": acc}}}


@pytest.fixture
def toy(tmp_path):
    path = tmp_path / "seedtoy.toml"
    path.write_text('family = "seedtoy"\n')
    return path


def test_three_seeds_then_compare(toy, tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["run", str(toy), "--seeds", "3", "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    accs = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["test_accuracy"] for s in (5, 6, 7)]
    assert re.search(r"seedtoy\s+moe\s+3\s+\d+\.\d\d \+- \d+\.\d\d", printed), printed
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == 1 and rows[0]["seeds"] == "5 6 7"
    assert float(rows[0]["test_accuracy_mean"]) == pytest.approx(sum(accs) / 3)

    # an interrupted set: seed 6 lost its summary (killed at the end); run again -> only seed 6 is resumed
    (out / "seed-6" / "summary.json").unlink()
    assert main(["run", str(toy), "--seeds", "3", "--seed", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"seed 5: already finished in {out / 'seed-5'}" in printed and "seed 6: already" not in printed
    assert json.loads((out / "seed-6" / "summary.json").read_text())["resumed"] is True


def test_default_out_and_quiet(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(toy), "--seeds", "2", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    (folder,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"seedtoy-seeds-\d{8}-\d{6}", folder.name)
    assert sorted(p.name for p in folder.iterdir()) == ["compare.csv", "seed-0", "seed-1"]
