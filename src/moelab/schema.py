"""Typed configs: a family's config as frozen dataclasses, one per section.

A field's type says what it accepts, so the schema, the value rules and the object the family's code
reads are one declaration::

    @dataclass(frozen=True)
    class Train:
        epochs: Annotated[int, Int(ge=1)] = 20          # an integer >= 1
        optimizer: Literal["adamw", "sgd"] = "adamw"    # one of the two (a Choice rule)
        bf16: Switch = Switch("false")                  # true | false | "auto"
        shuffle: bool = True                            # a boolean needs no rule

    @dataclass(frozen=True)
    class Config:
        threads: Annotated[int, Int(ge=0)] = 1
        train: Train = field(default_factory=Train)

:func:`defaults_of` gives the nested default dict (the TOML schema :mod:`moelab.config` checks files
and ``--set`` against), :func:`rules_of` the flattened key -> :class:`moelab.config.Rule` map, and
:func:`typed` turns a checked config dict into the dataclasses (``cfg.train.epochs``). List-valued
keys are ``list[...]`` fields with a ``default_factory``; they stay lists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from moelab.config import Choice, Rule

__all__ = ["defaults_of", "rules_of", "typed"]

T = TypeVar("T")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _section(hint: Any) -> type | None:
    """The dataclass a field's type names (a sub-section), else None."""
    base = get_args(hint)[0] if get_origin(hint) is Annotated else hint
    return base if isinstance(base, type) and dataclasses.is_dataclass(base) else None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field '{f.name}' has no default (every key of a config has one)")


def defaults_of(cls: type, instance: Any = None) -> dict:
    """The nested dict of ``cls``'s defaults (sections as tables). A section field whose default is an
    instance (``compute: Compute = field(default_factory=lambda: Compute(threads=1))``) gives that
    instance's values: a shared section (:mod:`moelab.experiments.sections`) with a family's own defaults."""
    hints, out = _hints(cls), {}
    for f in dataclasses.fields(cls):
        sub = _section(hints[f.name])
        value = _default(f) if instance is None else getattr(instance, f.name)
        if sub is not None:
            out[f.name] = defaults_of(sub, value if isinstance(value, sub) else None)
        else:
            out[f.name] = value
    return out


def _rule(hint: Any) -> Rule | None:
    if get_origin(hint) is Annotated:
        base, *meta = get_args(hint)
        rules = [m for m in meta if isinstance(m, Rule)]
        return rules[0] if rules else _rule(base)
    if get_origin(hint) is Literal:
        return Choice(*get_args(hint))
    return None


def rules_of(cls: type, prefix: str = "") -> dict[str, Rule]:
    """Flattened key -> rule: ``Literal[...]`` fields are a :class:`~moelab.config.Choice`, ``Annotated[T, rule]``
    fields that rule; booleans and switches have none (their type lists their values)."""
    hints, out = _hints(cls), {}
    for f in dataclasses.fields(cls):
        sub = _section(hints[f.name])
        if sub is not None:
            out.update(rules_of(sub, f"{prefix}{f.name}."))
        elif (rule := _rule(hints[f.name])) is not None:
            out[f"{prefix}{f.name}"] = rule
    return out


def typed(cls: type[T], cfg: Mapping[str, Any]) -> T:
    """``cfg`` (checked against :func:`defaults_of` ``(cls)``) as an instance of ``cls``; keys that are not
    fields (``family``, ``description``, ``run``) are left out."""
    hints, kwargs = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name not in cfg:
            continue
        sub = _section(hints[f.name])
        kwargs[f.name] = typed(sub, cfg[f.name]) if sub is not None else cfg[f.name]
    return cls(**kwargs)
