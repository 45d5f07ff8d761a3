"""The sparse_mlp family's entry: the data, the mixture, the equal-cost dense baselines, the summary (see
:mod:`moelab.experiments.sparse_mlp`)."""

from __future__ import annotations

import time

import torch

from moelab.data.augment import Augment
from moelab.experiments import family
from moelab.experiments.digits import Splits, dense_baselines, format_lead, load_data
from moelab.experiments.sparse_mlp.config import RESUMABLE, Config, check_config
from moelab.experiments.sparse_mlp.model import build_model
from moelab.experiments.sparse_mlp.recipe import train_model
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.train.run import Run
from moelab.train.trainer import seed_module_init


@family("sparse_mlp", check=check_config, resumable=RESUMABLE, schema=Config)
def run(c: Config, run: Run) -> dict:
    t, m, d = c.train, c.model, c.data
    ddp.require_single_process(f"{run.name} (family sparse_mlp)")
    t0 = time.perf_counter()
    data = load_data(d, run.seed, run.data_dir, batch_size=t.batch_size)
    n_cls, (h, w) = data["num_classes"], data["shape"]
    augment = Augment(data, t.shift, t.rotate, t.scale)
    sp = Splits(data, d.val_size, run.seed, d.standardize, augment if augment.active else None)
    bf16, in_dim = resolve_bf16(c.compute.bf16, run.device, key="compute.bf16"), h * w
    for note in data["notes"]:
        run.log(note)
    run.log(f"data: {data['dataset']} {h}x{w}, {len(sp.train_y)} train / {len(sp.val_y)} val / {len(sp.test_y)} test "
            f"images ({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    models["moe"] = rep = train_model(run, "moe", build_model(m, in_dim, n_cls, aux_scale=t.aux_scale), t, sp, bf16)
    rep.update(num_experts=m.num_experts, router=m.router, k=m.k, hidden=m.hidden)
    if c.baselines.equal_cost:
        # matched to the trained mixture's counts: its active FLOPs on real validation images, router included
        def dense(hid: int) -> SparseMoEMLP:
            return build_model(m, in_dim, n_cls, hid, dense=True)

        def train_dense(phase: str, hid: int) -> dict:
            seed_module_init(run, phase)
            return {**train_model(run, phase, dense(hid), t, sp, bf16), "hidden": hid}

        names = ("dense-equal-params",) * c.baselines.equal_params + ("dense-equal-flops",)
        models.update(dense_baselines(run, rep, dense, sp.val_x[:4], train_dense, names))
    run.log(f"moe lead share (test split): {format_lead(rep['lead_share'])}")
    return {"test_accuracy": rep["test_accuracy"], "models": models, "lead_share": rep["lead_share"],
            "lead_share_pct": rep["lead_share_pct"], "class_expert_matrix": rep["class_expert_matrix"],
            "protocol": {"val_size": len(sp.val_y), "selection": "last epoch; settings chosen on the validation split",
                         "dense_hidden": {n: r.get("hidden") for n, r in models.items() if n != "moe"},
                         "router": m.router, "k": m.k, "num_experts": m.num_experts,
                         **({"dataset": data["dataset"]} if d.folder else {})}}
