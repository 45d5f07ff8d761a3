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
import tomllib
from collections.abc import Mapping
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
