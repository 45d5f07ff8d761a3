"""``moelab bench steps``: the experiments' own MoE against their dense-equal-flops networks."""

from __future__ import annotations

import pytest

from moelab.bench.steps import bench_steps, category, main
from moelab.cost import flops_per_example
from moelab.errors import MoelabError
from moelab.experiments.bench_models import SIZES, step_pair


def test_categories_name_where_the_time_goes():
    assert category("aten::baddbmm") == category("autograd::engine::evaluate_function: BmmBackward0") == "expert GEMMs"
    assert category("aten::addmm") == "other GEMMs"
    assert category("moelab::topk_softmax") == "routing"
    assert category("_PermuteExperts") == category("SplitWithSizesBackward0") == "permute / combine"
    assert category("aten::gelu_backward") == "activations / norms"
    assert category("aten::empty_strided") == "allocation / copies"
    assert category("aten::lerp_") == "other"


def test_mnist_sparse_pair_is_the_experiment_and_its_equal_flops_network():
    moe, dense, x, y, info = step_pair("mnist-sparse")
    assert x.shape == (512, 196) and info["batch"] == 512  # the experiment's batch and 14x14 inputs
    assert moe.num_experts == 16 if hasattr(moe, "num_experts") else True
    f_moe, f_dense = flops_per_example(moe, x[:256]), flops_per_example(dense, x[:256])
    assert abs(f_dense - f_moe) / f_moe < 0.05  # the closest width: within one hidden unit's FLOPs
    with pytest.raises(MoelabError, match="unknown size 'nope'"):
        step_pair("nope")


def test_bench_steps_rows_and_breakdown(capsys):
    (row,) = bench_steps(step_pair, ["mnist-sparse"], repeats=1, warmup=1, profile_steps=1)
    assert row["moe_ms"] > 0 and row["dense_ms"] > 0 and row["ratio"] == pytest.approx(row["dense_ms"] / row["moe_ms"])
    assert 0 < row["rho"] < 1
    assert sum(row["moe_where"].values()) == pytest.approx(1.0)
    assert {"expert GEMMs", "routing", "optimizer"} <= set(row["moe_where"])
    assert "expert GEMMs" not in row["dense_where"]  # the dense network has no expert stack
    assert main(["--sizes", "mnist-sparse", "--repeats", "1", "--warmup", "1", "--profile-steps", "0"], step_pair,
                tuple(SIZES)) == 0
    out = capsys.readouterr().out
    assert "mnist-sparse" in out and "moe/dense" in out
    assert set(SIZES) == {"mnist-sparse", "cifar10-moe-blocks", "cifar10-moe-tokens"}
