"""`moelab report`: the files it writes, and its errors on bad input."""

import base64
import re

import pytest
import torch

from moelab.analysis.report import write_report
from moelab.analysis.rundir import open_run, read_metrics
from moelab.cli import main
from moelab.errors import MoelabError
from moelab.train.checkpoint import save_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_report_cli(make_run, tmp_path, capsys):
    run = make_run(tmp_path / "r")
    for f in ("single", "moe"):
        (run / "eval" / f"{f}.safetensors").unlink()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'report.html'}\nwrote {run / 'report.md'}\n"
    assert "No test predictions saved" in (run / "report.md").read_text()


def test_report_files(reported_run):
    synth_run = reported_run
    html = (synth_run / "report.html").read_text()
    imgs = dict(re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', html))
    for fig in ("training-curves", "routing-heatmap", "usage-chart", "expert-accuracy", "gate-entropy",
                "confusion-moe", "confusion-single"):
        assert base64.b64decode(imgs[fig]).startswith(PNG_MAGIC), fig
    assert "<script" not in html and "http" not in html  # self-contained
    md = (synth_run / "report.md").read_text()
    linked = re.findall(r"\]\((report_files/[^)]+\.png)\)", md)
    assert len(linked) == 7 and all((synth_run / p).read_bytes().startswith(PNG_MAGIC) for p in linked)
    assert "specialisation I(class; expert) / H(class)" in md and "accuracy (mixture)" in md
    assert "| a | " in md  # confusion table with the class names from the eval file


def test_report_with_expert_predictions_and_second_mixture(make_run, tmp_path):
    run = make_run(tmp_path / "r", expert_probs=True)
    (run / "eval" / "single.safetensors").unlink()
    (run / "metrics.jsonl").unlink()
    (run / "eval" / "moe.safetensors").rename(run / "eval" / "a-moe.safetensors")
    make_run(tmp_path / "other", seed=1)
    (tmp_path / "other" / "eval" / "moe.safetensors").rename(run / "eval" / "b moe.safetensors")
    html_path, md_path = write_report(run)
    html = html_path.read_text()
    assert 'id="routing-heatmap"' in html and 'id="routing-heatmap-b-moe"' in html
    assert "accuracy (expert)" in md_path.read_text()


def test_unfinished_run_still_reports(make_run, tmp_path):
    run = make_run(tmp_path / "r", finished=False)
    for f in ("single", "moe"):
        (run / "eval" / f"{f}.safetensors").unlink()
    _, md = write_report(run)
    assert f"has not finished (no summary.json): continue it with `moelab run --resume {run}`" in md.read_text()


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: ") and f"'{tmp_path / 'x'}' is not a moelab run directory (no config.toml)" in err
    with pytest.raises(MoelabError, match="is not a folder"):
        write_report(tmp_path / "missing")


def test_truncated_metrics_names_file_and_line(synth_run, capsys):
    path = synth_run / "metrics.jsonl"
    path.write_text(path.read_text()[:-15])  # the last line cut mid-way
    assert main(["report", str(synth_run)]) == 2
    err = capsys.readouterr().err
    assert f"moelab: error: {path}, line 6: not a complete JSON object" in err and "the line was cut" in err


def test_damaged_files(synth_run):
    (synth_run / "summary.json").write_text('{"test_accuracy": ')
    with pytest.raises(MoelabError, match=r"summary.json, line 1: not valid JSON"):
        open_run(synth_run)
    (synth_run / "summary.json").unlink()
    save_checkpoint(synth_run / "eval" / "moe.safetensors",
                    {"labels": torch.zeros(5, dtype=torch.long), "probs": torch.ones(5, 2), "gates": torch.ones(4, 3)})
    with pytest.raises(MoelabError, match=r"moe.safetensors: expected gates \(N=5, E\), found \(4, 3\)"):
        write_report(synth_run)
    (synth_run / "eval" / "moe.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MoelabError, match=r"moe.safetensors' is not a readable safetensors file"):
        write_report(synth_run)


def test_metrics_blank_lines_and_missing_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n\n{"epoch": 2}\n')
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(MoelabError, match=r"line 2: expected a JSON object, found list"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path / "nowhere") == []


def test_report_model_table_shows_cost(make_run, tmp_path):
    """The models table gives params, FLOPs per example, training time, and which row repeats another model."""
    import json

    from moelab.analysis.report import Table, build_report

    run = make_run(tmp_path / "r")
    summary = json.loads((run / "summary.json").read_text())
    summary["models"]["moe"].update(params=57035, flops_per_example=113300.0, train_time_s=30.2)
    summary["models"]["dense-equal-params"] = {"test_accuracy": 0.99, "params": 56935, "flops_per_example": 113300.0,
                                               "train_time_s": 11.0}
    summary["models"]["dense-equal-flops"] = {**summary["models"]["dense-equal-params"],
                                              "same_model_as": "dense-equal-params"}
    (run / "summary.json").write_text(json.dumps(summary))
    table = next(b for b in build_report(open_run(run)) if isinstance(b, Table) and b.headers[0] == "model")
    assert table.headers == ["model", "test accuracy", "test error", "params", "FLOPs / example", "train time", "note"]
    rows = {r[0]: r for r in table.rows}
    assert rows["moe"][3:6] == ["57,035", "113,300", "30.2 s"]
    assert rows["single"][3:6] == ["n/a", "n/a", "n/a"]
    assert rows["dense-equal-flops"][6] == "same model as `dense-equal-params` (trained once)"


def test_routing_over_training_figure(make_run, tmp_path):
    import json

    from moelab.analysis import plots

    run = make_run(tmp_path / "r")
    rows = [{"phase": "moe", "epoch": e, "val_err": 10.0 - e, "val_lead_share": [0.5 - 0.1 * e, 0.5 + 0.1 * e]}
            for e in (1, 2, 3)]
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    html_path, md_path = write_report(run)
    imgs = dict(re.findall(r'<img id="([^"]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)"', html_path.read_text()))
    assert base64.b64decode(imgs["routing-over-training"]).startswith(PNG_MAGIC)
    assert "## Routing along training" in md_path.read_text()
    assert plots.routing_over_training([{"phase": "moe", "epoch": 1, "val_err": 3.0}]) is None
