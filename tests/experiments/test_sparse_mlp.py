"""``mnist-sparse`` (family ``sparse_mlp``): a sparse moelab.MoE MLP and its equal-cost dense baselines."""

from __future__ import annotations

import json

import pytest
import torch
from equal_cost_checks import assert_closest_width

from moelab.cost import count_params, flops_per_example
from moelab.errors import ConfigError
from moelab.experiments import resolve_config
from moelab.experiments.runner import run_experiment
from moelab.experiments.sparse_mlp import Config, build_model
from moelab.moe import MoE
from moelab.schema import typed


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MOELAB_KERNELS", "off")  # the PyTorch paths; building the fused kernels takes ~40 s
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


SMALL = ["data.train_limit=1500", "data.val_size=500", "data.test_limit=500", "train.epochs=2", "train.log_every=1",
         "model.dim=16", "model.hidden=64", "model.num_experts=8"]


def test_mnist_sparse_end_to_end(real_data_dir, tmp_path):
    out = tmp_path / "run"
    s = run_experiment("mnist-sparse", SMALL + ["model.k=2", "model.normalize=true"], out=out,
                       data_dir=str(real_data_dir), quiet=True)
    models = s["models"]
    assert set(models) == {"moe", "dense-equal-flops", "dense-equal-params"}
    for r in models.values():
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["val_error_pct"] <= 100
        assert r["params"] > 0 and r["flops_per_example"] > 0 and r["train_time_s"] >= 0
    moe, fl, pa = models["moe"], models["dense-equal-flops"], models["dense-equal-params"]
    assert moe["test_accuracy"] > 0.3  # 2 epochs on 1000 images; chance is 0.1
    # the widths closest to the mixture's counts, and the rows report the dense network's exact counts
    m = typed(Config, resolve_config("mnist-sparse", SMALL + ["model.k=2", "model.normalize=true"])[1]).model
    probe = torch.zeros(4, 196)

    def params(h):
        return count_params(build_model(m, 196, 10, h, dense=True))

    def flops(h):
        return flops_per_example(build_model(m, 196, 10, h, dense=True), probe)

    for row, key, cost in ((pa, "params", params), (fl, "flops_per_example", flops)):
        assert row["matched_to"] == key and row[key] == pytest.approx(cost(row["hidden"]), abs=0.1)
        assert_closest_width(cost, row["hidden"], moe[key], key)
    # sparse: the mixture has ~E/k times the parameters of the dense network with its FLOPs
    assert pa["params"] > 2 * fl["params"] and pa["flops_per_example"] > 1.5 * moe["flops_per_example"]
    assert "same_model_as" not in fl and "same_model_as" not in pa
    assert s["protocol"]["val_size"] == 500
    assert len(s["lead_share"]) == 8 and sum(s["lead_share"]) == pytest.approx(1, abs=1e-4)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["moe"]["flops_per_example"] == moe["flops_per_example"]
    assert all((out / "eval" / f"{m}.safetensors").is_file() for m in models)


@pytest.mark.parametrize("router", ["noisy_topk", "switch", "expert_choice", "soft"])
def test_mnist_sparse_routers(router, real_data_dir, tmp_path):
    s = run_experiment("mnist-sparse", SMALL + [f"model.router={router}", "train.epochs=1",
                                                "baselines.equal_cost=false"],
                       out=tmp_path / "r", data_dir=str(real_data_dir), quiet=True)
    assert set(s["models"]) == {"moe"} and s["models"]["moe"]["test_accuracy"] > 0.2


def test_sparse_flops_below_dense_all_experts():
    """Counted inference FLOPs of the top-k mixture: the shared layers, the router and k of E experts, well
    below the same mixture run densely (every expert on every example)."""
    cfg = typed(Config, resolve_config("mnist-sparse", ["model.num_experts=8", "model.k=1", "model.dim=64",
                                                        "model.hidden=128"])[1])
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="router 'topk' with k=1"):  # top-1 of a softmax over one logit
        model = build_model(cfg.model, 196, 10)
    assert isinstance(model.blocks[0], MoE)
    x = torch.randn(256, 196)
    sparse = flops_per_example(model, x)
    d, h, e = cfg.model.dim, cfg.model.hidden, 8
    shared = 2 * (196 * d + d * 10) + 2 * d * e  # embed + head + router
    expert = 2 * 2 * d * h
    assert sparse == pytest.approx(shared + expert, rel=0.1)  # padding of the bucketed path is counted too
    block = model.blocks[0]
    dense_all = flops_per_example(model.embed, x) + flops_per_example(block.experts, x[:, :d].contiguous())
    assert dense_all == pytest.approx(2 * 196 * d + e * expert)
    assert sparse < 0.3 * dense_all
    assert count_params(model) > 4 * count_params(build_model(cfg.model, 196, 10, dense=True))  # 8 experts


