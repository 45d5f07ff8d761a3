"""Experiments: one package per family, shared modules beside them, built-in TOML configs in ``configs/``.

A family package registers itself with :func:`family`, giving its default config
(the schema of every key it reads, with its type), the rules saying which values each key
accepts (:mod:`moelab.config`: ``Int``, ``Float``, ``Choice``, ...), an optional cross-key
check, the keys a resumed run may change, and a ``run(cfg, run)`` function that trains,
evaluates and returns the summary dict (``test_accuracy`` and, when it trains several models,
``models: {name: {"test_accuracy": ...}}``). :func:`resolve_config` returns only configs
that pass every rule, so a bad value is refused before a run directory exists.

A family is registered in one place: its package, named after it (``moelab.experiments.jacobs``), whose
``__init__`` imports the module that declares ``@family("jacobs", ...)`` (the package's ``experiment`` module).
Each family package holds its typed config (``config``), its networks or recipe and its entry (``experiment``);
what several families share are the modules beside them (``digits``: jacobs and sparse_mlp; ``cifar``: cifar_moe
and cifar_experts; ``baselines``, ``router_recipe``, ``sections``, ``folder_data``; ``runner`` and ``seeds`` run
any family). A family package imports no other family package.

Packages are imported lazily, the first time their family is asked for (:func:`get_family`), so
``import moelab.experiments`` and ``moelab list`` stay fast; :func:`family_names` imports the package's modules to
list them all (error messages, tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.config import (
    Rule,
    apply_overrides,
    check_rules,
    flatten,
    merge,
    needs_rule,
    read_toml,
    upgrade_keys,
)
from moelab.errors import ConfigError
from moelab.runtime import torch_threads
from moelab.schema import defaults_of, rules_of, typed

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Family:
    name: str
    defaults: dict
    run: Callable[[dict, Any], dict]
    rules: dict[str, Rule]
    check: Callable[[dict], None] | None = None
    resumable: tuple[str, ...] = ()
    schema: type | None = None  # the typed config (moelab.schema) its run and check receive
    module: str = ""  # the module that registered it

    def validate(self, cfg: dict, where: str = "config") -> dict:
        """``cfg`` if every key's rule and the cross-key check accept it, else ConfigError."""
        check_rules(cfg, self.rules, where)
        if self.check is not None:
            self.check(cfg)
        return cfg


_FAMILIES: dict[str, Family] = {}


def family(name: str, defaults: dict | None = None, rules: dict[str, Rule] | None = None,
           check: Callable[[Any], None] | None = None, resumable: tuple[str, ...] = (), *,
           schema: type | None = None) -> Callable:
    """Decorator registering ``run(cfg, run_ctx) -> summary`` as experiment family ``name``.

    ``schema``: the family's typed config (frozen dataclasses, :mod:`moelab.schema`): its defaults and
    rules come from the field types, and ``run`` and ``check`` receive the config as that dataclass.
    Without one, ``defaults`` (nested dict) and ``rules`` (flattened key -> :class:`moelab.config.Rule`;
    every key that is not a boolean needs one) declare it and they receive the dict. ``compute.threads``
    (:mod:`moelab.experiments.sections`) is set here, for every family: torch's thread count inside ``run``,
    restored after, also when it fails. ``check(cfg)``:
    cross-key rules (raise ConfigError); ``resumable``: keys ``--resume`` may change."""
    if schema is not None:
        defaults, rules = defaults_of(schema), {**rules_of(schema), **(rules or {})}
    if defaults is None:
        raise ValueError(f"family {name}: give its schema or its defaults")
    keys, rules = flatten(defaults), rules or {}
    unknown = sorted(set(rules) - set(keys)) + sorted(set(resumable) - set(keys))
    if unknown:
        raise ValueError(f"family {name}: rules name keys that are not in its defaults: {', '.join(unknown)}")

    def deco(fn: Callable) -> Callable:
        module, home = getattr(fn, "__module__", "") or "", f"{__name__}.{name}"
        if module.startswith(__name__ + ".") and module != home and not module.startswith(home + "."):
            raise ValueError(f"family {name}: register it in the package {home} (get_family imports it "
                             f"from there), not in {module}")
        chk = check

        def run(cfg: dict, ctx: Any) -> dict:  # compute.threads holds for the run only, restored after
            with torch_threads(int((cfg.get("compute") or {}).get("threads", 0))):
                return fn(typed(schema, cfg) if schema is not None else cfg, ctx)

        if schema is not None and check is not None:
            def chk(cfg: dict) -> None:
                check(typed(schema, cfg))
        _FAMILIES[name] = Family(name, defaults, run, dict(rules), chk, tuple(resumable), schema, module)
        return fn

    return deco


