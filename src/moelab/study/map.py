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
import statistics
from collections import defaultdict
from pathlib import Path

from matplotlib.figure import Figure

from moelab.errors import MoelabError
from moelab.io import atomic_write_bytes


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
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("test_accuracy"):
            acc[(r[key], r["model"])].append(100 * float(r["test_accuracy"]))
    out = []
    for value in spec["grid"][key]:
        moe, dense = acc.get((value, "moe")), acc.get((value, "dense-equal-flops"))
        if not moe or not dense:
            continue
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (moe, dense)]
        gap, bar = statistics.fmean(moe) - statistics.fmean(dense), 2 * max(sd)
        n = min(len(moe), len(dense))
        verdict = "tie" if n < 2 or abs(gap) <= bar else ("MoE wins" if gap > 0 else "dense wins")
        out.append({"value": value, "moe": statistics.fmean(moe), "moe_std": sd[0], "dense": statistics.fmean(dense),
                    "dense_std": sd[1], "gap": gap, "bar": bar, "verdict": verdict, "n": n})
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
