"""``moelab study``: a grid of ordinary runs, resumable, checked up front, with its table and plots."""

import csv
import re
import shutil
import subprocess

import pytest
from matplotlib.image import imread

import moelab.study.run as study_run
from moelab.cli import main
from moelab.study import run_study
from moelab.study.grid import parse_grid, split_values
from moelab.train import callbacks

# mnist-sparse on the embedded 8x8 digits: no download, about a second per run
BASE = ["data.dataset=digits", "data.resize=none", "data.val_size=200", "train.epochs=2", "compute.threads=1"]
GRID = ["model.num_experts=2,4"]


@pytest.fixture(autouse=True)
def _no_kernel_build(monkeypatch):
    monkeypatch.setenv("MOELAB_KERNELS", "off")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "s"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOELAB_KERNELS", "off")
        run_study("mnist-sparse", GRID, sets=BASE, out=out, seeds=2, device="cpu", quiet=True)
    return out


def test_grid_values_split_outside_brackets_and_quotes():
    assert split_values("1, 2,[3,4],'a,b'") == ["1", "2", "[3,4]", "'a,b'"]
    assert parse_grid(["model.moe_blocks=[3],[2,3]"]) == {"model.moe_blocks": ["[3]", "[2,3]"]}


def test_study_writes_a_row_per_cell_model_seed_and_three_plots(study):
    rows = list(csv.DictReader((study / "study.csv").open()))
    assert len(rows) == 2 * 2 * 3  # cells x seeds x (moe, dense-equal-flops, dense-equal-params)
    assert {r["model"] for r in rows} == {"moe", "dense-equal-flops", "dense-equal-params"}
    assert {r["model.num_experts"] for r in rows} == {"2", "4"}
    for r in rows:
        assert 0.3 < float(r["test_accuracy"]) <= 1 and float(r["params"]) > 0 and float(r["flops_per_example"]) > 0
        assert (study / r["run_dir"].split(str(study) + "/")[1] / "summary.json").is_file()
    moe = [r for r in rows if r["model"] == "moe"]
    assert all(0 <= float(r["class_expert_info"]) <= 1 for r in moe)
    for x in ("flops_per_example", "params", "train_time_s"):
        png = imread(study / "study_files" / f"accuracy-vs-{x}.png")
        assert png.shape[0] > 200 and png.std() > 0.05
    md = (study / "study.md").read_text()
    assert "moelab study mnist-sparse" in md and "| model.num_experts=4 |" in md and "verdict" in md
    assert "`moelab study mnist-sparse --set data.dataset=digits" in md and "  " not in md.split("`")[1]
    assert "I(class; expert) / H" in md and "I(latent; expert)" not in md  # no latent labels: no empty column
    html = (study / "study.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html


def test_dense_rows_that_coincide_across_cells_are_trained_once_per_seed(study):
    """E=2 and E=4 top-2 mixtures have the same active FLOPs here: one dense-equal-flops network per seed."""
    rows = list(csv.DictReader((study / "study.csv").open()))
    flops = {(r["model.num_experts"], r["seed"]): r for r in rows if r["model"] == "dense-equal-flops"}
    for seed in ("0", "1"):
        a, b = flops[("2", seed)], flops[("4", seed)]
        assert a["params"] == b["params"] and a["test_accuracy"] == b["test_accuracy"]
        assert a["reused_from"] == "" and b["reused_from"].endswith(f"model.num_experts=2/seed-{seed}")
        log = (study / f"model.num_experts=4/seed-{seed}/run.log").read_text()
        assert "its row is reused" in log and "[dense-equal-flops] one dense network" not in log
        assert (study / f"model.num_experts=4/seed-{seed}/eval/dense-equal-flops.safetensors").is_file()
    assert len(list((study / "shared-rows").glob("*.json"))) == 2 * 3  # flops once, params per cell, per seed


def test_a_cut_study_reruns_only_what_is_left(tmp_path, monkeypatch):
    """Interrupted in the second epoch of its third run, then started again: the two finished runs are
    kept byte for byte, the cut one is resumed, the last one runs."""
    out = tmp_path / "s"
    cut_dir = out / "model.num_experts=4" / "seed-0"

    def cutting(point, run=None, phase=None, epoch=None, **_):
        if point == "epoch_start" and run.dir == cut_dir and phase == "moe" and epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(callbacks, "CALLBACKS", [*callbacks.CALLBACKS, cutting])
    with pytest.raises(KeyboardInterrupt):
        run_study("mnist-sparse", GRID, sets=BASE, out=out, seeds=2, device="cpu", quiet=True)
    monkeypatch.setattr(callbacks, "CALLBACKS", [c for c in callbacks.CALLBACKS if c is not cutting])
    done = [out / "model.num_experts=2" / f"seed-{s}" / "summary.json" for s in (0, 1)]
    before = [p.read_bytes() for p in done]
    assert (cut_dir / "ckpt" / "moe.safetensors").is_file() and not (cut_dir / "summary.json").exists()

    calls = []
    real_run = study_run.run_experiment
    monkeypatch.setattr(study_run, "run_experiment",
                        lambda *a, **kw: calls.append((kw["out"], kw["resume"])) or real_run(*a, **kw))
    run_study("mnist-sparse", GRID, sets=BASE, out=out, seeds=2, device="cpu", quiet=True)
    assert calls == [(cut_dir, cut_dir), (out / "model.num_experts=4" / "seed-1", None)]
    assert [p.read_bytes() for p in done] == before
    assert "resuming after epoch 1" in (cut_dir / "run.log").read_text()
    assert len(list(csv.DictReader((out / "study.csv").open()))) == 12


@pytest.mark.parametrize("grid, said", [
    (["--grid", "model.nope=1,2"], "--grid model.nope: unknown key 'model.nope'"),
    (["--grid", "model.num_experts=4,0"], "--grid cell model.num_experts=0: "),
    (["--grid", "model.num_experts=4,x"], "--grid model.num_experts: key 'model.num_experts' expects an integer"),
    (["--grid", "model.num_experts"], "--grid 'model.num_experts': expected KEY=V1,V2,..."),
    (["--grid", "model.num_experts=4,4"], "--grid model.num_experts: a value is repeated"),
    ([], "give at least one --grid"),
])
def test_bad_grid_is_refused_before_any_cell_runs(tmp_path, capsys, grid, said):
    out = tmp_path / "s"
    assert main(["study", "mnist-sparse", *grid, "--out", str(out), *sum((["--set", s] for s in BASE), [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err and "Traceback" not in err
    assert not out.exists()


def test_another_grid_into_the_same_folder_is_refused(study, capsys):
    before = (study / "study.json").read_bytes()
    assert main(["study", "mnist-sparse", "--grid", "model.num_experts=2,8", "--out", str(study),
                 *sum((["--set", s] for s in BASE), [])]) == 2
    assert "holds a study with another grid" in capsys.readouterr().err
    assert (study / "study.json").read_bytes() == before


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_study_html_renders_in_chromium(study, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1200,2400"]
    shot = tmp_path / "shot.png"
    res = subprocess.run([CHROMIUM, *flags, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                          (study / "study.html").resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln] == []
    assert imread(shot).std() > 0.05
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", (study / "study.html").resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert len(re.findall(r'<img id="accuracy-vs-', dom)) == 3 and "dense-equal-flops" in dom


@pytest.mark.slow
def test_parallel_cells_give_the_sequential_table_and_share_rows_once(study, tmp_path, capsys):
    """``--jobs 2``: the cells run in two processes; every row equals the sequential study's (the runs are
    seeded, not scheduled), and a dense row two cells share is still trained once per seed (the claim lock);
    every cell x seed says when it is done, with the ETA."""
    out = tmp_path / "p"
    assert main(["study", "mnist-sparse", "--grid", GRID[0], *[a for s in BASE for a in ("--set", s)], "--seeds", "2",
                 "--out", str(out), "--device", "cpu", "--jobs", "2"]) == 0
    assert len(re.findall(r": done in \d+ s; \d+ left, ETA ", capsys.readouterr().out)) == 2 * 2

    def table(folder):
        return {(r["cell"], r["model"], r["seed"]): (r["params"], r["test_accuracy"], r["val_accuracy"])
                for r in csv.DictReader((folder / "study.csv").open())}
    assert table(out) == table(study)
    rows = list(csv.DictReader((out / "study.csv").open()))
    for seed in ("0", "1"):
        flops = [r for r in rows if r["model"] == "dense-equal-flops" and r["seed"] == seed]
        assert sorted(bool(r["reused_from"]) for r in flops) == [False, True]  # one trained, one reused
    assert len(list((out / "shared-rows").glob("*.json"))) == 2 * 3
    assert main(["study", "mnist-sparse", "--grid", GRID[0], "--jobs", "0", "--out", str(tmp_path / "q")]) == 2


def test_map_draws_the_gap_along_the_swept_key(study, tmp_path, capsys):
    """``moelab map``: per cell the mixture minus dense-equal-flops (points) from study.csv, the verdict at twice
    the larger seed spread, a PNG; a folder that is not a study is one line naming it."""
    from moelab.study.map import study_gaps

    rows = list(csv.DictReader((study / "study.csv").open()))
    key, cells = study_gaps(study)
    assert key == "model.num_experts" and [c["value"] for c in cells] == ["2", "4"]
    for c in cells:
        moe = [100 * float(r["test_accuracy"]) for r in rows if r["model.num_experts"] == c["value"] and r["model"] == "moe"]
        dense = [100 * float(r["test_accuracy"]) for r in rows
                 if r["model.num_experts"] == c["value"] and r["model"] == "dense-equal-flops"]
        assert c["gap"] == pytest.approx(sum(moe) / len(moe) - sum(dense) / len(dense))
        assert c["n"] == 2 and c["verdict"] == ("tie" if abs(c["gap"]) <= c["bar"] else
                                                "MoE wins" if c["gap"] > 0 else "dense wins")
    out = tmp_path / "map.png"
    assert main(["map", str(study), "--label", "digits", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| digits | model.num_experts = 2 |" in printed and imread(out).shape[2] in (3, 4)
    assert main(["map", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'{tmp_path}' is not a finished study" in err and "\n" not in err
    assert main(["map", str(study), "--label", "a", "--label", "b"]) == 2
    assert "2 --label for 1 studies" in capsys.readouterr().err


def test_map_verdicts_follow_the_study_rule_on_a_written_study(tmp_path):
    """study_gaps on a hand-written study.csv: values that are not file-system safe come back as given, and
    the verdict is the study's (beyond twice the larger seed spread: win or loss; inside it: tie)."""
    import json

    from moelab.study.grid import Cell
    from moelab.study.map import study_gaps

    values = ["[3]", "[2, 3]", "x/y"]
    accs = {"[3]": ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82]),     # +10 points, spread 1: MoE wins
            "[2, 3]": ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92]),  # -10 points: dense wins
            "x/y": ([0.80, 0.82, 0.84], [0.81, 0.81, 0.81])}     # +1 point, bar 4: tie
    (tmp_path / "study.json").write_text(json.dumps({"grid": {"model.moe_blocks": values}}))
    with (tmp_path / "study.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["cell", "model", "seed", "test_accuracy"])
        w.writeheader()
        for v in values:
            slug = Cell((f"model.moe_blocks={v}",)).slug
            for model, acc in zip(("moe", "dense-equal-flops"), accs[v], strict=True):
                for seed, a in enumerate(acc):
                    w.writerow({"cell": slug, "model": model, "seed": seed, "test_accuracy": a})
    key, gaps = study_gaps(tmp_path)
    assert key == "model.moe_blocks" and [g["value"] for g in gaps] == values
    assert [g["verdict"] for g in gaps] == ["MoE wins", "dense wins", "tie"]
    assert gaps[0]["gap"] == pytest.approx(10.0) and gaps[0]["bar"] == pytest.approx(2.0)
    assert gaps[2]["bar"] == pytest.approx(4.0) and gaps[2]["n"] == 3
