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

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn

from moelab.config import flatten
from moelab.cost import match_width
from moelab.io import atomic_path, atomic_write_json
from moelab.train.run import Run

EQUAL_COST = ("dense-equal-params", "dense-equal-flops")
MATCHED_KEY = {"dense-equal-params": "params", "dense-equal-flops": "flops_per_example"}


def dense_widths(target: dict, params_of: Callable[[int], float], flops_of: Callable[[int], float],
                 hi: int = 1 << 14) -> dict[str, int]:
    """The widths whose counted parameters / FLOPs per example are closest to ``target["params"]`` /
    ``target["flops_per_example"]`` (bisection, :func:`moelab.cost.match_width`)."""
    return {"dense-equal-params": match_width(params_of, target["params"], hi=hi),
            "dense-equal-flops": match_width(flops_of, target["flops_per_example"], hi=hi)}


class SharedRows:
    """Dense rows shared by the runs of a study (``moelab study``): a dense baseline whose network, recipe,
    data, seed and phase are those of one trained in another cell is not trained again; its row (and its
    test predictions) are reused, marked ``reused_from``. Keyed by content: the family, seed and phase,
    the dense network as built (its ``repr``: layers and widths), and every config key outside
    ``model`` and ``baselines`` (the recipe and the data; the model keys reach the key through the
    network they build)."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)

    def key(self, run: Run, name: str, net: nn.Module) -> str:
        cfg = {k: v for k, v in flatten(run.cfg).items()
               if not k.startswith(("model.", "baselines.")) and k not in ("description", "compute.threads")}
        blob = json.dumps({"seed": run.seed, "phase": name, "net": repr(net), "cfg": cfg}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def get(self, run: Run, key: str, name: str) -> dict | None:
        path = self.dir / f"{key}.json"
        if not path.is_file():
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
        src = Path(entry["run_dir"]) / "eval" / f"{name}.safetensors"
        if src.is_file() and run.is_main:  # the report and compare read the predictions from this run
            with atomic_path(run.dir / "eval" / src.name) as tmp:
                shutil.copyfile(src, tmp)
        return {**entry["row"], "reused_from": entry["run_dir"]}

    def put(self, run: Run, key: str, row: dict) -> None:
        if run.is_main:
            atomic_write_json(self.dir / f"{key}.json", {"run_dir": str(run.dir), "row": row})

    @contextlib.contextmanager
    def claim(self, key: str):
        """Hold ``key`` while its row is looked up and, if missing, trained: a study running cells in parallel
        (``--jobs``) trains each shared row once; the others wait for it and reuse it (an advisory
        ``flock`` on ``<key>.lock``; where there is none, no lock)."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            yield
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{key}.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def equal_cost_rows(run: Run, widths: dict[str, int], train_dense: Callable[[str, int], dict],
                    extra: dict | None = None, names: tuple[str, ...] = EQUAL_COST,
                    make_dense: Callable[[int], nn.Module] | None = None) -> dict[str, dict]:
    """``{name: row}`` for the baselines ``names`` (default both): ``train_dense(name, width) -> row`` once per
    distinct width; each row gains ``width``, ``matched_to`` (the cost it matches) and ``extra``.

    In a study (``run.shared_rows``, :class:`SharedRows`) and given ``make_dense(width)``, a row another
    cell already trained with the same network, recipe and seed is reused instead of trained again."""
    rows: dict[str, dict] = {}
    shared: SharedRows | None = getattr(run, "shared_rows", None) if make_dense is not None else None
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
        skey = shared.key(run, name, make_dense(w)) if shared is not None else None
        with shared.claim(skey) if shared is not None else contextlib.nullcontext():
            rows[name] = _shared_or_trained(run, name, w, key, ext, shared, skey, train_dense)
    return rows


def _shared_or_trained(run: Run, name: str, w: int, key: str, ext: dict, shared: SharedRows | None,
                       skey: str | None, train_dense: Callable[[str, int], dict]) -> dict:
    reused = shared.get(run, skey, name) if shared is not None else None
    if reused is not None:
        run.log(f"[{name}] width {w}: the same network, recipe and seed as in {reused['reused_from']}; "
                f"its row is reused (trained once in this study)")
        return {**reused, **ext}
    run.log(f"[{name}] one dense network of width {w}, matched to the mixture's {key}")
    row = {**train_dense(name, w), **ext}
    if shared is not None:
        shared.put(run, skey, {k: v for k, v in row.items() if k not in ext})
    return row
