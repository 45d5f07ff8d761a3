"""moelab.schema: typed configs (frozen dataclasses) -> defaults, rules and the object a family reads."""

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Literal

import pytest

from moelab.config import Choice, Float, Int, Switch, apply_overrides, check_rules
from moelab.errors import ConfigError
from moelab.schema import defaults_of, rules_of, typed


@dataclass(frozen=True)
class Train:
    epochs: Annotated[int, Int(ge=1)] = 20
    lr: Annotated[float, Float(gt=0)] = 0.1
    optimizer: Literal["adamw", "sgd"] = "adamw"
    bf16: Switch = Switch("auto")
    shuffle: bool = True
    widths: list[int] = field(default_factory=lambda: [16, 32])


@dataclass(frozen=True)
class Cfg:
    threads: Annotated[int, Int(ge=0)] = 1
    train: Train = field(default_factory=Train)


def test_defaults_are_the_nested_dict():
    assert defaults_of(Cfg) == {"threads": 1, "train": {"epochs": 20, "lr": 0.1, "optimizer": "adamw",
                                                       "bf16": "auto", "shuffle": True, "widths": [16, 32]}}
    assert isinstance(defaults_of(Cfg)["train"]["bf16"], Switch)


def test_rules_come_from_the_types():
    rules = rules_of(Cfg)
    assert set(rules) == {"threads", "train.epochs", "train.lr", "train.optimizer"}  # bool / Switch / list: none
    assert isinstance(rules["train.optimizer"], Choice) and rules["train.optimizer"].choices == ("adamw", "sgd")
    assert rules["train.epochs"].expected == "an integer >= 1"
    with pytest.raises(ConfigError, match=r"train.optimizer = \"adam\" is out of range: expected one of 'adamw', 'sgd'"):
        check_rules(apply_overrides(defaults_of(Cfg), ["train.optimizer=adam"]), rules)


def test_typed_builds_the_dataclasses_and_skips_meta_keys():
    cfg = apply_overrides({"family": "toy", **defaults_of(Cfg)}, ["train.epochs=3", "threads=2"])
    c = typed(Cfg, {**cfg, "run": {"seed": 0}})
    assert c == Cfg(threads=2, train=Train(epochs=3))
    assert c.train.widths == [16, 32] and c.train.optimizer == "adamw"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.threads = 3  # type: ignore[misc]


def test_a_field_without_default_is_refused():
    @dataclass(frozen=True)
    class Bad:
        epochs: int

    with pytest.raises(TypeError, match="config field 'epochs' has no default"):
        defaults_of(Bad)


@pytest.mark.parametrize("module", ["jacobs", "sparse_mlp", "cifar_moe", "cifar_experts"])
def test_typed_families_read_their_schema(module):
    import importlib

    from moelab.experiments import get_family

    mod = importlib.import_module(f"moelab.experiments.{module}")
    fam = get_family(module)
    assert fam.schema is mod.Config and fam.defaults == defaults_of(mod.Config)
    assert typed(mod.Config, fam.defaults) == mod.Config()  # the defaults round-trip
