"""The cifar_experts family's entry: the seed-1 pipeline's phases in order (see
:mod:`moelab.experiments.cifar_experts`)."""

from __future__ import annotations

import json
import time

import torch

from moelab.cost import cost_row
from moelab.experiments import family
from moelab.experiments.baselines import equal_cost_rows
from moelab.experiments.cifar_experts.common import (
    Data,
    full_classes,
    load_average,
    outputs,
    to_memory_format,
    train_classifier,
    use_bf16,
)
from moelab.experiments.cifar_experts.config import RESUMABLE, Config, check_config
from moelab.experiments.cifar_experts.gate import (
    cost_probe,
    finetune,
    gate_predict,
    hierarchical_mixture,
    mixture_cost,
    seed_cnn_widths,
    train_gate,
)
from moelab.experiments.cifar_experts.pretrain import (
    expert_outputs,
    expert_reports,
    needs_generalist,
    pretrain_experts,
    train_generalist,
)
from moelab.models.cifar_cnn import Seed1CNN
from moelab.parallel import ddp
from moelab.precision import cpu_bf16_isa
from moelab.reproductions.gating import HIERARCHICAL, SEED_LR, GateNet
from moelab.train.evaluation import accuracy, routing_stats, save_eval
from moelab.train.run import Run

# ----------------------------------------------------------------------------- the experiment


@family("cifar_experts", check=check_config, resumable=RESUMABLE, schema=Config)
def run_cifar_experts(cfg: Config, run: Run) -> dict:
    ddp.require_single_process(run.name)
    p = Pipeline(cfg, run)
    p.experts_and_outputs()
    p.count_costs()
    if p.kind == HIERARCHICAL:
        p.hierarchical()
    elif p.kind != "none":
        p.gate()
    if p.kind != "none":
        p.mixture_budget()
    if cfg.baselines:
        p.dense_baselines()
    summary = p.summary
    summary.setdefault("test_accuracy", p.models["baseline-uniform"]["test_accuracy"])
    summary["models"], summary["timings"] = p.models, p.timings
    run.log("timings: " + json.dumps(p.timings, default=str))
    return summary


