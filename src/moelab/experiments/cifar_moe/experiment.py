"""The cifar_moe family's entry: the images, the mixture, its dense baselines, the summary (see
:mod:`moelab.experiments.cifar_moe`)."""

from __future__ import annotations

import time
from functools import partial

import torch

from moelab.cost import count_params, flops_per_example
from moelab.experiments import family
from moelab.experiments.baselines import EQUAL_COST, dense_widths, equal_cost_rows
from moelab.experiments.cifar_moe.config import RESUMABLE, Config, check_config
from moelab.experiments.cifar_moe.data import load_images
from moelab.experiments.cifar_moe.model import build_model
from moelab.experiments.cifar_moe.recipe import probe, train_model
from moelab.models.fast_cnn import FastCNN
from moelab.parallel import ddp
from moelab.precision import resolve_bf16
from moelab.train.run import Run
from moelab.train.trainer import seed_module_init


@family("cifar_moe", check=check_config, resumable=RESUMABLE, schema=Config)
def run(cfg: Config, run: Run) -> dict:
    ddp.require_single_process(f"{run.name} (family cifar_moe)")
    t, m = cfg.train, cfg.model
    t0 = time.perf_counter()
    data = load_images(cfg, run)
    bf16 = resolve_bf16(cfg.compute.bf16, run.device, key="compute.bf16")
    run.log(f"data: {len(data['train'])} train / {len(data['val'])} val / {len(data['test'])} test images "
            f"({time.perf_counter() - t0:.1f} s); device {run.device}, bf16 {bf16}, torch threads {torch.get_num_threads()}")
    fit = partial(train_model, cfg, run, data, bf16)
    models: dict[str, dict] = {}
    seed_module_init(run, "moe")
    n_cls = len(data["classes"])
    moe = fit("moe", build_model(m, aux_scale=t.aux_scale, num_classes=n_cls), t.epochs)
    moe.update(moe=m.moe, num_experts=m.num_experts, moe_blocks=m.moe_blocks)
    models["moe"] = moe
    if cfg.baselines.equal_cost and m.moe != "none":
        models.update(_equal_cost(cfg, run, moe, fit, data))
    if cfg.baselines.dense_twin and m.moe == "tokens":
        seed_module_init(run, "dense-twin")
        models["dense-twin"] = {**fit("dense-twin", build_model(m, twin=True, num_classes=n_cls), t.epochs),
                                "matched_to": "architecture"}
    if cfg.baselines.reference and m.moe != "none":
        seed_module_init(run, "dense-reference")
        models["dense-reference"] = {**fit("dense-reference", build_model(m, dense=True, num_classes=n_cls),
                                           t.epochs), "width": m.width}
    return {"test_accuracy": moe["test_accuracy"], "models": models,
            "protocol": {"val_size": len(data["val"]), "selection": "last step; settings chosen on the validation split",
                         "tta": cfg.eval.tta, "bf16": bf16, **({"dataset": data["dataset"]} if cfg.data.folder else {})}}


def _equal_cost(cfg: Config, run: Run, moe: dict, fit, data: dict) -> dict[str, dict]:
    m, t, x = cfg.model, cfg.train, probe(data)[:2]

    def dense(w: int) -> FastCNN:
        return build_model(m, w, dense=True, num_classes=len(data["classes"]))

    widths = dense_widths(moe, lambda w: count_params(dense(w)), lambda w: flops_per_example(dense(w), x),
                          hi=8 * m.width)

    def train_dense(phase: str, w: int) -> dict:  # a dense baseline: its initial weights seeded by its name
        seed_module_init(run, phase)
        return fit(phase, dense(w), t.epochs)

    names = EQUAL_COST if cfg.baselines.equal_params else ("dense-equal-flops",)
    rows = equal_cost_rows(run, widths, train_dense, names=names, make_dense=dense)
    if cfg.baselines.equal_time:
        ref = rows["dense-equal-flops"]
        epochs = t.epochs * moe["train_time_s"] / max(ref["train_time_s"], 1e-9)
        run.log(f"[dense-equal-time] the dense-equal-flops network for {epochs:.2f} epochs: the mixture's "
                f"{moe['train_time_s']} s of training at its measured speed")
        seed_module_init(run, "dense-equal-time")
        rows["dense-equal-time"] = {**fit("dense-equal-time", dense(ref["width"]), epochs), "width": ref["width"],
                                    "matched_to": "train_time_s"}
    return rows
