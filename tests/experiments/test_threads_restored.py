"""Every family runs with its ``compute.threads`` (set once, by the family registry, :func:`moelab.experiments.family`)
for its run only: torch's thread count is restored afterwards, also when the run fails (a later run or test in the
same process keeps its own setting)."""

import importlib
import types

import pytest
import torch

from moelab.experiments import get_family, resolve_config

# experiment -> (module whose name the family's run calls first, that name)
CASES = {
    "digits-jacobs": ("moelab.experiments.jacobs.experiment", "load_data"),
    "mnist-sparse": ("moelab.experiments.sparse_mlp.experiment", "load_data"),
    "cifar10-moe": ("moelab.experiments.cifar_moe.experiment", "load_images"),
    "cifar10-experts": ("moelab.experiments.cifar_experts.experiment", "Pipeline"),
}


@pytest.mark.parametrize("experiment", sorted(CASES))
def test_a_family_restores_torch_threads_even_when_it_fails(experiment, monkeypatch):
    module, name = CASES[experiment]
    _, raw = resolve_config(experiment, ["compute.threads=1"])
    fam = get_family(raw["family"])

    def boom(*args, **kwargs):
        assert torch.get_num_threads() == 1  # the run's own setting is in force inside it
        raise RuntimeError("stop here")

    monkeypatch.setattr(importlib.import_module(module), name, boom)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            fam.run(raw, types.SimpleNamespace(name=experiment, seed=0, data_dir=None, device=torch.device("cpu")))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
