"""``moelab report RUN_DIR``: a self-contained ``report.html`` and a ``report.md`` for one run.

The report is a list of blocks (headings, paragraphs, tables, figures) rendered twice: to HTML
with the PNGs embedded as base64 (no scripts, no external files) and to Markdown with the PNGs
saved in ``RUN_DIR/report_files/``. Figures have stable ids (``training-curves``,
``routing-heatmap``, ``usage-chart``, ``expert-accuracy``, ``gate-entropy``, ``confusion-<model>``);
the first mixture's figures get the bare ids, later mixtures get ``-<model>`` appended.
"""

from __future__ import annotations

import base64
import contextlib
import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from moelab.analysis import plots
from moelab.analysis.routing import analyse_eval, entropy_bits
from moelab.analysis.rundir import RunDir, open_run
from moelab.config import dumps_toml
from moelab.io import atomic_write_bytes, atomic_write_text


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    id: str
    title: str
    png: bytes


@dataclass
class Code:
    text: str


def pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"


# ----------------------------------------------------------------- content
def build_report(run: RunDir) -> list:
    """The blocks of a run's report."""
    s = run.summary or {}
    blocks: list = [Heading(f"moelab report: {run.name}", 1)]
    facts = [["run directory", str(run.path)], ["family", str(run.config.get("family", "?"))],
             ["seed", str(run.config.get("run", {}).get("seed", "?"))]]
    if run.finished:
        facts += [["test accuracy", pct(s.get("test_accuracy"))], ["wall time", f"{s.get('wall_time_s', 0):.1f} s"]]
        if s.get("resumed"):
            facts.append(["resumed", "yes (interrupted and continued)"])
    blocks.append(Table(["", ""], facts))
    if not run.finished:
        blocks.append(Para(f"This run has not finished (no summary.json): continue it with "
                           f"`moelab run --resume {run.path}`. Shown: what it has written so far."))
    models = s.get("models") or {}
    if models:
        blocks.append(Table(["model", "test accuracy", "test error", "params", "FLOPs / example", "train time",
                             "note"], [_model_row(m, r) for m, r in models.items()]))
        if any(isinstance(r, dict) and "flops_per_example" in r for r in models.values()):
            blocks.append(Para("FLOPs per example: inference, counted (FlopCounterMode: matmuls and convolutions, "
                               "2 per multiply-add); a sparse mixture is charged for the experts it runs. "
                               "`dense-equal-params` / `dense-equal-flops`: one dense network with the mixture's "
                               "parameter count / inference FLOPs, trained with the same recipe in the same run."))

    evals = {m: run.load_eval(m) for m in run.eval_models()}  # read (and check) all before plotting
    curves = plots.training_curves(run.metrics)
    if curves is not None:
        blocks += [Heading("Training curves"), Figure("training-curves", "training curves (metrics.jsonl)", curves)]
    along = plots.routing_over_training(run.metrics)
    if along is not None:
        blocks += [Heading("Routing along training"),
                   Figure("routing-over-training", "each expert's share of the validation images it leads, per "
                          "epoch (metrics.jsonl val_lead_share)", along)]

    first_mixture = True
    for model, (tensors, meta) in evals.items():
        blocks += model_blocks(model, tensors, meta.get("classes") or None, bare_ids=first_mixture)
        first_mixture = first_mixture and "gates" not in tensors
    if not evals:
        blocks.append(Para("No test predictions saved (eval/*.safetensors): routing and confusion need them."))
    blocks += [Heading("Config"), Code(dumps_toml(run.config))]
    return blocks


def _model_row(model: str, result: dict) -> list[str]:
    r = result if isinstance(result, dict) else {}
    acc = r.get("test_accuracy")
    ok = isinstance(acc, int | float) and not isinstance(acc, bool)

    def count(key: str) -> str:
        v = r.get(key)
        return f"{v:,.0f}" if isinstance(v, int | float) and not isinstance(v, bool) else "n/a"

    t = r.get("train_time_s")
    note = (f"same model as `{r['same_model_as']}` (trained once)" if r.get("same_model_as")
            else str(r.get("note", "")))
    return [model, pct(acc) if ok else "n/a", pct(1 - acc) if ok else "n/a", count("params"),
            count("flops_per_example"), f"{t:.1f} s" if isinstance(t, int | float) else "n/a", note]


