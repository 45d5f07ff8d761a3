"""A study's table and plots: ``study.csv`` (one row per cell x model x seed), ``study.md`` and ``study.html``.

The plots are the ones papers draw: test accuracy against counted inference FLOPs per example (log x),
against parameters (log x) and against training time, mean +- std over seeds; the mixture's points are
joined along the swept key, each dense baseline's along its width. The map table says, per cell, whether
the mixture beats its dense network of equal FLOPs by more than twice the seed spread.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from moelab.analysis.routing import entropy_bits, mutual_information
from moelab.io import atomic_write_bytes, atomic_write_text
from moelab.study.grid import Cell, cell_runs

CSV_FIELDS = ["cell", "model", "seed", "params", "flops_per_example", "rho", "train_time_s", "val_accuracy",
              "test_accuracy", "class_expert_info", "latent_expert_info", "reused_from", "run_dir"]
AXES = (("flops_per_example", "counted inference FLOPs / example", True),
        ("params", "parameters", True),
        ("train_time_s", "training time (s)", False))


def study_rows(out: Path, cells: list[Cell], seeds: list[int]) -> list[dict]:
    """One dict per finished run x model row (grid values as their own columns)."""
    rows = []
    for cell, seed, run_dir, summary in cell_runs(out, cells, seeds):
        if summary is None:
            continue
        for model, r in (summary.get("models") or {}).items():
            if not isinstance(r, dict) or r.get("test_accuracy") is None:
                continue
            val = r.get("val_accuracy")
            if val is None and isinstance(r.get("val_error_pct"), int | float):
                val = round(1 - r["val_error_pct"] / 100, 6)
            routing = r.get("routing") or {}  # cifar rows keep routing in a section, digit rows at the top
            matrix = r.get("class_expert_matrix") or routing.get("class_expert_matrix")
            latent = r.get("latent_expert_matrix") or routing.get("latent_expert_matrix")  # a task's (data.task)
            rows.append({"cell": cell.slug, **cell.values, "model": model, "seed": seed, "params": r.get("params"),
                         "flops_per_example": r.get("flops_per_example"), "rho": r.get("rho"),
                         "train_time_s": r.get("train_time_s"), "val_accuracy": val,
                         "test_accuracy": r["test_accuracy"], "class_expert_info": class_expert_info(matrix),
                         "latent_expert_info": class_expert_info(latent),
                         "reused_from": r.get("reused_from", ""), "run_dir": str(run_dir)})
    return rows


def class_expert_info(matrix) -> float | None:
    """I(class; lead expert) / H(class) from a class x expert count matrix (None without routing); of a
    latent class x expert matrix, the ``latent_expert_info`` of a task with latent classes."""
    if not matrix:
        return None
    joint = torch.tensor(matrix, dtype=torch.float64)
    h = float(entropy_bits(joint.sum(1)))
    return round(mutual_information(joint) / h, 4) if h > 0 else None


def _mean_std(values: list) -> tuple[float, float]:
    vals = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(cell, model) -> mean / std of accuracy, cost and time over its seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["cell"], r["model"])].append(r)
    agg = {}
    for key, rs in groups.items():
        a = {"n": len(rs), "row": rs[0]}
        for f in ("test_accuracy", "val_accuracy", "flops_per_example", "params", "train_time_s", "rho",
                  "class_expert_info", "latent_expert_info"):
            a[f], a[f + "_std"] = _mean_std([r.get(f) for r in rs])
        agg[key] = a
    return agg


def map_table(cells: list[Cell], agg: dict) -> list[dict]:
    """Per cell: the mixture against dense-equal-flops, with the verdict at twice the seed spread."""
    out = []
    for c in cells:
        moe, dense = agg.get((c.slug, "moe")), agg.get((c.slug, "dense-equal-flops"))
        if moe is None or dense is None:
            continue
        gap = 100 * (moe["test_accuracy"] - dense["test_accuracy"])
        spread = 100 * max(moe["test_accuracy_std"], dense["test_accuracy_std"])
        verdict = ("MoE wins" if gap > 2 * spread and moe["n"] > 1 else
                   "dense wins" if -gap > 2 * spread and moe["n"] > 1 else "tie")
        out.append({"cell": c.slug, "moe": moe, "dense": dense, "gap_pts": gap, "spread_pts": spread,
                    "verdict": verdict})
    return out


def _series(cells: list[Cell], agg: dict) -> dict[str, list[tuple[dict, str]]]:
    """Series to draw: the mixture along the grid (one line per model name), each dense model by width."""
    series: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for c in cells:
        for (cell, model), a in agg.items():
            if cell == c.slug:
                series[model].append((a, ",".join(v for v in c.values.values())))
    return series


def plot(cells: list[Cell], agg: dict, x: str, xlabel: str, logx: bool) -> bytes:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for model, pts in sorted(_series(cells, agg).items(), key=lambda kv: (kv[0] != "moe", kv[0])):
        pts = [(a, label) for a, label in pts if math.isfinite(a[x]) and a[x] > 0 or not logx and math.isfinite(a[x])]
        if not pts:
            continue
        if model != "moe":  # a dense network: joined along its width (its cost), not the grid order
            pts = sorted(pts, key=lambda p: p[0][x])
        xs = np.array([a[x] for a, _ in pts])
        ys = np.array([100 * a["test_accuracy"] for a, _ in pts])
        es = np.array([100 * a["test_accuracy_std"] for a, _ in pts])
        style = {"marker": "o", "lw": 2, "zorder": 3} if model == "moe" else {"marker": "s", "lw": 1, "ls": "--"}
        ax.errorbar(xs, ys, yerr=es, capsize=3, label=model, **style)
        if model == "moe":
            for xv, yv, (_, label) in zip(xs, ys, pts):
                ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"test accuracy vs {xlabel} (mean +- std over seeds)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _fmt(a: dict, f: str, scale: float = 1.0, nd: int = 2) -> str:
    m, s = a[f], a[f + "_std"]
    return "n/a" if not math.isfinite(m) else f"{scale * m:.{nd}f} +- {scale * s:.{nd}f}"


def write_study_report(out: Path, cells: list[Cell], spec: dict) -> list[Path]:
    """study.csv, study.md (+ study_files/*.png) and study.html (PNGs embedded) from every finished run."""
    rows = study_rows(out, cells, spec["seeds"])
    grid_keys = list(spec["grid"])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["cell", *grid_keys, *CSV_FIELDS[1:]], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "study.csv", buf.getvalue())
    agg = aggregate(rows)
    figs = {x: plot(cells, agg, x, label, logx) for x, label, logx in AXES}
    for x, png in figs.items():
        atomic_write_bytes(out / "study_files" / f"accuracy-vs-{x}.png", png)
    verdicts = map_table(cells, agg)
    title = f"moelab study: {spec['experiment']} over {', '.join(grid_keys)} ({len(spec['seeds'])} seeds)"
    cmd = " ".join(["moelab study", spec["experiment"], *(f"--set {s}" for s in spec["sets"]),
                    *(f"--grid {k}={','.join(v)}" for k, v in spec["grid"].items()), f"--seeds {len(spec['seeds'])}"])
    head = ["cell", "model", "runs", "test acc %", "val acc %", "FLOPs / example", "params", "rho", "train s",
            "I(class; expert) / H", "I(latent; expert) / H"]
    table = []
    for c in cells:
        for (cell, model), a in sorted(agg.items(), key=lambda kv: (kv[0][1] != "moe", kv[0][1])):
            if cell == c.slug:
                table.append([c.slug, model, str(a["n"]), _fmt(a, "test_accuracy", 100), _fmt(a, "val_accuracy", 100),
                              f"{a['flops_per_example']:,.0f}" if math.isfinite(a["flops_per_example"]) else "n/a",
                              f"{a['params']:,.0f}" if math.isfinite(a["params"]) else "n/a",
                              f"{a['rho']:.3f}" if math.isfinite(a["rho"]) else "",
                              f"{a['train_time_s']:.1f}" if math.isfinite(a["train_time_s"]) else "n/a",
                              *(f"{a[f]:.3f}" if math.isfinite(a[f]) else "" for f in ("class_expert_info",
                                                                                      "latent_expert_info"))])
    keep = [i for i, h in enumerate(head) if i < len(head) - 2 or any(r[i] for r in table)]  # no empty info column
    head, table = [head[i] for i in keep], [[r[i] for i in keep] for r in table]
    vhead = ["cell", "MoE test acc %", "dense-equal-flops test acc %", "gap (pts)", "2 x spread (pts)", "verdict"]
    vrows = [[v["cell"], _fmt(v["moe"], "test_accuracy", 100), _fmt(v["dense"], "test_accuracy", 100),
              f"{v['gap_pts']:+.2f}", f"{2 * v['spread_pts']:.2f}", v["verdict"]] for v in verdicts]
    md = [f"# {title}", "", f"Command: `{cmd}`", "", "## Where the mixture pays (against dense-equal-flops)", "",
          *_md_table(vhead, vrows), "", "## Every model", "", *_md_table(head, table), ""]
    md += [f"![accuracy vs {x}](study_files/accuracy-vs-{x}.png)" for x in figs]
    atomic_write_text(out / "study.md", "\n".join(md) + "\n")
    imgs = "".join(f'<figure><img id="accuracy-vs-{x}" alt="accuracy vs {html.escape(label)}" '
                   f'src="data:image/png;base64,{base64.b64encode(figs[x]).decode()}"></figure>'
                   for x, label, _ in AXES)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child"
            "{text-align:left}img{max-width:100%}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p><code>{html.escape(cmd)}</code></p>"
            "<h2>Where the mixture pays (against dense-equal-flops)</h2>" + _html_table(vhead, vrows) + imgs +
            "<h2>Every model</h2>" + _html_table(head, table) + "</body></html>\n")
    atomic_write_text(out / "study.html", page)
    return [out / "study.csv", out / "study.md", out / "study.html"]


def _md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