class Pipeline:
    """The seed-1 pipeline's phases in order, sharing the run's state: ``models`` (summary rows), ``timings``,
    ``summary``. Cached phases (experts, their outputs, the generalist) load instead of training."""

    def __init__(self, cfg: Config, run: Run):
        self.cfg, self.run, self.t_start = cfg, run, time.perf_counter()
        self.kind = cfg.gate.kind
        self.data = data = Data(cfg, run)
        self.y = data.test.y
        run.log(f"data: {cfg.data.dataset} (checksum {data.checksum[:12]}), train {len(data.train)}, "
                f"val {len(data.val)}, test {len(data.test)}; {len(data.pairs)} experts; torch threads "
                f"{torch.get_num_threads()}; device {data.device}, bf16 {use_bf16(cfg, data.device)} (compute.bf16 = "
                f"{cfg.compute.bf16}, CPU bf16: {cpu_bf16_isa()}), channels_last {cfg.compute.channels_last}")
        self.summary: dict = {
            "dataset": "CIFAR-10 (JPEG-75 copy)" if cfg.data.dataset == "cifar10" else cfg.data.dataset,
            "pairs": [[data.classes[a], data.classes[b]] for a, b in data.pairs]}

    def experts_and_outputs(self) -> None:
        """The generalist (if one is needed), the pair experts, their cached outputs, the generalist's predictions."""
        cfg, run, data, kind = self.cfg, self.run, self.data, self.kind
        self.generalist, self.ginit = (train_generalist(cfg, run, data) if needs_generalist(cfg) else (None, None))
        self.experts, self.einfo = pretrain_experts(cfg, run, data, self.generalist)
        self.summary["expert_key"] = self.einfo["key"]
        self.cache, self.oinfo = expert_outputs(cfg, run, data, self.experts, self.einfo["key"],
                                                eval_only=kind == HIERARCHICAL)
        self.models, uniform = expert_reports(data, self.cache)
        t0 = time.perf_counter()  # the hierarchical mixture's gate is the generalist: its inference is part of it
        splits = (("val", data.val), ("test", data.test)) if kind == HIERARCHICAL else (("test", data.test),)
        self.gen_probs = ({split: torch.softmax(outputs(to_memory_format(self.generalist, cfg, data.device), images, cfg)[0], 1)
                           for split, images in splits} if self.generalist is not None else {})
        self.gen_infer_s = time.perf_counter() - t0
        if self.generalist is not None:
            self.models["generalist"] = {"test_accuracy": accuracy(self.gen_probs["test"], self.y),
                                         "epochs": cfg.generalist.epochs,
                                         "scope": "the single CNN the specialists / gate trunk start from"}
        save_eval(run, "baseline-uniform", self.y, uniform, None, data.classes)
        ginit, einfo, oinfo = self.ginit, self.einfo, self.oinfo
        self.timings = {
            "data_and_experts_s": round(time.perf_counter() - self.t_start, 1),
            "experts": {k: einfo.get(k) for k in ("cached", "train_s", "train_img_per_s")},
            "generalist": {k: ginit.get(k) for k in ("cached", "train_s", "train_img_per_s")} if ginit else None,
            "expert_outputs": {k: oinfo.get(k) for k in ("cached", "infer_s", "infer_img_per_s")},
            "load_1min_after_experts": load_average(), "torch_threads": torch.get_num_threads()}

    def count_costs(self) -> None:
        """Every row's params and inference FLOPs per example, counted (moelab.cost) on real test images outside
        the timed phases; ``train_time_s``: the phases' wall-clock (cached ones: when they were computed)."""
        data, models = self.data, self.models
        self.probe = cost_probe(data)
        self.one_cnn = cost_row(Seed1CNN(len(data.classes)), self.probe)  # an expert, the generalist, the single CNN
        gen_s = self.ginit["train_s"] if self.ginit else 0.0
        per_expert = self.einfo.get("expert_train_s") or [None] * len(data.pairs)  # caches older than the key
        for i, (a, b) in enumerate(data.pairs):
            models[f"expert{i}-{data.classes[a]}-{data.classes[b]}"].update(self.one_cnn, train_time_s=per_expert[i])
        experts_s = self.einfo["train_s"] + (gen_s if self.cfg.experts.init == "generalist" else 0.0)
        models["baseline-uniform"].update(mixture_cost(self.probe, self.experts), train_time_s=round(experts_s, 1))
        models["oracle-pair"].update(params=None, flops_per_example=None, train_time_s=None)  # needs the true label
        if self.generalist is not None:
            models["generalist"].update(self.one_cnn, train_time_s=round(gen_s, 1))
        self.summary["cost"] = {"counted": "moelab.cost: FlopCounterMode on a real forward pass in eval mode, "
                                           "matmuls + convolutions, 2 FLOPs per multiply-add",
                                "probe_images": int(self.probe.shape[0]), "one_cnn": self.one_cnn,
                                "reference": self.reference}

    def hierarchical(self) -> None:
        t0 = time.perf_counter()
        data, kind = self.data, self.kind
        logits, weights, hinfo = hierarchical_mixture(self.cfg, self.run, data, self.gen_probs, self.cache)
        acc = accuracy(logits, self.y)
        self.models[f"moe-{kind}"] = {"test_accuracy": acc, "val_accuracy": hinfo["val_acc"], "blend": hinfo["blend"],
                                      "scope": "the generalist as top-level gate, each expert within its pair"}
        save_eval(self.run, f"moe-{kind}", self.y, torch.softmax(logits, 1), weights, data.classes)
        self.summary["routing"] = routing_stats(self.y, weights, len(data.classes))
        self.timings["gate"] = {"train_s": round(time.perf_counter() - t0 + self.gen_infer_s, 1),
                                "train_img_per_s": None, "load_1min": load_average(),
                                "what": "generalist inference on val + test, blend fitted on val"}
        self.models[f"moe-{kind}"].update(mixture_cost(self.probe, self.experts, kind, generalist=self.generalist,
                                                       cover=data.cover, blend=hinfo["blend"]))
        self.summary["test_accuracy"] = acc

    def _mixture_row(self, name: str, logits: torch.Tensor, weights: torch.Tensor, gate: GateNet) -> float:
        acc = accuracy(logits, self.y)
        self.models[name] = {"test_accuracy": acc}
        save_eval(self.run, name, self.y, torch.softmax(logits, 1), weights, self.data.classes)
        self.models[name].update(mixture_cost(self.probe, self.experts, self.kind, gate,
                                              top_k=self.cfg.gate.top_k))
        self.summary["test_accuracy"] = acc
        return acc

    def gate(self) -> None:
        """The gate trained on the cached expert outputs, then (``gate.finetune_epochs``) gate and experts jointly."""
        cfg, run, data, kind = self.cfg, self.run, self.data, self.kind
        gate, ginfo = train_gate(cfg, run, data, self.cache, self.generalist)
        logits, weights = gate_predict(cfg, gate, kind, data.test, self.cache, "test", gate.extra_dim)
        name = f"moe-{kind}"
        self.summary["routing"] = routing_stats(self.y, weights, len(data.classes))
        self.timings["gate"] = {"train_s": run.train_time("gate"),  # resumes included
                                "train_img_per_s": ginfo["train_img_per_s"], "lr": ginfo["lr"], "load_1min": load_average()}
        self._mixture_row(name, logits, weights, gate)
        self.models[name]["val_accuracy"] = ginfo["last"].get("val_acc")
        if kind == "sparse":
            self.models[name]["note"] = (f"all experts run: the top-{cfg.gate.top_k} gate values weigh their "
                                         f"outputs (a routed implementation would run only those)")
        if cfg.gate.finetune_epochs > 0:
            finfo = finetune(cfg, run, data, self.experts, gate, self.cache)
            logits, weights = gate_predict(cfg, gate, kind, data.test, self.cache, "test", 0, finfo["experts_fn"])
            self.timings["finetune"] = {"train_s": run.train_time("finetune"),
                                        "train_img_per_s": finfo["train_img_per_s"], "load_1min": load_average()}
            self._mixture_row(f"{name}-finetuned", logits, weights, gate)

    def mixture_budget(self) -> None:
        """The mixture's whole training budget, cached phases counted at the time they took when trained."""
        t, kind, models = self.timings, self.kind, self.models
        t["pipeline_s"] = round(time.perf_counter() - self.t_start, 1)
        before = sum(p["train_s"] for p in (t["generalist"], t["experts"]) if p) \
            + (self.oinfo.get("infer_s") or 0.0) + t["gate"]["train_s"]
        budget = before + t.get("finetune", {}).get("train_s", 0)
        t["mixture_budget_s"] = round(budget, 1)
        models[f"moe-{kind}"]["train_time_s"] = round(before, 1)
        if f"moe-{kind}-finetuned" in models:
            models[f"moe-{kind}-finetuned"]["train_time_s"] = round(budget, 1)

    @property
    def reference(self) -> str:
        """The row the equal-cost baselines are matched to."""
        return f"moe-{self.kind}" if self.kind != "none" else "baseline-uniform"

    def train_dense(self, name: str, width: int = 32, epochs: int = 1, is_trunk: bool = False) -> dict:
        """One Seed1CNN of ``width`` on all classes: the single-CNN recipe (``baseline.*``), or the gate's
        (``is_trunk``: the gate trunk as a 10-way classifier). Its row: accuracy, counted cost, time."""
        cfg, bc, data = self.cfg, self.cfg.baseline, self.data
        lr, schedule = (SEED_LR["standard"], cfg.gate.schedule) if is_trunk else (bc.lr, bc.schedule)
        torch.manual_seed(self.run.generator("init", name).initial_seed())
        m = Seed1CNN(len(data.classes), width=width)
        shift = (cfg.augment.max_shift if cfg.gate.shift else 0) if is_trunk else cfg.augment.max_shift
        info = train_classifier(self.run, name, m, full_classes(data), data.val, cfg, epochs=epochs,
                                batch=cfg.gate.batch_size if is_trunk else bc.batch_size, lr=lr, schedule=schedule,
                                l2=cfg.experts.l2, shift=shift, keep_best=schedule == "plateau",
                                early_stop=cfg.experts.early_stop_patience if schedule == "plateau" else 0)
        logits = outputs(m, data.test, cfg)[0]
        save_eval(self.run, name, self.y, torch.softmax(logits, 1), None, data.classes)
        self.timings[name] = {"train_s": self.run.train_time(name), "train_img_per_s": info["train_img_per_s"],
                              "load_1min": load_average()}
        return {"test_accuracy": accuracy(logits, self.y), "epochs": epochs, **cost_row(m, self.probe),
                "train_time_s": self.timings[name]["train_s"]}

    def single_epochs(self) -> int:
        """``baseline.epochs``, or (0) the epochs that fit the mixture's budget at the generalist's speed."""
        n = self.cfg.baseline.epochs
        if n == 0:
            speed = (self.ginit or {}).get("train_img_per_s") or self.einfo.get("train_img_per_s")
            n = max(1, int(self.timings.get("mixture_budget_s", 0) * speed / len(full_classes(self.data))))
            self.run.log(f"[baseline-single-cnn] {n} epochs: the mixture's budget of "
                         f"{self.timings.get('mixture_budget_s', 0):.0f} s at {speed:.0f} images/s")
        return n

    def dense_baselines(self) -> None:
        """The gate trunk and the single CNN as classifiers, dense-equal-time, -params and -flops."""
        cfg, bc, models, ref = self.cfg, self.cfg.baseline, self.models, self.reference
        single_epochs = self.single_epochs()
        if bc.trunk_epochs >= 0:  # -1: skip it
            models["baseline-gate-trunk"] = self.train_dense("baseline-gate-trunk", is_trunk=True,
                                                             epochs=bc.trunk_epochs or cfg.gate.epochs)
        models["baseline-single-cnn"] = single = self.train_dense("baseline-single-cnn", epochs=single_epochs)
        single["note"] = (f"smaller network: one expert's size, {models[ref]['params'] / single['params']:.1f}x fewer "
                          f"parameters than {ref}" + ("; given its training wall-clock (dense-equal-time)"
                                                       if bc.epochs == 0 and self.kind != "none" else ""))
        if bc.epochs == 0 and "mixture_budget_s" in self.timings:  # the single CNN had the mixture's budget
            models["dense-equal-time"] = {**single, "same_model_as": "baseline-single-cnn", "matched_to": "train_time_s",
                                          "matched_to_model": ref, "target_train_time_s": self.timings["mixture_budget_s"]}
        if bc.equal_cost:
            widths = seed_cnn_widths(len(self.data.classes), models[ref], self.probe)
            self.summary["cost"]["dense_widths"] = widths
            epochs = bc.equal_cost_epochs or single_epochs
            target = {"matched_to_model": ref, "target_params": models[ref]["params"],
                      "target_flops_per_example": models[ref]["flops_per_example"]}
            models.update(equal_cost_rows(self.run, widths, lambda name, w: self.train_dense(name, w, epochs=epochs),
                                          target))
        if self.kind == "none":
            self.summary["test_accuracy"] = single["test_accuracy"]
