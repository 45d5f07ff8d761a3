"""Equal-cost dense baselines, shared by every experiment family (issue #15).

A mixture is judged against dense networks of the same kind and recipe, trained in the same run:
``dense-equal-params`` (the mixture's total parameter count) and ``dense-equal-flops`` (its counted
inference FLOPs per example, :func:`moelab.cost.flops_per_example`). A family supplies how to build a
dense network of a given width (for counting) and how to train one (returning its model row); this
module picks the widths and trains each distinct one once: where both widths coincide (a dense-gated
mixture runs every expert, so one network has both its parameters and its FLOPs) the FLOPs row repeats
the parameters row with ``same_model_as``.
"""

from __future__ import annotations

from collections.abc import Callable

from moelab.cost import match_width
from moelab.train.run import Run

EQUAL_COST = ("dense-equal-params", "dense-equal-flops")
MATCHED_KEY = {"dense-equal-params": "params", "dense-equal-flops": "flops_per_example"}


def dense_widths(target: dict, params_of: Callable[[int], float], flops_of: Callable[[int], float],
                 hi: int = 1 << 14) -> dict[str, int]:
    """The widths whose counted parameters / FLOPs per example are closest to ``target["params"]`` /
    ``target["flops_per_example"]`` (bisection, :func:`moelab.cost.match_width`)."""
    return {"dense-equal-params": match_width(params_of, target["params"], hi=hi),
            "dense-equal-flops": match_width(flops_of, target["flops_per_example"], hi=hi)}


def equal_cost_rows(run: Run, widths: dict[str, int], train_dense: Callable[[str, int], dict],
                    extra: dict | None = None, names: tuple[str, ...] = EQUAL_COST) -> dict[str, dict]:
    """``{name: row}`` for the baselines ``names`` (default both): ``train_dense(name, width) -> row`` once per
    distinct width; each row gains ``width``, ``matched_to`` (the cost it matches) and ``extra``."""
    rows: dict[str, dict] = {}
    for name in EQUAL_COST:
        if name not in names:
            continue
        w, key = widths[name], MATCHED_KEY[name]
        ext = {"width": w, "matched_to": key, **(extra or {})}
        same = next((n for n, r in rows.items() if r["width"] == w and "same_model_as" not in r), None)
        if same is not None:
            rows[name] = {**rows[same], **ext, "same_model_as": same}
            run.log(f"[{name}] width {w}: the same network as {same} (equal parameters and equal FLOPs); "
                    f"trained once, its row repeated")
            continue
        run.log(f"[{name}] one dense network of width {w}, matched to the mixture's {key}")
        rows[name] = {**train_dense(name, w), **ext}
    return rows
