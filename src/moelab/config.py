"""Experiment configs: TOML files checked against a typed schema.

An experiment *family* (``moelab.experiments``) declares its defaults as a nested
dict; the defaults are the schema: every key a config may set, with its type.
A config is the family's defaults, updated by a TOML file (a built-in one shipped
in ``moelab/experiments/configs/`` or the user's own), then by ``--set`` overrides.
Unknown keys and wrongly typed values are errors that list what is valid.

A config file names its family (``family = "jacobs"``) or a built-in config it
extends (``base = "mnist-jacobs"``); ``description`` is free text.
"""

from __future__ import annotations

import copy
import math
import sys
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moelab.errors import ConfigError

META_KEYS = ("family", "base", "description")


class Switch(str):
    """Schema type of a switch that may also be left to moelab: ``true``, ``false`` or ``"auto"``.

    A default written as ``Switch("auto")`` accepts a TOML boolean or the string "auto"; the value is
    kept as a ``Switch`` ("true" / "false" / "auto"), so later overrides are checked the same way.
    Read it with :func:`moelab.precision.resolve_bf16` (or ``switch == "true"``), not as a bool."""

    CHOICES = ("true", "false", "auto")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(v), type(v).__name__
    )


def _check_value(key: str, value: Any, default: Any, where: str) -> Any:
    """Return ``value`` coerced to the default's type, or raise ConfigError."""
    if isinstance(default, Switch):
        if isinstance(value, bool):
            return Switch("true" if value else "false")
        if isinstance(value, str) and value.strip().lower() in Switch.CHOICES:
            return Switch(value.strip().lower())
        raise ConfigError(f"{where}: key '{key}' expects true, false or \"auto\" (default {str(default)!r}), "
                          f"got {_type_name(value)} {value!r}.")
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int)
    elif isinstance(default, list):
        ok = isinstance(value, list)
        if ok and default and value:
            proto = default[0]
            value = [_check_value(f"{key}[{i}]", v, proto, where) for i, v in enumerate(value)]
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{where}: key '{key}' expects {_type_name(default)} (default {default!r}), "
            f"got {_type_name(value)} {value!r}."
        )
    return value


