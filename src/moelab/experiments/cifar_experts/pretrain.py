"""The CIFAR seed's experts: the class-pair CNNs (and the generalist) pretrained or loaded from the content-keyed
cache, and their outputs on every split, computed once."""

from __future__ import annotations

import time

import torch
from torch import nn

from moelab.data.location import cache_dir
from moelab.experiments.cifar import Mirrored, images_of
from moelab.experiments.cifar_experts.common import (
    Data,
    config_hash,
    full_classes,
    outputs,
    section_dict,
    to_memory_format,
    train_classifier,
    use_bf16,
)
from moelab.experiments.cifar_experts.config import Config
from moelab.models.cifar_cnn import Seed1CNN
from moelab.reproductions.conv_experts import ConvExperts
from moelab.reproductions.gating import HIERARCHICAL
from moelab.train.checkpoint import load_checkpoint, save_checkpoint
from moelab.train.evaluation import accuracy
from moelab.train.run import Run

CACHE_VERSION = 1


def generalist_key(cfg: Config, data: Data, seed: int) -> str:
    return config_hash({"v": CACHE_VERSION, "generalist": cfg.generalist, "l2": cfg.experts.l2,
                        "augment": cfg.augment, "bf16": use_bf16(cfg, data.device), "data": data.key, "seed": seed})


def expert_key(cfg: Config, data: Data, seed: int) -> str:
    spec = {k: v for k, v in section_dict(cfg.experts).items() if k not in ("cache", "cache_flipped")}
    if spec.get("init", "scratch") == "scratch":
        spec.pop("init", None)  # keys of experts trained before the option existed stay valid
    else:
        spec["generalist"] = generalist_key(cfg, data, seed)
        spec["keep_start"] = "pair"  # the generalist is a candidate for the best checkpoint, judged within the pair
    return config_hash({"v": CACHE_VERSION, "experts": spec, "augment": cfg.augment,
                        "bf16": use_bf16(cfg, data.device), "data": data.key, "seed": seed})


def needs_generalist(cfg: Config) -> bool:
    return "generalist" in (cfg.experts.init, cfg.gate.init) or cfg.gate.kind == HIERARCHICAL


def train_generalist(cfg: Config, run: Run, data: Data) -> tuple[Seed1CNN, dict]:
    """One expert-architecture CNN on all classes (phase ``generalist``), cached by content."""
    key = generalist_key(cfg, data, run.seed)
    path = cache_dir() / "generalist" / f"{key}.safetensors"
    torch.manual_seed(run.generator("init", "generalist").initial_seed())  # before the init: weights by seed
    model = Seed1CNN(len(data.classes))
    if cfg.experts.cache and path.is_file():
        tensors, meta = load_checkpoint(path)
        model.load_state_dict(tensors)
        run.log(f"[generalist] loaded from cache {path} (trained in {meta.get('train_s', 0):.0f} s)")
        return model.to(data.device).eval(), {"cached": True, "key": key, **meta}
    gc = cfg.generalist
    info = train_classifier(run, "generalist", model, full_classes(data), data.val, cfg, epochs=gc.epochs,
                            batch=gc.batch_size, lr=gc.lr, schedule=gc.schedule, l2=cfg.experts.l2,
                            shift=cfg.augment.max_shift, keep_best=gc.schedule == "plateau")
    model = model.to(memory_format=torch.contiguous_format)
    meta = {"train_s": run.phase_times["generalist"]["elapsed_s"], "train_img_per_s": info["train_img_per_s"]}
    if cfg.experts.cache:
        save_checkpoint(path, model.state_dict(), meta)
        run.log(f"[generalist] cached as {path}")
    return model.eval(), {"cached": False, "key": key, **meta}


