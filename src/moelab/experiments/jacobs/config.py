"""The ``jacobs`` family's typed config (:mod:`moelab.schema`): one frozen dataclass per section, and its
cross-key check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from moelab.config import Float, Int
from moelab.errors import ConfigError
from moelab.experiments.digits import Activation, DigitData
from moelab.experiments.sections import Compute
from moelab.schema import defaults_of, rules_of
from moelab.train.optim import Optim

Loss = Literal["mixture_ce", "jacobs_loglik", "logit_mixture_ce", "competitive"]
Balance = Literal["none", "importance", "switch", "entropy", "z"]
LOSSES, BALANCES = get_args(Loss), get_args(Balance)


@dataclass(frozen=True)
class Model:
    num_experts: Annotated[int, Int(ge=1)] = 10
    hidden: Annotated[int, Int(ge=1)] = 25  # each expert: in-hidden-classes
    gate_hidden: Annotated[int, Int(ge=1)] = 25  # the gate: in-gate_hidden-E
    activation: Activation = "gelu"  # modern only (faithful is sigmoid)
    gate_temperature: Annotated[float, Float(gt=0)] = 1.0  # modern only


@dataclass(frozen=True)
class Faithful:
    lr: Annotated[float, Float(gt=0)] = 10.0
    moe_epochs: Annotated[int, Int(ge=1)] = 3000
    single_epochs: Annotated[int, Int(ge=1)] = 2000
    gate_grad_scale: Annotated[float, Float(ge=0)] = 2.0  # the seed's gradient_ME doubles the gate's gradient; 1.0 = true
    dtype: Literal["float32", "float64"] = "float32"  # float64: the seed's NumPy precision
    chunk: Annotated[int, Int(ge=1)] = 4096  # examples per block of the full-batch gradient
    workers: Annotated[int, Int(ge=1)] = 2  # threads splitting the blocks, each op single-threaded
    log_every: Annotated[int, Int(ge=1)] = 100
    checkpoint_every: Annotated[int, Int(ge=1)] = 100


@dataclass(frozen=True)
class Baselines:
    equal_cost: bool = True  # also train dense-equal-params and dense-equal-flops (one dense MLP each, same recipe)


@dataclass(frozen=True)
class SeedProtocol:
    train_on_test: bool = False  # the seed's MoE loop: train (and report) on the test split
    shuffle_split: bool = False  # the seed's random 60000/10000 split of all 70000 images


@dataclass(frozen=True)
class Train(Optim):
    epochs: Annotated[int, Int(ge=1)] = 30
    single_epochs: Annotated[int, Int(ge=0)] = 0  # 0: same as epochs
    batch_size: Annotated[int, Int(ge=1)] = 128
    single_lr: Annotated[float, Float(ge=0)] = 0.0  # 0: same as lr
    loss: Loss = "mixture_ce"
    label_smoothing: Annotated[float, Float(ge=0, lt=1)] = 0.0
    balance: Balance = "none"
    balance_weight: Annotated[float, Float(ge=0)] = 0.0
    shift: Annotated[int, Int(ge=0, le=8)] = 0  # random translation of the original images (pixels; 0: off)
    log_every: Annotated[int, Int(ge=1)] = 1


@dataclass(frozen=True)
class Config:
    """The ``jacobs`` family's config (``digits-jacobs``, ``mnist-jacobs``, ``mnist-jacobs-faithful``); sizes
    that must fit the data are checked in :func:`moelab.experiments.digits.load_data`."""

    mode: Literal["faithful", "modern"] = "modern"  # "faithful": the seed, exactly
    data: DigitData = field(default_factory=DigitData)
    model: Model = field(default_factory=Model)
    faithful: Faithful = field(default_factory=Faithful)
    baselines: Baselines = field(default_factory=Baselines)
    seed_protocol: SeedProtocol = field(default_factory=SeedProtocol)
    train: Train = field(default_factory=Train)
    compute: Compute = field(default_factory=Compute)  # bf16: modern only


DEFAULTS, RULES = defaults_of(Config), rules_of(Config)
RESUMABLE = ("compute.threads", "train.log_every", "faithful.log_every", "faithful.checkpoint_every")


def check_config(c: Config) -> None:
    """Cross-key rules of the jacobs family."""
    if c.seed_protocol.train_on_test and c.mode != "faithful":
        raise ConfigError("seed_protocol.train_on_test = true applies to mode = \"faithful\" only "
                          f"(mode is {c.mode!r}).")
