"""`moelab compare`: grouping by config, mean +- std over seeds, CSV, parent folders, bad input."""

import csv
import statistics

import pytest

from moelab.analysis.compare import mean_std
from moelab.analysis.rundir import read_summary
from moelab.cli import main


@pytest.fixture
def seeds(make_run, tmp_path):
    """Three seeds of one config, one run of another lr, one unfinished run, in one parent folder."""
    parent = tmp_path / "runs"
    runs = [make_run(parent / f"seed-{s}", s) for s in range(3)]
    make_run(parent / "other-lr", 0, lr=0.5)
    make_run(parent / "nested" / "unfinished", 7, finished=False)
    return parent, runs


def test_compare_three_seeds_mean_std(seeds, tmp_path, capsys):
    parent, runs = seeds
    out_csv = tmp_path / "table.csv"
    assert main(["compare", *map(str, runs), "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    accs = [read_summary(r)["models"]["moe"]["test_accuracy"] for r in runs]
    m, s = statistics.fmean(accs), statistics.stdev(accs)
    assert f"{100 * m:.2f} +- {100 * s:.2f}" in out
    lines = out.splitlines()
    assert lines[0].split() == ["config", "model", "runs", "test", "acc", "%", "test", "err", "%", "params",
                                "FLOPs/ex", "train", "s", "specialisation", "wall", "s", "note"]
    assert [ln.split()[:3] for ln in lines[2:4]] == [["synth", "moe", "3"], ["synth", "single", "3"]]
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["model"] for r in rows] == ["moe", "single"] and rows[0]["seeds"] == "0 1 2"
    assert float(rows[0]["test_accuracy_mean"]) == pytest.approx(m)
    assert float(rows[0]["test_accuracy_std"]) == pytest.approx(s)
    assert 0 < float(rows[0]["specialisation_mean"]) <= 1 and rows[1]["specialisation_mean"] == ""
    assert float(rows[0]["wall_time_s_mean"]) == pytest.approx(2.5)


def test_compare_parent_folder_groups_by_config(seeds, tmp_path, capsys, monkeypatch):
    parent, _ = seeds
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(parent)]) == 0
    captured = capsys.readouterr()
    assert "skipping" in captured.err and "unfinished" in captured.err
    assert "synth [train.lr=0.1]  moe" in captured.out and "synth [train.lr=0.5]  moe" in captured.out
    assert not (tmp_path / "compare.csv").exists()  # not into the current folder: beside the runs
    assert captured.out.rstrip().endswith(f"wrote {parent.relative_to(tmp_path) / 'compare.csv'}")
    rows = list(csv.DictReader((parent / "compare.csv").open()))  # the default CSV path
    assert [(r["config"], r["runs"]) for r in rows if r["model"] == "moe"] == [
        ("synth [train.lr=0.1]", "3"), ("synth [train.lr=0.5]", "1")]
    single = next(r for r in rows if r["runs"] == "1")
    assert single["test_accuracy_std"] == ""  # one run: no std


def test_compare_csv_default_is_beside_the_runs(make_run, tmp_path, capsys, monkeypatch):
    """runs/m3/seed-* -> runs/m3/compare.csv, whatever the current folder; --csv puts it elsewhere."""
    runs = [make_run(tmp_path / "runs" / "m3" / f"seed-{s}", s) for s in range(2)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["compare", *map(str, runs)]) == 0
    want = tmp_path / "runs" / "m3" / "compare.csv"
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {want}")
    assert [r["runs"] for r in csv.DictReader(want.open())] == ["2", "2"]
    assert list(elsewhere.iterdir()) == []
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "runs/m3"]) == 0  # the folder that holds them: the same place, shown relative
    assert capsys.readouterr().out.rstrip().endswith("wrote runs/m3/compare.csv")
    assert main(["compare", "runs/m3", "--csv", "out/table.csv"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("wrote out/table.csv") and (tmp_path / "out/table.csv").is_file()


def test_compare_bad_input(make_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert f"moelab: error: '{tmp_path / 'empty'}' is not a moelab run directory (no config.toml) and holds none" in (
        capsys.readouterr().err)
    make_run(tmp_path / "u", finished=False)
    assert main(["compare", str(tmp_path / "u")]) == 2
    assert "moelab: error: no finished run among" in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    m, s = mean_std([float("nan"), 4.0])
    assert m == 4.0 and s != s


def test_compare_shows_cost_and_same_model_rows(make_run, tmp_path, capsys):
    """params, FLOPs per example and training time per model row; a row that repeats another model says so."""
    import json

    runs = [make_run(tmp_path / f"s{s}", s) for s in range(2)]
    for i, r in enumerate(runs):
        summary = json.loads((r / "summary.json").read_text())
        m = summary["models"]
        m["moe"].update(params=57035, flops_per_example=113300.0, train_time_s=30.0 + i)
        m["single"].update(params=5185, flops_per_example=10300.0, train_time_s=10.0,
                           note="smaller network: one expert's size")
        m["dense-equal-params"] = {"test_accuracy": 0.9, "params": 56935, "flops_per_example": 113300.0,
                                   "train_time_s": 12.0}
        m["dense-equal-flops"] = {**m["dense-equal-params"], "same_model_as": "dense-equal-params"}
        (r / "summary.json").write_text(json.dumps(summary))
    assert main(["compare", *map(str, runs), "--csv", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    line = {ln.split()[1]: ln for ln in out.splitlines()[2:]}
    assert "57.0k" in line["moe"] and "113k" in line["moe"] and "30.5" in line["moe"]
    assert "smaller network" in line["single"]
    assert line["dense-equal-flops"].endswith("same model as dense-equal-params (trained once)")
    assert "10.00 +- 0.00" in line["dense-equal-params"]  # test error %, mean +- std
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "c.csv").open())}
    assert float(rows["moe"]["params"]) == 57035 and float(rows["moe"]["flops_per_example"]) == 113300
    assert float(rows["moe"]["train_time_s_mean"]) == pytest.approx(30.5)