def keys_without_rules(fam: Family) -> list[str]:
    """Keys of ``fam`` that declare no rule but need one (the schema test lists them)."""
    return sorted(k for k, v in flatten(fam.defaults).items() if needs_rule(v) and k not in fam.rules)


def get_family(name: str) -> Family:
    """The family ``name``, importing its package (``moelab.experiments.<name>``) the first time."""
    if name not in _FAMILIES and isinstance(name, str) and name.isidentifier() and \
            importlib.util.find_spec(f"{__name__}.{name}") is not None:
        importlib.import_module(f"{__name__}.{name}")
    if name not in _FAMILIES:
        raise ConfigError(f"unknown experiment family '{name}'. Known families: {', '.join(family_names())}.")
    return _FAMILIES[name]


def family_names() -> list[str]:
    """Every family of this package (importing its modules; families registered elsewhere, as tests do, are
    not listed)."""
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")
    return sorted(n for n, f in _FAMILIES.items() if f.module.startswith(__name__ + "."))


def builtin_configs() -> dict[str, Path]:
    """Built-in experiment name -> its TOML file."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.toml"))}


def describe_builtins() -> list[tuple[str, str]]:
    """(name, one-line description) of each built-in experiment."""
    return [(name, str(read_toml(path).get("description", "")).strip()) for name, path in builtin_configs().items()]


def resolve_file(raw: dict, where: str, seen: tuple[str, ...] = ()) -> dict:
    """Resolve a config file's ``base``/``family`` chain into a full, checked config."""
    body = {k: v for k, v in raw.items() if k not in ("family", "base", "description")}
    if "base" in raw:
        base = raw["base"]
        builtins = builtin_configs()
        if not isinstance(base, str) or base not in builtins:
            raise ConfigError(
                f"{where}: 'base' must name a built-in experiment ({', '.join(builtins)}), got {base!r}."
            )
        if base in seen:
            raise ConfigError(f"{where}: 'base' chain loops through '{base}'.")
        parent = resolve_file(read_toml(builtins[base]), str(builtins[base]), seen + (base,))
        fam = parent["family"]
        if "family" in raw and raw["family"] != fam:
            raise ConfigError(f"{where}: family {raw['family']!r} contradicts base '{base}' (family {fam!r}).")
        defaults = {k: v for k, v in parent.items() if k not in ("family", "description")}
    elif "family" in raw:
        fam = raw["family"]
        if not isinstance(fam, str):
            raise ConfigError(f"{where}: 'family' must be a string, got {fam!r}.")
        defaults = get_family(fam).defaults
    else:
        raise ConfigError(
            f"{where}: a config must name its experiment family (family = \"...\", one of "
            f"{', '.join(family_names())}) or a built-in it extends (base = \"...\")."
        )
    from moelab.experiments.folder_data import check_file_body

    body = upgrade_keys(body, defaults, where)
    check_file_body(body, where)
    cfg = merge(defaults, body, where)
    return {"family": fam, "description": str(raw.get("description", "")), **cfg}


def experiment_file(name_or_path: str) -> tuple[str, Path]:
    """Experiment name (built-in) or path to a TOML file -> (run name, its TOML file)."""
    builtins = builtin_configs()
    if name_or_path in builtins:
        return name_or_path, builtins[name_or_path]
    if name_or_path.endswith(".toml") or Path(name_or_path).is_file():
        return Path(name_or_path).stem, Path(name_or_path)
    raise ConfigError(
        f"unknown experiment '{name_or_path}'. Built-in experiments: {', '.join(builtins)}; "
        f"or give the path to a .toml config file."
    )


def resolve_config(name_or_path: str, overrides: list[str] | None = None) -> tuple[str, dict]:
    """Experiment name (built-in) or path to a TOML file -> (run name, resolved config)."""
    from moelab.experiments.folder_data import check_folder_and_dataset

    name, path = experiment_file(name_or_path)
    base = resolve_file(read_toml(path), str(path))
    cfg = apply_overrides(base, overrides or [])
    check_folder_and_dataset(base, cfg, f"experiment '{name}'")
    return name, validate_config(cfg, f"experiment '{name}'")


def validate_config(cfg: dict, where: str = "config") -> dict:
    """``cfg`` checked against its family's rules (ConfigError naming the key, value and what is valid)."""
    return get_family(cfg["family"]).validate(cfg, where)
