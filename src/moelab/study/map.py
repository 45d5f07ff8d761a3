"""``moelab map STUDY... --out FILE.png``: where the mixture pays, across studies.

Each study (a ``moelab study`` folder with one swept key) gives one line: the mixture's test accuracy minus
its dense-equal-flops network's, in points, along the swept key, mean over seeds, with a bar of twice the
larger seed spread of the two (the verdict rule of :func:`moelab.study.report.map_table`: a gap beyond the
bar is a win or a loss, inside it a tie). Studies of the same sweep on different data draw the data axis
beside the swept one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from matplotlib.figure import Figure

from moelab.errors import MoelabError
from moelab.io import atomic_write_bytes
from moelab.study.grid import Cell
from moelab.study.report import aggregate, map_table


def study_gaps(folder: str | Path) -> tuple[str, list[dict]]:
    """(swept key, one dict per cell: value, moe / dense mean and std in %, gap and bar in points, verdict, n)
    from ``folder/study.csv``."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / "study.json").read_text(encoding="utf-8"))
        rows = list(csv.DictReader((folder / "study.csv").open(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise MoelabError(f"'{folder}' is not a finished study ({e}); run `moelab study ... --out {folder}` first.") \
            from None
    if len(spec.get("grid", {})) != 1:
        raise MoelabError(f"'{folder}': moelab map draws studies that sweep one key; this one sweeps "
                          f"{', '.join(spec.get('grid', {})) or 'none'}.")
    key = next(iter(spec["grid"]))
    for r in rows:  # the csv's text back to numbers for the study's own aggregation and verdict rule
        r["test_accuracy"] = float(r["test_accuracy"]) if r.get("test_accuracy") else None
    cells = {Cell((f"{key}={value}",)).slug: value for value in spec["grid"][key]}  # csv cell -> swept value
    out = []
    for v in map_table([Cell((slug,)) for slug in cells], aggregate(rows)):
        moe, dense = v["moe"], v["dense"]
        out.append({"value": cells[v["cell"]], "moe": 100 * moe["test_accuracy"],
                    "moe_std": 100 * moe["test_accuracy_std"], "dense": 100 * dense["test_accuracy"],
                    "dense_std": 100 * dense["test_accuracy_std"], "gap": v["gap_pts"], "bar": 2 * v["spread_pts"],
                    "verdict": v["verdict"], "n": min(moe["n"], dense["n"])})
    return key, out


def draw_map(folders: list[str | Path], labels: list[str] | None = None) -> tuple[bytes, str]:
    """(PNG of the gap along the swept key, one line per study; the same as a Markdown table)."""
    if not folders:
        raise MoelabError("moelab map: name at least one study folder.")
    labels = list(labels or [])
    if labels and len(labels) != len(folders):
        raise MoelabError(f"moelab map: {len(labels)} --label for {len(folders)} studies; give one per study or none.")
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot()
    md = ["| study | " + "swept value | MoE test acc % | dense-equal-flops test acc % | gap (pts) | 2 x spread | verdict |",
          "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    keys = set()
    for i, folder in enumerate(folders):
        key, cells = study_gaps(folder)
        keys.add(key)
        label = labels[i] if labels else Path(folder).name
        numeric = all(_is_number(c["value"]) for c in cells)
        xs = [float(c["value"]) if numeric else j for j, c in enumerate(cells)]
        ax.errorbar(xs, [c["gap"] for c in cells], yerr=[c["bar"] for c in cells], marker="o", capsize=4, lw=2,
                    label=label)
        if numeric and all(x > 0 for x in xs):
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [c["value"] for c in cells])
        md += [f"| {label} | {key} = {c['value']} | {c['moe']:.2f} ± {c['moe_std']:.2f} | {c['dense']:.2f} ± "
               f"{c['dense_std']:.2f} | {c['gap']:+.2f} | {c['bar']:.2f} | {c['verdict']} |" for c in cells]
    ax.axhline(0, color="grey", lw=1)
    ax.set_xlabel(" / ".join(sorted(keys)))
    ax.set_ylabel("MoE - dense-equal-flops, test accuracy (points)")
    ax.set_title("where the mixture pays: gap at equal counted FLOPs (bars: 2 x seed spread)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue(), "\n".join(md)


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def main(folders: list[str], labels: list[str] | None, out: str | None) -> int:
    png, md = draw_map(folders, labels)
    if out:
        atomic_write_bytes(Path(out), png)
    print(md)
    if out:
        print(f"\nwrote {out}")
    return 0
