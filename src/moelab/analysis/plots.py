"""The report's figures, each returned as PNG bytes (matplotlib, Agg; no pyplot global state)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _labels(n: int, names: Sequence[str] | None) -> list[str]:
    return list(names) if names and len(names) == n else [str(i) for i in range(n)]


def _annotate(ax, values: np.ndarray, fmt: str, norm: np.ndarray) -> None:
    if values.size > 400:  # too small to read
        return
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black")


def routing_heatmap(class_expert: Sequence[Sequence[int]], class_names: Sequence[str] | None = None) -> bytes:
    """Class x expert heat map: the share of each class's test examples that each expert leads."""
    counts = np.asarray(class_expert, dtype=float)
    c, e = counts.shape
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(2.5 + 0.45 * max(e, 4), 1.2 + 0.35 * max(c, 4)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    _annotate(ax, counts, "{:.0f}", frac)
    ax.set_xticks(range(e), [str(i) for i in range(e)])
    ax.set_yticks(range(c), _labels(c, class_names))
    ax.set_xlabel("lead expert")
    ax.set_ylabel("true class")
    ax.set_title("class x expert routing\n(colour: share of the class; text: count)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _png(fig)


def usage_chart(mean_gate: Sequence[float], lead_share: Sequence[float]) -> bytes:
    """Per expert: mean gate weight and lead share, side by side; the dashed line is uniform use."""
    e = len(mean_gate)
    x = np.arange(e)
    fig = Figure(figsize=(max(4.0, 0.6 * e + 2), 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, mean_gate, 0.4, label="mean gate weight")
    ax.bar(x + 0.2, lead_share, 0.4, label="lead share")
    ax.axhline(1 / max(e, 1), color="grey", ls="--", lw=1)
    ax.set_xticks(x, [str(i) for i in range(e)])
    ax.set_xlabel("expert")
    ax.set_ylim(0, 1)
    ax.set_title("expert usage")
    ax.legend(fontsize=8)
    return _png(fig)


def expert_accuracy_chart(accuracy: Sequence[float], lead_share: Sequence[float], of: str) -> bytes:
    """Per expert: accuracy on the test examples it leads (bar width ~ lead share)."""
    e = len(accuracy)
    acc = np.nan_to_num(np.asarray(accuracy, dtype=float), nan=0.0)
    width = 0.2 + 0.7 * np.asarray(lead_share, dtype=float) / max(max(lead_share, default=0), 1e-9)
    fig = Figure(figsize=(max(4.0, 0.6 * e + 2), 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(np.arange(e), acc, width)
    for i in np.flatnonzero(np.isnan(np.asarray(accuracy, dtype=float))):
        ax.text(i, 0.02, "idle", ha="center", fontsize=8, color="grey")
    ax.set_xticks(range(e), [str(i) for i in range(e)])
    ax.set_ylim(0, 1)
    ax.set_xlabel("expert (bar width ~ lead share)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"accuracy on the examples each expert leads\n(prediction of the {of})", fontsize=9)
    return _png(fig)


def gate_entropy_hist(entropies: Sequence[float], max_bits: float) -> bytes:
    """Histogram of per-example gate entropy (0 = one expert takes all)."""
    fig = Figure(figsize=(5, 3), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(np.asarray(entropies, dtype=float), bins=30, range=(0, max(max_bits, 1e-6)))
    ax.set_xlabel(f"gate entropy (bits, max {max_bits:.2f})")
    ax.set_ylabel("test examples")
    ax.set_title("gate entropy")
    return _png(fig)


def confusion_plot(confusion: Sequence[Sequence[int]], class_names: Sequence[str] | None = None,
                   title: str = "confusion matrix") -> bytes:
    """Confusion matrix, rows normalised (true class), counts written in the cells."""
    counts = np.asarray(confusion, dtype=float)
    c = counts.shape[0]
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 1.5 + 0.4 * max(c, 4)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    _annotate(ax, counts, "{:.0f}", frac)
    names = _labels(c, class_names)
    ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0)
    ax.set_yticks(range(c), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return _png(fig)


KINDS = ("loss", "error", "accuracy", "learning rate", "other")


def _kind(key: str) -> str:
    k = key.lower()
    if "loss" in k:
        return "loss"
    if "err" in k:
        return "error"
    if "acc" in k:
        return "accuracy"
    return "learning rate" if k == "lr" or k.endswith("_lr") else "other"


def training_curves(rows: Sequence[dict]) -> bytes | None:
    """Every numeric metric of metrics.jsonl against epoch, one line per (phase, metric); losses,
    errors, accuracies, learning rates and the rest on separate axes. None if there is nothing to plot."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if not isinstance(row.get("epoch"), int | float):
            continue
        phase = str(row.get("phase", ""))
        for k, v in row.items():
            if k in ("epoch", "phase") or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if math.isfinite(v):
                series.setdefault((phase, k), []).append((row["epoch"], v))
    series = {k: pts for k, pts in series.items() if any(v != 0 for _, v in pts)}  # e.g. a disabled aux loss
    if not series:
        return None
    kinds = [k for k in KINDS if any(_kind(m) == k for _, m in series)]
    fig = Figure(figsize=(4.2 * len(kinds), 3.4), layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds):
        for (phase, metric), pts in sorted(series.items()):
            if _kind(metric) == kind:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3,
                        label=f"{phase}: {metric}" if phase else metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(kind)
        ax.legend(fontsize=7)
    return _png(fig)


def routing_over_training(rows: Sequence[dict], key: str = "val_lead_share") -> bytes | None:
    """Each expert's share of the images it leads (``key``: a per-expert list in metrics.jsonl rows)
    against epoch, one panel per phase that logged it: how routing settles (or collapses) in training.
    None if no row has it."""
    series: dict[str, list[tuple[float, list[float]]]] = {}
    for row in rows:
        share = row.get(key)
        if isinstance(share, list) and share and isinstance(row.get("epoch"), int | float):
            series.setdefault(str(row.get("phase", "")), []).append((row["epoch"], [float(v) for v in share]))
    if not series:
        return None
    fig = Figure(figsize=(4.2 * len(series), 3.4), layout="constrained")
    axes = fig.subplots(1, len(series), squeeze=False)[0]
    for ax, (phase, pts) in zip(axes, sorted(series.items())):
        pts.sort(key=lambda p: p[0])
        xs = [x for x, _ in pts]
        shares = np.asarray([s for _, s in pts], dtype=float)  # (epochs, E)
        ax.stackplot(xs, shares.T, labels=[f"expert {e}" for e in range(shares.shape[1])])
        ax.set_xlabel("epoch")
        ax.set_ylabel("share of images led")
        ax.set_ylim(0, 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{phase}: routing along training" if phase else "routing along training")
        ax.legend(fontsize=7, loc="upper right")
    return _png(fig)
