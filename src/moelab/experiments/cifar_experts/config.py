"""The ``cifar_experts`` family's typed config (:mod:`moelab.schema`): one frozen dataclass per section."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from moelab.config import Check, Choice, Float, Int, refuse
from moelab.experiments.sections import ConvCompute, Eval
from moelab.reproductions.conv_experts import IMPLS
from moelab.reproductions.gating import GATE_KINDS, HIERARCHICAL
from moelab.schema import defaults_of, rules_of

# The seed's pairs: experts 0-4 as coded, experts 5-9 as intended (the seed's code gave them all class
# 5 as second class and never loaded them).
SEED_PAIRS = [[0, 8], [1, 9], [2, 6], [3, 5], [4, 7], [0, 9], [1, 8], [2, 7], [3, 6], [4, 5]]

Init = Literal["scratch", "generalist"]
Schedule = Literal["onecycle", "plateau"]  # plateau: the seed's, halve after epochs without gain
INITS, SCHEDULES = get_args(Init), get_args(Schedule)


def _valid_pairs(pairs) -> bool:
    return bool(pairs) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(c, int) and 0 <= c < 10 for c in p)
                               and p[0] != p[1] for p in pairs)


@dataclass(frozen=True)
class DataConfig:  # (Data is the loaded data set, cifar_experts.common.Data)
    dataset: Literal["cifar10"] = "cifar10"
    val_size: Annotated[int, Int(ge=1)] = 5000  # validation images carved (stratified) from the training set
    train_per_class: Annotated[int, Int(ge=0)] = 0  # >0: keep only this many training images per class (test slices)
    test_per_class: Annotated[int, Int(ge=0)] = 0  # >0: likewise for the test set
    pairs: Annotated[list[list[int]], Check(_valid_pairs, "a non-empty list of [a, b] pairs of distinct CIFAR-10 "
                                                          "class indices 0..9")] = \
        field(default_factory=lambda: [list(p) for p in SEED_PAIRS])  # one expert per pair of class indices


@dataclass(frozen=True)
class Augment:
    max_shift: Annotated[int, Int(ge=0, le=16)] = 3  # random shift up to 3 px (10% of 32) + flip, as the seed
    hflip: bool = True


@dataclass(frozen=True)
class Compute(ConvCompute):  # threads 0, bf16 "auto", channels_last
    impl: Annotated[str, Choice(*IMPLS)] = "auto"  # how ConvExperts runs the ten CNNs


@dataclass(frozen=True)
class Experts:
    epochs: Annotated[int, Int(ge=1)] = 12
    batch_size: Annotated[int, Int(ge=1)] = 128
    lr: Annotated[float, Float(gt=0)] = 1e-3
    l2: Annotated[float, Float(ge=0)] = 1e-4  # Keras kernel_regularizer on the conv kernels
    plateau_patience: Annotated[int, Int(ge=1)] = 2
    plateau_factor: Annotated[float, Float(gt=0, lt=1)] = 0.5
    min_lr: Annotated[float, Float(ge=0)] = 1e-6
    early_stop_patience: Annotated[int, Int(ge=0)] = 10
    cache: bool = True
    cache_flipped: bool = True  # also cache the experts' outputs for the mirrored training images
    init: Init = "scratch"  # generalist: start each expert from the generalist CNN, then train on its pair


@dataclass(frozen=True)
class Generalist:
    """One CNN of the expert architecture trained on all classes first (only when experts.init or gate.init
    is "generalist"): the specialists and the gate trunk start from it. Cached by content like the experts."""

    epochs: Annotated[int, Int(ge=1)] = 20
    batch_size: Annotated[int, Int(ge=1)] = 128
    lr: Annotated[float, Float(gt=0)] = 2e-3
    schedule: Schedule = "onecycle"


@dataclass(frozen=True)
class Gate:
    kind: Annotated[str, Choice(*GATE_KINDS, HIERARCHICAL, "none")] = "standard"
    epochs: Annotated[int, Int(ge=1)] = 10
    batch_size: Annotated[int, Int(ge=1)] = 128
    lr: Annotated[float, Float(ge=0)] = 0.0  # 0: the seed's lr for this kind (standard 1e-3, sparse 1e-4, two gates 5e-4)
    schedule: Schedule = "onecycle"
    shift: bool = True  # gate-side random shift (the experts' cached outputs are of the unshifted image)
    l2: Annotated[float, Float(ge=0)] = 1e-4
    weight_decay: Annotated[float, Float(ge=0)] = 0.0
    label_smoothing: Annotated[float, Float(ge=0, lt=1)] = 0.0
    aux_weight: Annotated[float, Float(ge=0)] = 0.0  # the oracle-pair routing loss (gate softmax vs. true pair)
    top_k: Annotated[int, Int(ge=1)] = 2  # sparse gating
    trunk: bool = True  # expert-aware: false = no conv trunk, the gate reads only the experts' outputs
    hidden: Annotated[int, Int(ge=1)] = 256  # expert-aware: width of the layer reading the experts' outputs
    extra_dropout: Annotated[float, Float(ge=0, lt=1)] = 0.3
    finetune_epochs: Annotated[int, Int(ge=0)] = 0  # >0: then fine-tune experts + gate jointly
    finetune_lr: Annotated[float, Float(gt=0)] = 1e-4
    init: Init = "scratch"  # generalist: the gate trunk starts from the generalist CNN's trunk
    # hierarchical: logits = lerp(log generalist, log mixture, blend); < 0: fitted on the validation images
    blend: Annotated[float, Float(le=1)] = -1.0


@dataclass(frozen=True)
class Baseline:
    """``epochs = 0``: as many single-CNN epochs as fit the mixture's whole training budget (generalist +
    experts + expert outputs + gate, measured in this run), i.e. the single CNN at equal wall-clock.
    ``equal_cost``: also train dense-equal-params / dense-equal-flops (one Seed1CNN widened to the mixture's
    counted parameters / inference FLOPs per example, this recipe); ``equal_cost_epochs``: their epochs
    (0: the single CNN's)."""

    epochs: Annotated[int, Int(ge=0)] = 30
    batch_size: Annotated[int, Int(ge=1)] = 128
    lr: Annotated[float, Float(gt=0)] = 2e-3
    schedule: Schedule = "onecycle"
    trunk_epochs: Annotated[int, Int(ge=0, also=(-1,))] = 0
    equal_cost: bool = True
    equal_cost_epochs: Annotated[int, Int(ge=0)] = 0


@dataclass(frozen=True)
class Config:
    """The ``cifar_experts`` family's config (``cifar10-experts`` and friends); sizes that must fit the data
    are checked in :class:`moelab.experiments.cifar_experts.common.Data`."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: Augment = field(default_factory=Augment)
    compute: Compute = field(default_factory=Compute)
    eval: Eval = field(default_factory=lambda: Eval(batch_size=500))
    experts: Experts = field(default_factory=Experts)
    generalist: Generalist = field(default_factory=Generalist)
    gate: Gate = field(default_factory=Gate)
    baselines: bool = False
    baseline: Baseline = field(default_factory=Baseline)


DEFAULTS, RULES = defaults_of(Config), rules_of(Config)
RESUMABLE = ("compute.threads",)


def check_config(cfg: Config) -> None:
    """Cross-key rules of the cifar_experts family."""
    g = cfg.gate
    if g.kind == HIERARCHICAL and g.finetune_epochs > 0:
        raise refuse("gate.finetune_epochs", g.finetune_epochs, "0 with gate.kind = \"hierarchical\" "
                     "(no gate network to fine-tune)")
    if g.kind == "expert-aware" and g.finetune_epochs > 0:
        raise refuse("gate.finetune_epochs", g.finetune_epochs, "0 with gate.kind = \"expert-aware\" "
                     "(joint fine-tuning is not implemented for it)")
    if g.kind == "sparse" and g.top_k > len(cfg.data.pairs):
        raise refuse("gate.top_k", g.top_k, f"at most the {len(cfg.data.pairs)} experts (data.pairs)")
