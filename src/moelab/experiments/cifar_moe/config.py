"""The ``cifar_moe`` family's typed config (:mod:`moelab.schema`): one frozen dataclass per section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from moelab.config import Check, Float, Int, refuse
from moelab.experiments import sections
from moelab.experiments.folder_data import FolderPath
from moelab.experiments.router_recipe import check_recipe
from moelab.experiments.sections import ConvCompute
from moelab.moe.routers import resolve
from moelab.schema import defaults_of, rules_of

MoEKind = Literal["none", "condconv", "blocks", "tokens"]
BlockRouter = Literal["topk", "noisy_topk", "switch", "expert_choice", "dense"]
MOES, BLOCK_ROUTERS = get_args(MoEKind), get_args(BlockRouter)


def _blocks_ok(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(
        isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 3 for b in v)


@dataclass(frozen=True)
class Data:
    dataset: Literal["cifar10"] = "cifar10"
    folder: FolderPath = ""  # any RGB / grey image folder (sides >= 17 px) instead of dataset (experiments.folder_data)
    val_size: Annotated[int, Int(ge=1)] = 5000
    train_per_class: Annotated[int, Int(ge=0)] = 0  # 0: all
    test_per_class: Annotated[int, Int(ge=0)] = 0
    # rotate: "rotated by rotate_deg or not"; tilt: "by -rotate_deg/2 or +rotate_deg/2" (no blur cue,
    # moelab.data.tasks); the class becomes the latent label
    task: Literal["classes", "rotate", "tilt"] = "classes"
    rotate_deg: Annotated[float, Float(gt=0, lt=180)] = 30.0  # task = rotate: the angle of the rotated half
    rotate_crop: Annotated[int, Int(ge=0)] = 0  # task = rotate: centre crop side (0: the largest with no empty
    # corner, 22 px at 30 degrees); at least 9 px (the CNN's three 2x poolings after its 2x2 whitening)
    grayscale: bool = False  # colour -> luma before the task: JPEG chroma blocks give a rotation away (data.tasks)


@dataclass(frozen=True)
class Model:
    width: Annotated[int, Int(ge=4)] = 128  # block widths (width / 4, width, width); airbench94: 256
    moe: MoEKind = "condconv"
    moe_blocks: Annotated[list[int], Check(_blocks_ok, "a non-empty list of distinct block numbers 1..3")] = \
        field(default_factory=lambda: [3])  # which of the blocks 1..3 are mixtures (tokens: followed by one)
    num_experts: Annotated[int, Int(ge=1)] = 4
    routing: Literal["softmax", "sigmoid"] = "softmax"  # condconv
    temperature: Annotated[float, Float(gt=0)] = 1.0  # condconv: routing logits / temperature
    router: BlockRouter = "topk"  # blocks, tokens (noisy_topk: Shazeer 2017; expert_choice: each expert takes cf * N / E)
    expert_block: Literal["same", "resnet"] = "same"  # blocks: copies of the replaced block | ConvBlockExperts
    k: Annotated[int, Int(ge=1)] = 2  # blocks, tokens: experts per image / per position (topk, noisy_topk; top-1: switch)
    capacity_factor: Annotated[float, Float(gt=0, also=(0.0,))] = 0.0  # blocks, tokens: 0 = the router's (expert_choice: 2)
    expert_hidden: Annotated[int, Int(ge=0)] = 0  # tokens: each expert's hidden width; 0 = 2 x the block width
    # the router recipe (moelab.experiments.router_recipe); dense router: the per-image soft mixture
    router_init: Literal["default", "zeros"] = "default"  # zeros: the gate (condconv: routing function) starts at 0
    router_noise: Literal["none", "uniform"] = "none"  # blocks, tokens with topk, switch: U(0, 1) on the choosing logits
    balance: Literal["aux", "bias"] = "aux"  # blocks, tokens with topk, switch: bias = aux-loss-free (DeepSeek-V3)
    bias_rate: Annotated[float, Float(gt=0)] = 1e-3  # balance = bias: each step's bias move per expert


@dataclass(frozen=True)
class Train:
    epochs: Annotated[float, Float(gt=0)] = 10.0  # may be fractional: the schedule is in steps
    batch_size: Annotated[int, Int(ge=1)] = 1024
    lr: Annotated[float, Float(gt=0)] = 11.5  # airbench's units: per 1024 summed examples, / (1 + 1 / (1 - momentum))
    momentum: Annotated[float, Float(ge=0, lt=1)] = 0.85
    weight_decay: Annotated[float, Float(ge=0)] = 0.0153
    bias_scaler: Annotated[float, Float(gt=0)] = 64.0
    label_smoothing: Annotated[float, Float(ge=0, lt=1)] = 0.2
    whiten_bias_epochs: Annotated[int, Int(ge=0)] = 3
    warmup_frac: Annotated[float, Float(ge=0, lt=1)] = 0.23
    translate: Annotated[int, Int(ge=0, le=8)] = 2
    flip: bool = True
    aux_scale: Annotated[float, Float(ge=0)] = 1.0  # multiplies the router's default auxiliary-loss weights (blocks)
    routing_lr_scale: Annotated[float, Float(gt=0)] = 0.1  # routers' lr / the conv weights' lr (make_optimizer)
    log_every: Annotated[int, Int(ge=1)] = 1


@dataclass(frozen=True)
class Eval(sections.Eval):  # batch_size = 1000
    tta: Annotated[int, Int(ge=0, le=2)] = 2  # 0 none, 1 flip, 2 flip + 1-pixel translations


@dataclass(frozen=True)
class Baselines:
    equal_cost: bool = True  # dense-equal-flops (+ dense-equal-params unless equal_params = false)
    equal_params: bool = True
    equal_time: bool = True  # needs equal_cost
    reference: bool = True
    dense_twin: bool = True  # tokens: the same network with each token MoE one dense FFN of k x its hidden width


@dataclass(frozen=True)
class Config:
    """The ``cifar_moe`` family's config (``cifar10-moe``)."""

    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)
    compute: ConvCompute = field(default_factory=ConvCompute)  # threads 0, bf16 "auto", channels_last
    baselines: Baselines = field(default_factory=Baselines)


