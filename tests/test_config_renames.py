"""Old key names (``moelab.config.RENAMED_KEYS``, issue #35) still work for one release: each warns once on
stderr, naming the old and the new key, and resolves to the config the new key gives, through ``--set``,
``moelab study --grid``, config files and the config.toml of a run directory being resumed; a key that is
neither old nor new is refused as before. One registration mechanism: ``@family`` in the module named after
the family."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from moelab import config, experiments
from moelab.cli import main
from moelab.config import RENAMED_KEYS, Switch, flatten, read_toml
from moelab.errors import ConfigError
from moelab.experiments import family_names, get_family, resolve_config
from moelab.study.grid import make_cells, parse_grid

BUILTIN = {"jacobs": "digits-jacobs", "sparse_mlp": "mnist-sparse", "cifar_experts": "cifar10-experts",
           "cifar_moe": "cifar10-moe"}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(config, "_warned", set())  # each old key warns once per process


def _warning(old: str) -> str:
    return f"moelab: {old} is deprecated, use {RENAMED_KEYS[old]} ("


def _cases() -> list[tuple[str, str, str]]:
    """(family, old key, a valid value, other than the default where there is one) for every old key whose new
    key the family has."""
    out = []
    for fam in family_names():
        defaults, rules = flatten(get_family(fam).defaults), get_family(fam).rules
        for old, new in RENAMED_KEYS.items():
            if new in defaults:
                d = defaults[new]
                if isinstance(d, Switch):
                    value = "false" if d == "true" else "true"
                elif isinstance(d, str):  # a choice
                    value = next((c for c in rules[new].choices if c != d), d)
                else:
                    value = str(d + 1)
                out.append((fam, old, value))
    return out


CASES = _cases()


def test_every_family_spells_the_shared_concepts_one_way():
    """compute.threads and compute.bf16 in every family, every minibatch size is *.batch_size, no old key is
    a key of any family."""
    for fam in family_names():
        keys = set(flatten(get_family(fam).defaults))
        assert {"compute.threads", "compute.bf16"} <= keys, fam
        assert not keys & set(RENAMED_KEYS), fam
        assert not [k for k in keys if k.rsplit(".", 1)[-1] in ("batch", "eval_batch", "threads", "bf16")
                    and k.split(".")[0] != "compute"], fam
    assert {old for _, old, _ in CASES} == set(RENAMED_KEYS)  # every old key has a family that reads it


@pytest.mark.parametrize(("fam", "old", "value"), CASES, ids=[f"{f}:{o}" for f, o, _ in CASES])
def test_old_key_in_set_warns_and_resolves_as_the_new_key(fam, old, value, tmp_path, capsys, monkeypatch):
    """Through the real CLI (the family's training replaced by a stub): the same config.toml, one warning."""
    seen = []

    def stub(cfg, run):
        seen.append(cfg)
        return {"test_accuracy": 1.0}

    monkeypatch.setitem(experiments._FAMILIES, fam, dataclasses.replace(get_family(fam), run=stub))
    new = RENAMED_KEYS[old]
    assert main(["run", BUILTIN[fam], "--set", f"{new}={value}", "--out", str(tmp_path / "new"), "--quiet"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    assert main(["run", BUILTIN[fam], "--set", f"{old}={value}", "--out", str(tmp_path / "old"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(_warning(old)) and f"--set {old}={value}" in err, err
    assert seen[0] == seen[1] and str(flatten(seen[1])[new]) == value
    assert (tmp_path / "old" / "config.toml").read_text() == (tmp_path / "new" / "config.toml").read_text()


def test_a_key_neither_old_nor_new_is_refused_as_before(capsys, tmp_path):
    for key in ("train.batchsize", "experts.batch"):  # experts.batch: an old key, but not of the jacobs family
        assert main(["run", "digits-jacobs", "--set", f"{key}=8", "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moelab: error: --set {key}: unknown key '{key}'. Valid keys: ") and \
            "compute.threads" in err and "deprecated" not in err, err
        assert not (tmp_path / "r").exists()


def test_old_keys_in_config_files(tmp_path, capsys):
    """A user file with ``base = ...`` or ``family = ...`` and old keys: the new keys' config, one warning each."""
    old = tmp_path / "old.toml"
    old.write_text('base = "digits-jacobs"\nthreads = 2\n[train]\nbf16 = true\n')
    new = tmp_path / "new.toml"
    new.write_text('base = "digits-jacobs"\n[compute]\nthreads = 2\nbf16 = true\n')
    _, want = resolve_config(str(new))
    assert "deprecated" not in capsys.readouterr().err
    _, got = resolve_config(str(old))
    assert got == want and want["compute"]["threads"] == 2 and want["compute"]["bf16"] == "true"
    err = capsys.readouterr().err.splitlines()
    assert [e.split(" (")[0] for e in err] == ["moelab: threads is deprecated, use compute.threads",
                                              "moelab: train.bf16 is deprecated, use compute.bf16"]
    assert all(str(old) in e for e in err)
    cifar = tmp_path / "cifar.toml"
    cifar.write_text('family = "cifar_moe"\nthreads = 1\n[train]\nbatch = 512\n[eval]\nbatch = 250\n')
    _, got = resolve_config(str(cifar))
    assert (got["compute"]["threads"], got["train"]["batch_size"], got["eval"]["batch_size"]) == (1, 512, 250)
    both = tmp_path / "both.toml"
    both.write_text('family = "cifar_experts"\n[experts]\nbatch = 64\nbatch_size = 32\n')
    with pytest.raises(ConfigError, match=r"both 'experts.batch' and 'experts.batch_size' are given"):
        resolve_config(str(both))


def test_builtin_configs_use_only_new_keys(capsys):
    for name in experiments.builtin_configs():
        resolve_config(name)
    assert "deprecated" not in capsys.readouterr().err


def test_old_key_in_a_study_grid(capsys):
    """--grid with an old key: warned once as the --grid option, each cell resolved as the new key; the cells
    keep the spelling the user gave (their folder names)."""
    _, cells = make_cells("digits-jacobs", ["train.epochs=2"], parse_grid(["threads=1,2"]))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(_warning("threads")) and "--grid threads=1,2" in err, err
    assert [c.sets for c in cells] == [("threads=1",), ("threads=2",)]
    assert [resolve_config("digits-jacobs", list(c.sets))[1]["compute"]["threads"] for c in cells] == [1, 2]
    with pytest.raises(ConfigError, match=r"--grid threads is also given as --set compute.threads"):
        make_cells("digits-jacobs", ["compute.threads=1"], parse_grid(["threads=1,2"]))


def test_a_run_directory_written_with_old_keys_resumes(tmp_path, capsys):
    """An old run directory (its config.toml with ``threads`` and ``train.bf16``), cut before its summary,
    resumes: the same summary as the uninterrupted run; its resumable keys may be changed under the old name."""
    ref, old = tmp_path / "ref", tmp_path / "old"
    argv = ["digits-jacobs", "--set", "train.epochs=2", "--set", "data.train_limit=384", "--quiet"]
    assert main(["run", *argv, "--out", str(ref)]) == 0
    shutil.copytree(ref, old)
    (old / "summary.json").unlink()
    text = (old / "config.toml").read_text()
    assert "[compute]\nthreads = 1\nbf16 = false\n" in text
    text = text.replace("[compute]\nthreads = 1\nbf16 = false\n", "")  # the layout before the rename:
    text = text.replace('mode = "modern"\n', 'mode = "modern"\nthreads = 1\n').replace("[train]\n", "[train]\nbf16 = false\n")
    assert "compute" not in text
    (old / "config.toml").write_text(text)
    capsys.readouterr()
    assert main(["run", "--resume", str(old), "--set", "threads=1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert _warning("threads") in err and _warning("train.bf16") in err and "error" not in err, err
    got, want = (json.loads((d / "summary.json").read_text()) for d in (old, ref))
    assert got["resumed"] is True
    assert {m: r["test_accuracy"] for m, r in got["models"].items()} == \
        {m: r["test_accuracy"] for m, r in want["models"].items()}
    assert read_toml(old / "config.toml")["threads"] == 1  # no key changed: the run's file is left as it was
    (old / "summary.json").unlink()
    assert main(["run", "--resume", str(old), "--set", "train.bf16=true", "--quiet"]) == 2
    assert "compute.bf16 cannot change on resume" in capsys.readouterr().err


def test_a_family_is_registered_in_its_own_module():
    assert family_names() == sorted(BUILTIN)
    def run(cfg, ctx):
        return {}

    for elsewhere in ("moelab.experiments.jacobs", "moelab.experiments.jacobs.experiment", "moelab.experiments.digits",
                      "moelab.experiments.nopeish.experiment"):
        run.__module__ = elsewhere
        with pytest.raises(ValueError, match=r"register it in the package moelab.experiments.nope "):
            experiments.family("nope", {"a": True})(run)
    assert "nope" not in experiments._FAMILIES
    with pytest.raises(ConfigError, match=r"unknown experiment family 'runner'. Known families: "
                                          r"cifar_experts, cifar_moe, jacobs, sparse_mlp\."):
        get_family("runner")  # a module of the package, but no family


def test_a_family_registers_from_a_module_of_its_package(monkeypatch):
    """The package moelab.experiments.<name> (what get_family imports) or any module of it may declare the family."""
    monkeypatch.setattr(experiments, "_FAMILIES", dict(experiments._FAMILIES))

    def run(cfg, ctx):
        return {}

    for home in ("moelab.experiments.nope", "moelab.experiments.nope.experiment"):
        run.__module__ = home
        experiments.family("nope", {"a": True})(run)
        assert experiments._FAMILIES["nope"].module == home


def test_import_stays_lazy():
    """``import moelab.experiments`` imports no family; resolving a config imports its family only."""
    code = ("import sys, moelab.experiments as e\n"
            "mods = lambda: sorted(m for m in sys.modules if m.startswith('moelab.experiments.'))\n"
            "print(mods()); e.resolve_config('digits-jacobs'); print(mods())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = out.splitlines()
    assert before == "[]" and "moelab.experiments.jacobs'" in after, out
    assert not any(f"moelab.experiments.{f}'" in after for f in ("sparse_mlp", "cifar_moe", "cifar_experts")), out


def test_compare_groups_runs_written_before_and_after_the_rename(tmp_path):
    from moelab.analysis.compare import group_runs
    from moelab.analysis.rundir import RunDir

    new = {"family": "jacobs", "compute": {"threads": 1, "bf16": "false"}, "run": {"name": "d", "seed": 0}}
    old = {"family": "jacobs", "threads": 1, "train": {"bf16": "false"}, "run": {"name": "d", "seed": 1}}
    groups = group_runs([RunDir(tmp_path / "a", new, {}), RunDir(tmp_path / "b", old, {})])
    assert len(groups) == 1 and len(groups[0].runs) == 2