def model_blocks(model: str, tensors: dict, class_names: list[str] | None, bare_ids: bool) -> list:
    """Accuracy, confusion matrix and (for a mixture) the routing analysis of one model."""
    st = analyse_eval(tensors)
    names = class_names if class_names and len(class_names) == st["num_classes"] else None
    names = names or [str(i) for i in range(st["num_classes"])]
    kind = "mixture" if "routing" in st else "model"
    out: list = [Heading(f"{kind} `{model}`"),
                 Para(f"Test accuracy {pct(st['accuracy'])} on {st['n']} examples, {st['num_classes']} classes.")]
    r = st.get("routing")
    if r is not None:
        sfx = "" if bare_ids else f"-{slug(model)}"
        e = r["num_experts"]
        out.append(Table(
            ["expert", "mean gate", "lead share", "examples led", f"accuracy ({r['expert_accuracy_of']})"],
            [[str(i), num(r["mean_gate"][i]), pct(r["lead_share"][i]), str(r["lead_count"][i]),
              pct(r["expert_accuracy"][i])] for i in range(e)]))
        out.append(Table(["routing statistic", "value"], [
            ["gate entropy (mean per example)", f"{num(r['gate_entropy_bits'])} bits of {num(r['max_entropy_bits'])}"],
            ["usage entropy (of lead shares)", f"{num(r['usage_entropy_bits'])} bits of {num(r['max_entropy_bits'])}"],
            ["I(class; expert)", f"{num(r['mi_bits'])} bits"],
            ["specialisation I(class; expert) / H(class)", num(r["specialisation"])],
        ]))
        if r["expert_accuracy_of"] == "mixture":
            out.append(Para("Per-expert accuracy is the mixture's on the examples each expert leads "
                            "(the eval file has no per-expert predictions, `expert_probs`)."))
        gate_h = entropy_bits(tensors["gates"]).tolist()
        out += [
            Figure(f"routing-heatmap{sfx}", f"{model}: class x expert routing",
                   plots.routing_heatmap(r["class_expert"], names)),
            Figure(f"usage-chart{sfx}", f"{model}: expert usage", plots.usage_chart(r["mean_gate"], r["lead_share"])),
            Figure(f"expert-accuracy{sfx}", f"{model}: per-expert accuracy",
                   plots.expert_accuracy_chart(r["expert_accuracy"], r["lead_share"], r["expert_accuracy_of"])),
            Figure(f"gate-entropy{sfx}", f"{model}: gate entropy", plots.gate_entropy_hist(gate_h, r["max_entropy_bits"])),
        ]
    out.append(Figure(f"confusion-{slug(model)}", f"{model}: confusion matrix",
                      plots.confusion_plot(st["confusion"], names, f"{model}: confusion matrix")))
    if st["num_classes"] <= 20:
        out.append(Table(["true \\ predicted", *names],
                         [[n, *map(str, row)] for n, row in zip(names, st["confusion"])]))
    return out


# --------------------------------------------------------------- rendering
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}figure{margin:1em 0}img{max-width:100%;height:auto}
pre{background:#f5f5f5;padding:.8em;overflow:auto}figcaption{color:#555;font-size:.9em}"""


def _inline(text: str) -> str:
    """Escape for HTML; `code` spans become <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list) -> str:
    title = next((b.text for b in blocks if isinstance(b, Heading)), "moelab report")
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.headers) if any(b.headers) else ""
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table>{f'<tr>{head}</tr>' if head else ''}{rows}</table>")
        elif isinstance(b, Figure):
            src = "data:image/png;base64," + base64.b64encode(b.png).decode("ascii")
            body.append(f'<figure><img id="{b.id}" alt="{html.escape(b.title)}" src="{src}">'
                        f"<figcaption>{html.escape(b.title)}</figcaption></figure>")
        elif isinstance(b, Code):
            body.append(f"<pre>{html.escape(b.text)}</pre>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list, files_dir: str = "report_files") -> tuple[str, dict[str, bytes]]:
    """Markdown text and the PNGs it links to (file name -> bytes, under ``files_dir``)."""
    lines: list[str] = []
    files: dict[str, bytes] = {}
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Table):
            headers = [h or " " for h in b.headers]
            lines.append("| " + " | ".join(map(_md_cell, headers)) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
            lines.append("")
        elif isinstance(b, Figure):
            files[f"{b.id}.png"] = b.png
            lines += [f"![{b.title}]({files_dir}/{b.id}.png)", ""]
        elif isinstance(b, Code):
            lines += ["```toml", b.text.rstrip("\n"), "```", ""]
    return "\n".join(lines), files


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.html``, ``RUN_DIR/report.md`` and ``RUN_DIR/report_files/*.png``."""
    run = open_run(run_dir)
    blocks = build_report(run)
    md, files = render_markdown(blocks)
    files_dir = run.path / "report_files"
    created = not files_dir.is_dir()
    files_dir.mkdir(exist_ok=True)
    try:
        for old in files_dir.glob("*.png"):
            if old.name not in files:
                old.unlink()
        for name, data in files.items():
            atomic_write_bytes(files_dir / name, data)
            _readable(files_dir / name)
        html_path, md_path = run.path / "report.html", run.path / "report.md"
        atomic_write_text(md_path, md)
        atomic_write_text(html_path, render_html(blocks))
    except OSError:  # a full disk: leave no empty report_files/ of ours behind (the write names the file)
        if created:
            with contextlib.suppress(OSError):
                for f in files_dir.iterdir():
                    f.unlink()
                files_dir.rmdir()
        raise
    for p in (md_path, html_path):
        _readable(p)
    return html_path, md_path


def _readable(path: Path) -> None:
    """Atomic writes create 0600 temp files; a report is for sharing: the usual 0666 & ~umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