def test_bad_router_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.router"):
        run_experiment("mnist-sparse", ["model.router=nope"], out=tmp_path / "r", quiet=True)


RECIPE = ["model.router_init=zeros", "model.router_noise=uniform", "model.balance=bias", "model.bias_rate=0.01",
          "train.routing_lr_scale=0.1"]


def test_router_recipe_keys_reach_the_router():
    m = typed(Config, resolve_config("mnist-sparse", RECIPE + ["model.num_experts=4", "model.depth=2"])[1]).model
    model = build_model(m, 196, 10, aux_scale=3.0)
    for block in model.blocks:
        r = block.router
        assert (r.balance, r.bias_rate, r.train_noise, r.normalize) == ("bias", 0.01, "uniform", True)
        assert int(torch.count_nonzero(r.gate.weight)) == 0 and block.aux_loss_weights == {}  # no balance loss
    plain = build_model(typed(Config, resolve_config("mnist-sparse", [])[1]).model, 196, 10, aux_scale=3.0)
    assert plain.blocks[0].aux_loss_weights == {"balance": 0.03} and plain.blocks[0].router.balance == "aux"
    dense = typed(Config, resolve_config("mnist-sparse", ["model.router=dense", "model.router_init=zeros"])[1]).model
    assert type(build_model(dense, 196, 10).blocks[0].router).__name__ == "DenseRouter"  # the per-sample soft mixture


@pytest.mark.parametrize("sets,key", [(["model.router=soft", "model.router_noise=uniform"], "model.router_noise"),
                                      (["model.router=expert_choice", "model.balance=bias"], "model.balance"),
                                      (["model.router=dense", "model.capacity_factor=1.0"], "model.capacity_factor")])
def test_router_recipe_keys_the_router_does_not_take(sets, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        run_experiment("mnist-sparse", sets, out=tmp_path / "r", quiet=True)


def test_mnist_sparse_router_recipe_run(real_data_dir, tmp_path):
    """One epoch with every recipe key set: it trains, the expert bias moved and is in the checkpoint, and the
    routers trained at routing_lr_scale x lr."""
    from moelab.train.checkpoint import load_checkpoint

    out = tmp_path / "r"
    s = run_experiment("mnist-sparse", SMALL + RECIPE + ["model.k=2", "train.epochs=1", "baselines.equal_cost=false"],
                       out=out, data_dir=str(real_data_dir), quiet=True)
    assert s["models"]["moe"]["test_accuracy"] > 0.2
    tensors, meta = load_checkpoint(out / "ckpt" / "moe.safetensors")
    bias = tensors["model.blocks.0.router.expert_bias"]
    assert bias.shape == (8,) and int(torch.count_nonzero(bias)) > 0 and float(bias.abs().max()) <= 0.01 * 4 + 1e-6  # 4 steps
    groups = meta["optim"]["param_groups"]
    assert [g["name"] for g in groups] == ["weights", "routing"]
    assert groups[1]["initial_lr"] == pytest.approx(0.1 * groups[0]["initial_lr"])


def test_a_colour_data_set_is_refused_naming_both_digit_families():
    import numpy as np

    from moelab.experiments.digits import grayscale

    with pytest.raises(ConfigError, match=r"digit experiments \(jacobs, sparse_mlp\) need grayscale images; "
                                          r"data set 'rgb' has 3 channels"):
        grayscale(np.zeros((2, 4, 4, 3), np.float32), "rgb")
    assert grayscale(np.ones((2, 4, 4, 1), np.float32), "grey").shape == (2, 4, 4)
