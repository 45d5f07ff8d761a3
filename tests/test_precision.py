"""moelab.precision: bf16 only where the CPU computes it natively; the true/false/"auto" switch in configs."""

import logging

import pytest
import torch

from moelab import precision
from moelab.config import Switch, apply_overrides, dumps_toml, merge
from moelab.errors import ConfigError


@pytest.fixture
def isa(monkeypatch):
    def set_isa(name):
        monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: name)
        precision._warn_slow.cache_clear()

    yield set_isa
    precision._warn_slow.cache_clear()


def test_isa_matches_torch_probes():
    got = precision.cpu_bf16_isa()
    assert got in ("amx", "avx512_bf16", "none")
    assert (got == "amx") == torch.cpu._is_amx_tile_supported()
    if got == "none":
        assert not torch.cpu._is_avx512_bf16_supported()


@pytest.mark.parametrize("name, fast", [("amx", True), ("avx512_bf16", True), ("none", False)])
def test_auto_follows_the_cpu(isa, name, fast):
    isa(name)
    assert precision.fast_bf16("cpu") is fast
    assert precision.resolve_bf16("auto") is fast
    assert precision.resolve_bf16(Switch("auto")) is fast


def test_explicit_values_are_kept_and_slow_bf16_warns_once(isa, caplog):
    isa("none")
    with caplog.at_level(logging.WARNING, logger="moelab.precision"):
        assert precision.resolve_bf16(True) is True
        assert precision.resolve_bf16(Switch("true")) is True
        assert precision.resolve_bf16(False) is False
        assert precision.resolve_bf16("false") is False
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "without native bf16" in warnings[0]


def test_fast_cpu_does_not_warn(isa, caplog):
    isa("amx")
    with caplog.at_level(logging.WARNING, logger="moelab.precision"):
        assert precision.resolve_bf16(True) is True
    assert not caplog.records


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"compute\.bf16 must be true, false or \"auto\"; got 'yes'"):
        precision.resolve_bf16("yes", key="compute.bf16")


SCHEMA = {"compute": {"bf16": Switch("auto"), "impl": "auto"}}


def test_switch_accepts_booleans_and_auto_and_round_trips_through_toml():
    cfg = merge(SCHEMA, {"compute": {"bf16": True}}, "x.toml")
    assert cfg["compute"]["bf16"] == "true" and isinstance(cfg["compute"]["bf16"], Switch)
    assert "bf16 = true" in dumps_toml(cfg)
    cfg = apply_overrides(cfg, ["compute.bf16=auto"])  # still a switch after the first override
    assert cfg["compute"]["bf16"] == "auto" and 'bf16 = "auto"' in dumps_toml(cfg)
    cfg = apply_overrides(cfg, ["compute.bf16=false"])
    assert cfg["compute"]["bf16"] == "false" and precision.resolve_bf16(cfg["compute"]["bf16"]) is False


def test_switch_rejects_other_values_with_the_key_named():
    with pytest.raises(ConfigError, match=r"key 'compute\.bf16' expects true, false or \"auto\" .*got an integer 1"):
        merge(SCHEMA, {"compute": {"bf16": 1}}, "x.toml")
    with pytest.raises(ConfigError, match=r"key 'compute\.bf16' expects true, false or \"auto\".*'fast'"):
        apply_overrides(SCHEMA, ["compute.bf16=fast"])
    with pytest.raises(ConfigError, match=r"key 'compute\.impl' expects a string"):  # a plain "auto" string is no switch
        merge(SCHEMA, {"compute": {"impl": True}}, "x.toml")