def merge(defaults: dict, update: Mapping[str, Any], where: str, prefix: str = "") -> dict:
    """Deep-update a copy of ``defaults`` with ``update``, checking keys and types."""
    out = copy.deepcopy(defaults)
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in out:
            valid = ", ".join(sorted(prefix + k2 for k2 in flatten(defaults)))
            raise ConfigError(f"{where}: unknown key '{key}'. Valid keys here: {valid}.")
        if isinstance(out[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}: key '{key}' is a table of settings, got {_type_name(v)} {v!r}.")
            out[k] = merge(out[k], v, where, key + ".")
        else:
            out[k] = _check_value(key, v, out[k], where)
    return out


# ---------------------------------------------------------------- renamed keys
# Old dotted key -> its new name (issue #35: one spelling per concept in every family: ``batch_size``,
# ``compute.threads``, ``compute.bf16``, ``eval.batch_size``, ``data.dataset``). The old names are read for one
# release, with a one-line warning on stderr, wherever a config is read: ``--set`` (and ``moelab study --grid``), config files
# (``family = ...`` or ``base = ...``) and the config.toml of a run directory being resumed. An old key is
# renamed only where its family has the new one; elsewhere it stays an unknown key.
RENAMED_KEYS: dict[str, str] = {
    "threads": "compute.threads",  # jacobs, sparse_mlp, cifar_moe
    "train.bf16": "compute.bf16",  # jacobs, sparse_mlp
    "train.batch": "train.batch_size",  # cifar_moe
    "eval.batch": "eval.batch_size",  # cifar_moe
    "compute.eval_batch": "eval.batch_size",  # cifar_experts
    "experts.batch": "experts.batch_size",  # cifar_experts
    "generalist.batch": "generalist.batch_size",
    "gate.batch": "gate.batch_size",
    "baseline.batch": "baseline.batch_size",
    "data.name": "data.dataset",  # cifar_experts, cifar_moe (the digit families' spelling)
}
_warned: set[str] = set()


def _deprecated(old: str, new: str, where: str) -> None:
    """Warn (once per old key in a process: a study resolves each cell's config several times) that ``old``
    is read as ``new``."""
    if old not in _warned:
        _warned.add(old)
        print(f"moelab: {old} is deprecated, use {new} ({where}; the old name is read until the next release)",
              file=sys.stderr, flush=True)


def renamed_key(key: str, known: Mapping[str, Any] | set[str], where: str) -> str:
    """``key`` (dotted) under its new name if it is an old one whose new name is in ``known`` (warning)."""
    new = RENAMED_KEYS.get(key)
    if new is None or new not in known:
        return key
    _deprecated(key, new, where)
    return new


def upgrade_keys(update: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict:
    """A copy of the nested table ``update`` (a config file's body) with every old key of
    :data:`RENAMED_KEYS` moved to its new name, where ``defaults`` (the schema) has the new one (warning);
    an old and a new key given together are refused."""
    out, known = copy.deepcopy(dict(update)), flatten(defaults)
    for old, new in RENAMED_KEYS.items():
        *path, leaf = old.split(".")
        node: Any = out
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or new not in known:
            continue
        *new_path, new_leaf = new.split(".")
        target: Any = out
        for p in new_path:
            target = target.setdefault(p, {}) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue  # the new key's table is not a table here: merge names the error
        if new_leaf in target:
            raise ConfigError(f"{where}: both '{old}' and '{new}' are given; '{old}' is the old name of '{new}': "
                              f"keep '{new}' only.")
        target[new_leaf] = node.pop(leaf)
        _deprecated(old, new, where)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is a TOML literal, or a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. --set train.epochs=5.")
    key, raw = text.split("=", 1)
    key, raw = key.strip(), raw.strip()
    if not key:
        raise ConfigError(f"--set '{text}': the key is empty.")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: treat as a string
    return key, value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides (type-checked against ``cfg``)."""
    for text in overrides:
        key, value = parse_override(text)
        key = renamed_key(key, flatten(cfg), f"--set {text.strip()}")
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        meta = {k: cfg[k] for k in META_KEYS if k in cfg}
        body = {k: v for k, v in cfg.items() if k not in META_KEYS}
        if parts[0] in META_KEYS:
            raise ConfigError(f"--set {key}: '{parts[0]}' cannot be overridden.")
        if parts[0] not in body:
            raise ConfigError(
                f"--set {key}: unknown key '{key}'. Valid keys: {', '.join(sorted(flatten(body)))}."
            )
        try:
            body = merge(body, nested, f"--set {key}")
        except ConfigError as e:
            if "unknown key" in str(e):
                raise ConfigError(
                    f"--set {key}: unknown key '{key}'. Valid keys: {', '.join(sorted(flatten(body)))}."
                ) from None
            raise
        cfg = {**meta, **body}
    return cfg


def read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read as UTF-8 text: {e}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}.") from None


# ---------------------------------------------------------------- TOML writing
def _toml_value(v: Any) -> str:
    if isinstance(v, Switch) and v != "auto":
        return str(v)  # true / false
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(d: Mapping[str, Any]) -> str:
    """Write a nested dict of scalars/lists as TOML (the subset configs use)."""
    lines: list[str] = []

    def table(node: Mapping[str, Any], name: str) -> None:
        scalars = [(k, v) for k, v in node.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in node.items() if isinstance(v, Mapping)]
        if name and scalars:
            lines.append(f"\n[{name}]")
        for k, v in scalars:
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables:
            table(v, f"{name}.{k}" if name else k)

    table(d, "")
    return "\n".join(lines).lstrip("\n") + "\n"


# ---------------------------------------------------------------- value rules
# A family declares, beside its defaults (the types), what values each key accepts: ``{"train.lr":
# Float(gt=0), "model.router": Choice("topk", "switch"), ...}`` keyed by the flattened dotted key.
# Booleans and switches need no rule (their type lists every value); every other key must have one
# (tests/test_config_rules.py enumerates the schemas).
class Rule:
    """What a config key accepts beyond its type; ``expected`` says it in words for the error."""

    expected: str = "a valid value"

    def ok(self, value: Any) -> bool:
        raise NotImplementedError


def _fmt(x: float) -> str:
    return f"{x:g}"


class _Range(Rule):
    def __init__(self, ge: float | None = None, gt: float | None = None, le: float | None = None,
                 lt: float | None = None, also: tuple = (), what: str = "a number"):
        self.ge, self.gt, self.le, self.lt, self.also = ge, gt, le, lt, tuple(also)
        bounds = [f"{op} {_fmt(b)}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
        self.expected = f"{what}{' ' + ' and '.join(bounds) if bounds else ''}" + \
            "".join(f", or {a!r}" for a in self.also)

    def ok(self, value: Any) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.le is not None and value > self.le) or (self.lt is not None and value >= self.lt))


class Int(_Range):
    """An integer in a range, e.g. ``Int(ge=1)``; ``also``: special values outside it (``also=(0,)``: 0 = off)."""

    def __init__(self, ge: int | None = None, gt: int | None = None, le: int | None = None, lt: int | None = None,
                 also: tuple = ()):
        super().__init__(ge, gt, le, lt, also, what="an integer")


class Float(_Range):
    """A finite number in a range, e.g. ``Float(gt=0)`` for a learning rate, ``Float(ge=0, lt=1)``."""

    def __init__(self, ge: float | None = None, gt: float | None = None, le: float | None = None,
                 lt: float | None = None, also: tuple = ()):
        super().__init__(ge, gt, le, lt, also, what="a finite number")


class Choice(Rule):
    """One of a fixed set of strings."""

    def __init__(self, *choices: str):
        self.choices = choices
        self.expected = "one of " + ", ".join(repr(c) for c in choices)

    def ok(self, value: Any) -> bool:
        return value in self.choices


class Text(Rule):
    """Free text (a data-set name, a path): any non-empty string."""

    expected = "a non-empty string"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value.strip() != ""


class Check(Rule):
    """A rule given as a predicate and its description (for list-valued keys)."""

    def __init__(self, ok: Callable[[Any], bool], expected: str):
        self._ok, self.expected = ok, expected

    def ok(self, value: Any) -> bool:
        return bool(self._ok(value))


def needs_rule(default: Any) -> bool:
    """Whether a key with this default must declare a rule (booleans and switches list their values)."""
    return not isinstance(default, bool | Switch)


def check_rules(cfg: Mapping[str, Any], rules: Mapping[str, Rule], where: str = "config") -> None:
    """Raise ConfigError for the first key of ``cfg`` whose value its rule refuses."""
    flat = flatten(cfg)
    for key, rule in rules.items():
        if key in flat and not rule.ok(flat[key]):
            raise ConfigError(f"{where}: {key} = {_toml_repr(flat[key])} is out of range: expected {rule.expected}.")


def refuse(key: str, value: Any, expected: str, where: str | None = None) -> ConfigError:
    """The error for a value a cross-key or data-dependent rule refuses (raise it)."""
    return ConfigError(f"{where + ': ' if where else ''}{key} = {_toml_repr(value)} is out of range: "
                       f"expected {expected}.")


def _toml_repr(v: Any) -> str:
    try:
        return _toml_value(v)
    except TypeError:
        return repr(v)