def pretrain_experts(cfg: Config, run: Run, data: Data, generalist: Seed1CNN | None = None) -> tuple[ConvExperts, dict]:
    """Train (or load from the cache) one expert per class pair -> (stacked ConvExperts, info).

    ``experts.init = "generalist"``: each expert starts as a copy of ``generalist`` (a specialist)."""
    key = expert_key(cfg, data, run.seed)
    path = cache_dir() / "experts" / f"{key}.safetensors"
    E = len(data.pairs)
    experts = ConvExperts(E, len(data.classes), impl=cfg.compute.impl)
    if cfg.experts.cache and path.is_file():
        tensors, meta = load_checkpoint(path)
        experts.load_state_dict(tensors)
        run.log(f"[experts] loaded from cache {path} (trained in {meta.get('train_s', 0):.0f} s)")
        return experts.to(data.device).eval(), {"cached": True, "key": key, "path": str(path), **meta}
    ec = cfg.experts
    infos = []
    for i, (a, b) in enumerate(data.pairs):
        tr = images_of(data.train, [a, b])
        va = images_of(data.val, [a, b])
        torch.manual_seed(run.generator("init", f"expert{i}").initial_seed())
        m = Seed1CNN(len(data.classes))
        if ec.init == "generalist":
            m.load_state_dict(generalist.state_dict())
        run.log(f"[expert{i}] pair ({data.classes[a]}, {data.classes[b]}): {len(tr)} train, {len(va)} val images")
        info = train_classifier(run, f"expert{i}", m, tr, va, cfg, epochs=ec.epochs, batch=ec.batch_size,
                                lr=ec.lr, schedule="plateau", l2=ec.l2, shift=cfg.augment.max_shift,
                                plateau_patience=ec.plateau_patience, plateau_factor=ec.plateau_factor,
                                min_lr=ec.min_lr, early_stop=ec.early_stop_patience, keep_best=True,
                                keep_start=ec.init == "generalist",
                                val_classes=[a, b] if ec.init == "generalist" else None)
        experts.load_expert_state_dict(i, m.to(memory_format=torch.contiguous_format).state_dict())
        infos.append({**info, "wall_s": run.phase_times[f"expert{i}"]["elapsed_s"]})  # resumes included
    train_s = sum(i["wall_s"] for i in infos)
    imgs = sum(i["train_img_per_s"] * i["train_s"] for i in infos)
    meta = {"train_s": train_s, "train_img_per_s": imgs / max(sum(i["train_s"] for i in infos), 1e-9),
            "best_val": [i["best_val"] for i in infos], "best_epoch": [i["best_epoch"] for i in infos],
            "expert_train_s": [round(i["wall_s"], 1) for i in infos]}
    if ec.cache:
        save_checkpoint(path, experts.state_dict(), meta)
        run.log(f"[experts] cached as {path}")
    return experts.to(data.device).eval(), {"cached": False, "key": key, "path": str(path), **meta}


def expert_fn(modules: nn.ModuleList):
    """x -> (probs (E, N, K), pooled features (N, E*C)). The experts run one after the other: the
    ``separate`` form of ConvExperts, the fastest measured in bf16 on this CPU (ConvExperts.AUTO_TABLE)."""

    def fn(x):
        probs, feats = [], []
        for m in modules:
            h = m.trunk(x)
            feats.append(h.float().mean((2, 3)))
            probs.append(torch.softmax(m.head(h.flatten(1)).float(), dim=1))
        return torch.stack(probs), torch.cat(feats, dim=1)

    return fn


def expert_outputs(cfg: Config, run: Run, data: Data, experts: ConvExperts, key: str,
                   eval_only: bool = False) -> tuple[dict, dict]:
    """Cached expert probabilities/features for train (plain + flipped), val and test; with
    ``eval_only`` (no gate is trained on them) val and test only, unless the full set is cached."""
    flipped = cfg.experts.cache_flipped and not eval_only
    root = cache_dir() / "expert-outputs"
    names = [f"{key}-eval", f"{key}-flip", key] if eval_only else [f"{key}-flip" if flipped else key]
    paths = [root / f"{n}.safetensors" for n in names]  # eval_only: any cached set holds val and test
    hit = next((p for p in paths if p.is_file()), None) if cfg.experts.cache else None
    if hit is not None:
        tensors, meta = load_checkpoint(hit)
        if eval_only and hit != paths[0] and meta.get("images"):  # a full set: count only the val + test share
            n = len(data.val) + len(data.test)
            meta = {**meta, "infer_s": meta["infer_s"] * n / meta["images"], "images": n}
        run.log(f"[experts] outputs loaded from cache {hit}")
        return tensors, {"cached": True, **meta}
    path = paths[0]
    modules = experts.to_modules().eval()
    for m in modules:
        to_memory_format(m, cfg, data.device)
    fn = expert_fn(modules)
    t0 = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    n = 0
    splits = [("train", data.train), ("val", data.val), ("test", data.test)][eval_only:]
    if flipped:
        splits.insert(1, ("train_flip", Mirrored(data.train)))
    for name, images in splits:
        probs, feats = outputs(fn, images, cfg)
        out[f"{name}.probs"], out[f"{name}.feats"] = probs.to(torch.bfloat16), feats.to(torch.bfloat16)
        n += len(images)
    dt = time.perf_counter() - t0
    meta = {"infer_s": dt, "infer_img_per_s": n / dt, "images": n}
    run.log(f"[experts] outputs of {n} images in {dt:.1f} s ({n / dt:.0f} images/s for the {experts.num_experts} experts)")
    if cfg.experts.cache:
        save_checkpoint(path, out, meta)
    return out, {"cached": False, **meta}


def expert_reports(data: Data, cache: dict) -> dict:
    """Each expert on its own pair's test images; uniform average; oracle pair routing."""
    probs = cache["test.probs"].float()  # (E, N, K)
    y = data.test.y
    models = {}
    for i, (a, b) in enumerate(data.pairs):
        m = (y == a) | (y == b)
        acc = accuracy(probs[i][m], y[m])
        models[f"expert{i}-{data.classes[a]}-{data.classes[b]}"] = {"test_accuracy": acc, "scope": "own pair"}
    uni = probs.mean(0)
    models["baseline-uniform"] = {"test_accuracy": accuracy(uni, y)}
    oracle = torch.einsum("ne,enk->nk", data.cover[y], probs)
    models["oracle-pair"] = {"test_accuracy": accuracy(oracle, y),
                             "scope": "upper bound: each image routed to the experts of its true class"}
    return models, uni