DEFAULTS, RULES = defaults_of(Config), rules_of(Config)
RESUMABLE = ("compute.threads", "train.log_every", "eval.batch_size")


def check_config(c: Config) -> None:
    """Cross-key rules: k of E experts; no top-1 through a router whose one weight is always 1; recipe keys only
    where a router takes them; no flips with the tilt task (a flip turns one tilt into the other)."""
    if c.data.task == "tilt" and c.train.flip:
        raise refuse("train.flip", True, "false with data.task = tilt (a horizontal flip turns one tilt into the "
                     "other: the label would be wrong)")
    if c.data.task == "tilt" and c.eval.tta:
        raise refuse("eval.tta", c.eval.tta, "0 with data.task = tilt (test-time flips turn one tilt into the other)")
    m = c.model
    if m.moe in ("blocks", "tokens"):
        check_recipe(m, m.router, BLOCK_ROUTERS)
        if m.router == "dense" and m.capacity_factor:
            raise refuse("model.capacity_factor", m.capacity_factor, "0 with model.router = dense (no capacity)")
    elif m.moe == "condconv":
        for key, default in (("router_noise", "none"), ("balance", "aux")):
            if getattr(m, key) != default:
                raise refuse(f"model.{key}", getattr(m, key), f"{default!r} with model.moe = condconv (a top-k "
                             f"router's option: model.moe = blocks or tokens)")
    if m.moe not in ("blocks", "tokens") or not resolve(m.router)[0].takes_k:  # the routers that take k
        return
    if m.k == 1:
        raise refuse("model.k", 1, f"at least 2 with model.router = {m.router}: its weights are a softmax over the k "
                     "chosen logits, so with k = 1 the one weight is always 1 and the gate learns nothing from the "
                     "task (only from the balance loss); for top-1 use model.router = switch (weighted by its "
                     "softmax probability)")
    if m.k > m.num_experts:
        raise refuse("model.k", m.k, f"at most model.num_experts = {m.num_experts} (experts per image)")
