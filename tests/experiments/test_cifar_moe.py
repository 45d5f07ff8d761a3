"""``cifar10-moe`` (family ``cifar_moe``): MoE CNNs against their equal-cost dense CNNs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from equal_cost_checks import assert_closest_width

from moelab.cost import count_params, flops_per_example
from moelab.errors import MoelabError
from moelab.experiments.baselines import EQUAL_COST
from moelab.experiments.cifar import Images
from moelab.experiments.cifar_moe import (
    Model,
    Train,
    block_widths,
    build_model,
    class_probs,
    lr_factor,
    make_optimizer,
    routing_parameters,
)
from moelab.experiments.runner import run_experiment
from moelab.moe import CondConv2d, MoE, TokenMoE2d

BASE = Model(width=32, moe="condconv", moe_blocks=[3], num_experts=4, routing="softmax", temperature=1.0,
             router="topk", k=1, capacity_factor=0.0, expert_block="same")


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MOELAB_KERNELS", "off")


def test_condconv_model_multiplies_the_last_block_only():
    dense, moe = build_model(BASE, dense=True), build_model(BASE)
    assert isinstance(moe.blocks[2].conv1, CondConv2d) and isinstance(moe.blocks[2].conv2, CondConv2d)
    assert not isinstance(moe.blocks[1].conv1, CondConv2d)
    block3 = sum(p.numel() for n, p in dense.blocks[2].named_parameters() if "conv" in n)
    router = 32 * 4 + 4 + 32 * 4 + 4  # two routing Linear(32, 4) with bias
    assert count_params(moe) == count_params(dense) + 3 * block3 + router
    x = torch.randn(4, 3, 32, 32)
    f_dense, f_moe = flops_per_example(dense, x), flops_per_example(moe, x)
    assert f_dense < f_moe < 1.2 * f_dense  # mixing E kernels per image is cheap next to the convolutions


@pytest.mark.parametrize("expert_block", ["same", "resnet"])
def test_block_moe_routes_images_to_k_experts(expert_block):
    m = dataclasses.replace(BASE, moe="blocks", num_experts=4, k=1, expert_block=expert_block)
    with pytest.warns(UserWarning, match="router 'topk' with k=1"):
        net = build_model(m)
    assert isinstance(net.blocks[2], MoE)
    logits, aux, auxes = net.forward_with_aux(torch.randn(6, 3, 32, 32))
    assert logits.shape == (6, 10) and len(auxes) == 1 and float(aux.detach()) > 0  # the switch balance loss
    assert auxes[0].indices.shape == (6, 1)


def test_expert_choice_blocks_fill_every_expert_and_cost_what_top2_costs():
    """Expert choice (capacity factor 2): every expert takes ceil(2 N / E) images, so the counted FLOPs are
    top-2's, and the load is balanced by construction."""
    ec = build_model(dataclasses.replace(BASE, moe="blocks", router="expert_choice", capacity_factor=2.0))
    top2 = build_model(dataclasses.replace(BASE, moe="blocks", router="topk", k=2))
    x = torch.randn(8, 3, 32, 32)
    logits, _, auxes = ec.forward_with_aux(x)
    assert logits.shape == (8, 10) and auxes[0].expert_counts.tolist() == [4, 4, 4, 4]
    assert flops_per_example(ec, x) == pytest.approx(flops_per_example(top2, x), rel=1e-3)


def test_noisy_topk_blocks_route_with_a_trained_noise_gate_and_cost_what_top2_costs():
    """Noisy top-k (Shazeer 2017) on the expert blocks: the noise std comes from its own zero-initialised
    pooled gate, which trains in the routing group; eval routing is the clean top-k (deterministic)."""
    m = dataclasses.replace(BASE, moe="blocks", router="noisy_topk", k=2)
    net, top2 = build_model(m), build_model(dataclasses.replace(BASE, moe="blocks", router="topk", k=2))
    router = net.blocks[2].router
    assert router.name == "noisy_topk" and float(router.noise_gate[-1].weight.detach().abs().sum()) == 0
    assert {id(p) for p in router.noise_gate.parameters()} <= {id(p) for p in routing_parameters(net)}
    assert set(net.blocks[2].aux_loss_weights) == {"importance", "load"}
    x = torch.randn(16, 3, 32, 32)
    torch.manual_seed(0)
    logits, aux, auxes = net.forward_with_aux(x)
    assert logits.shape == (16, 10) and auxes[0].indices.shape == (16, 2) and float(aux.detach()) > 0
    aux.backward()
    assert router.noise_gate[-1].weight.grad is not None and float(router.noise_gate[-1].weight.grad.abs().sum()) > 0
    net.eval()
    with torch.no_grad():
        a, _, ea = net.forward_with_aux(x)
        b, _, eb = net.forward_with_aux(x)
    assert torch.equal(a, b) and torch.equal(ea[0].indices, eb[0].indices)
    assert flops_per_example(net, x) == pytest.approx(flops_per_example(top2, x), rel=1e-2)
    with pytest.raises(MoelabError, match=r"model\.k.*at most model\.num_experts = 4"):
        run_experiment("cifar10-moe", ["model.moe=blocks", "model.router=noisy_topk", "model.k=5"], quiet=True)


def test_token_moe_follows_the_chosen_blocks_and_its_twin_costs_the_same():
    """model.moe = "tokens": a TokenMoE2d (every position routed to k pointwise experts) after each chosen block;
    the dense twin has one FFN of k x the hidden width there, so the same counted FLOPs (router aside)."""
    m = dataclasses.replace(BASE, moe="tokens", moe_blocks=[2, 3], num_experts=4, router="topk", k=2,
                            expert_hidden=16)
    net, twin, dense = build_model(m), build_model(m, twin=True), build_model(m, dense=True)
    assert [type(b.after).__name__ for b in net.blocks[1:]] == ["TokenMoE2d", "TokenMoE2d"]
    assert not hasattr(net.blocks[0], "after") and twin.blocks[2].after.moe.num_experts == 1
    assert twin.blocks[2].after.moe.experts.hidden_dim == 2 * 16
    experts = 2 * 4 * (32 * 16 + 16 + 16 * 32 + 32)  # two layers of E = 4 MLPs 32 -> 16 -> 32
    norms = 2 * 2 * 32  # each MoE output BatchNorm: its (fixed) scale and its bias
    assert count_params(net) == count_params(dense) + experts + norms + 2 * 32 * 4  # + two routers Linear(32, 4)
    x = torch.randn(8, 3, 32, 32)
    logits, aux, auxes = net.forward_with_aux(x)
    assert logits.shape == (8, 10) and len(auxes) == 2 and float(aux.detach()) > 0
    assert auxes[0].indices.shape == (8 * 7 * 7, 2) and auxes[1].indices.shape == (8 * 3 * 3, 2)
    routers = {id(p) for b in net.blocks[1:] for p in b.after.moe.router.parameters()}
    assert routers == {id(p) for p in routing_parameters(net)}
    f_net, f_twin = flops_per_example(net, x), flops_per_example(twin, x)
    assert f_twin < f_net < 1.03 * f_twin  # the routers' projections + the grouped path's bias columns
    assert isinstance(net.blocks[2].after, TokenMoE2d) and net.blocks[2].after.moe.experts.sparse_impl == "auto"
    net.eval()
    with torch.no_grad():
        _, routes = class_probs(net, Images(torch.randint(0, 255, (5, 32, 32, 3), dtype=torch.uint8).numpy(),
                                            torch.zeros(5, dtype=torch.long).numpy(), True, torch.device("cpu")),
                                tta=0, bf16=False, batch=5)
    assert [tuple(r.shape) for r in routes] == [(5, 4), (5, 4)]  # per image: the share of its positions
    assert torch.allclose(routes[1].sum(1), torch.ones(5))


def test_tta_averages_each_image_with_its_horizontal_flip():
    """eval.tta = 1: the logits of each image and of its left-right mirror (x.flip(3), the width axis), averaged;
    tta = 2 adds the two 1-pixel diagonal translations (reflect padding), each with its mirror. Computed by hand
    on a MoE model whose outputs are not mirror-symmetric, so a vertical flip (x.flip(2)) would fail."""
    torch.manual_seed(0)
    net = build_model(dataclasses.replace(BASE, moe="blocks", router="topk", k=2)).eval()
    with torch.no_grad():
        net.head.weight.mul_(30)  # sharper probabilities: the two flip directions differ clearly
    rng = np.random.default_rng(0)
    images = Images(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), np.zeros(6, dtype=np.int64), True,
                    torch.device("cpu"))
    x = images.batch(torch.arange(6))

    def logits(t):
        return net(t).float()

    with torch.no_grad():
        plain, mirrored, upside_down = logits(x), logits(x.flip(3)), logits(x.flip(2))
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = torch.stack([0.5 * logits(s) + 0.5 * logits(s.flip(3))
                               for s in (pad[:, :, :32, :32], pad[:, :, 2:, 2:])]).mean(0)
    flip_tta = 0.5 * plain + 0.5 * mirrored
    got = {tta: class_probs(net, images, tta=tta, bf16=False, batch=6)[0] for tta in (0, 1, 2)}
    torch.testing.assert_close(got[0], torch.softmax(plain, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1], torch.softmax(flip_tta, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], torch.softmax(0.5 * flip_tta + 0.5 * shifted, -1), rtol=0, atol=1e-5)
    wrong = torch.softmax(0.5 * plain + 0.5 * upside_down, -1)
    assert (got[1] - wrong).abs().max() > 0.02  # the check can tell the two directions apart


def test_schedule_and_optimizer_groups():
    assert lr_factor(0, 100, 0.23) == pytest.approx(0.2) and lr_factor(23, 100, 0.23) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0.23) == 0 and lr_factor(50, 100, 0.23) == pytest.approx(1 - 27 / 77)
    net = build_model(BASE, dense=True)
    t = Train(lr=11.5, momentum=0.85, weight_decay=0.0153, bias_scaler=64.0)
    opt = make_optimizer(net, t, 1024)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["weights", "routing", "biases", "whiten_bias"]
    assert opt.param_groups[1]["params"] == []  # a dense network has no router
    scale = 1024 * (1 + 1 / 0.15)
    assert opt.param_groups[0]["lr"] == pytest.approx(11.5 / scale)
    assert opt.param_groups[2]["lr"] == pytest.approx(64 * 11.5 / scale)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == count_params(net, trainable_only=True)


@pytest.mark.parametrize("moe", ["condconv", "blocks"])
def test_routers_get_their_own_lr_not_the_bn_bias_lr(moe):
    """A router's parameters (CondConv routing functions, an MoE block's gate) train at routing_lr_scale x
    the weights' lr; before this group a CondConv routing bias sat among the BN biases at 64x."""
    net = build_model(dataclasses.replace(BASE, moe=moe, k=2))
    t = Train(routing_lr_scale=0.05)
    opt = make_optimizer(net, t, 1024)
    groups = {g["name"]: g for g in opt.param_groups}
    want = {id(p) for p in routing_parameters(net)}
    expected = ({id(p) for m in net.modules() if isinstance(m, CondConv2d) for p in m.routing_fn.parameters()}
                if moe == "condconv" else {id(p) for p in net.blocks[2].router.parameters()})
    assert want == expected and len(want) >= 1
    assert {id(p) for p in groups["routing"]["params"]} == want
    assert groups["routing"]["lr"] == pytest.approx(0.05 * groups["weights"]["lr"])
    others = [id(p) for n in ("weights", "biases", "whiten_bias") for p in groups[n]["params"]]
    assert not want & set(others) and len(others) == len(set(others))
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == count_params(net, trainable_only=True)


# The real-data runs: 400 training images (50 per class, 100 of them held out for validation) and 500 test
# images, 8 epochs of 8 steps of 50. airbench's lr is per 1024 summed examples; at batches of 50 its 11.5 barely
# moves the network in 64 steps, so the slice trains at lr 100. Measured test accuracy of every model (moe and
# each baseline) on seeds 0-2: 0.25-0.40 (chance: 0.10; one standard error on 500 images is 0.02).
SLICE = ["data.train_per_class=50", "data.test_per_class=50", "data.val_size=100", "train.batch_size=50", "train.epochs=8",
         "train.lr=100", "model.width=16", "eval.batch_size=500", "train.log_every=4"]
MIN_ACCURACY = 0.18


def _learned(name: str, row: dict) -> None:
    assert MIN_ACCURACY < row["test_accuracy"] <= 1, (name, row["test_accuracy"])
    assert row["test_error_pct"] == pytest.approx(100 * (1 - row["test_accuracy"]), abs=1e-3)
    assert 0 <= row["val_error_pct"] <= 100


def _check_matched(m: Model, rows: dict, names: tuple[str, ...]) -> None:
    """Each equal-cost row reports the exact counts of the dense FastCNN at its width, and that width is the
    closest to the mixture's counted parameters / FLOPs (the FLOPs of a dense FastCNN do not depend on the
    images: counted on random ones)."""
    moe, probe = rows["moe"], torch.randn(2, 3, 32, 32)

    def params(w):
        return count_params(build_model(m, w, dense=True))

    def flops(w):
        return flops_per_example(build_model(m, w, dense=True), probe)

    for name, key, cost in (("dense-equal-params", "params", params), ("dense-equal-flops", "flops_per_example", flops)):
        if name not in names:
            continue
        row = rows[name]
        assert row["matched_to"] == key and row["widths"] == list(block_widths(row["width"]))
        assert row[key] == pytest.approx(cost(row["width"]), abs=0.1), name  # summaries round FLOPs to 0.1
        assert_closest_width(cost, row["width"], moe[key], name)


@pytest.mark.slow
def test_cifar10_moe_blocks_learns_with_every_baseline(cifar_dir, tmp_path):
    """The default cifar10-moe (top-2 of 4 expert blocks in block 3) with all its baselines, on a slice of the
    real data: every model learns; the equal-cost widths are the closest ones; dense-equal-time trains the
    equal-FLOPs width for the mixture's training time."""
    out = tmp_path / "run"
    s = run_experiment("cifar10-moe", SLICE + ["eval.tta=0"], out=out, data_dir=str(cifar_dir), quiet=True)
    models = s["models"]
    assert set(models) == {"moe", "dense-equal-flops", "dense-equal-params", "dense-equal-time", "dense-reference"}
    for name, r in models.items():
        _learned(name, r)
        assert r["params"] > 0 and r["flops_per_example"] > 0 and r["train_time_s"] >= 0
    moe, fl, pa = models["moe"], models["dense-equal-flops"], models["dense-equal-params"]
    assert moe["moe"] == "blocks" and s["protocol"]["tta"] == 0
    m = Model(width=16, moe="blocks", moe_blocks=[3], num_experts=4, router="topk", k=2)
    _check_matched(m, models, EQUAL_COST)
    assert pa["params"] > fl["params"]  # 4 expert blocks: more parameters than FLOPs
    eq_time, ref = models["dense-equal-time"], models["dense-reference"]
    assert eq_time["width"] == fl["width"] and eq_time["matched_to"] == "train_time_s"
    # the equal-FLOPs network for 8 x (the mixture's time / its own) epochs, rounded to whole steps of 1/8 epoch
    assert abs(eq_time["epochs"] - 8 * moe["train_time_s"] / fl["train_time_s"]) <= 1 / 16 + 1e-3
    assert ref["width"] == 16 and ref["widths"] == list(block_widths(16)) and moe["epochs"] == 8
    routing = moe["routing"]
    assert len(routing["lead_share"]) == 4 and len(routing["class_expert_matrix"]) == 10
    saved = json.loads((out / "summary.json").read_text())
    assert saved["models"]["moe"]["flops_per_example"] == moe["flops_per_example"]
    assert all((out / "eval" / f"{m}.safetensors").is_file() for m in models)


def test_bench_cnn_rows_and_bad_variant(capsys):
    from moelab.bench.cnn import bench_cnn, main
    from moelab.experiments.bench_models import cnn_pair, parse_variant

    variants = ["condconv:E=2:blocks=3", "blocks:E=2:k=1", "tokens:E=4:k=1:hidden=2w"]
    with pytest.warns(UserWarning, match="router 'topk' with k=1"):  # blocks:E=2:k=1
        rows = bench_cnn(cnn_pair, variants, width=16, batch=8, repeats=1)
    probe = torch.randn(2, 3, 32, 32)
    for spec, r in zip(variants, rows):
        assert r["moe_img_s"] > 0 and r["dense_img_s"] > 0 and r["ratio"] == pytest.approx(
            r["moe_img_s"] / r["dense_img_s"], rel=1e-6)
        assert r["moe_params"] > r["dense_params"] and 0 < r["route_share"] < 1

        m = parse_variant(spec, 16)

        def flops(w, m=m):
            return flops_per_example(build_model(m, w, dense=True), probe) / 1e6

        assert r["dense_mflops"] == pytest.approx(flops(r["dense_width"]), rel=1e-9)
        assert_closest_width(flops, r["dense_width"], r["moe_mflops"], spec)
    m = parse_variant("blocks:E=8:k=2:router=switch", 64)
    assert (m.router, m.k, m.num_experts, m.width, m.moe) == ("switch", 2, 8, 64, "blocks")
    with pytest.raises(MoelabError, match=r"variant 'condconv:X=3': unknown option 'X=3'"):
        parse_variant("condconv:X=3", 64)
    m = parse_variant("tokens:E=8:k=1:blocks=2,3:hidden=4w", 64)
    assert (m.moe, m.num_experts, m.k, m.moe_blocks, m.expert_hidden) == ("tokens", 8, 1, [2, 3], 256)
    with pytest.raises(MoelabError, match=r"expected condconv:..., blocks:... or tokens:..., got 'dense'"):
        parse_variant("dense", 64)
    assert main(["--variants", "condconv:E=2", "--width", "8", "--batch", "4", "--repeats", "1"], cnn_pair, ()) == 0
    assert "moe/dense" in capsys.readouterr().out


def test_cifar10_moe_condconv_alone_with_flip_and_shift_tta(cifar_dir, tmp_path):
    """CondConv mixtures, no baselines, evaluated with eval.tta = 2 (flips and 1-pixel translations)."""
    sets = SLICE + ["model.moe=condconv", "eval.tta=2", "baselines.equal_cost=false", "baselines.reference=false"]
    s = run_experiment("cifar10-moe", sets, out=tmp_path / "r", data_dir=str(cifar_dir), quiet=True)
    assert set(s["models"]) == {"moe"} and s["protocol"]["tta"] == 2
    moe = s["models"]["moe"]
    _learned("moe", moe)
    assert moe["moe"] == "condconv" and len(moe["routing"]["lead_share"]) == 4


def test_cifar10_moe_tokens_with_its_dense_twin_and_the_flops_baseline(cifar_dir, tmp_path):
    """Token MoE (top-2 of 4 pointwise experts at every position) after blocks 2 and 3, its dense twin (one FFN
    of 2 x the experts' hidden width per token MoE) and the equal-FLOPs FastCNN."""
    sets = SLICE + ["eval.tta=0", "model.moe=tokens", "model.moe_blocks=[2, 3]", "model.router=topk", "model.k=2",
                    "model.num_experts=4", "baselines.equal_params=false", "baselines.equal_time=false",
                    "baselines.reference=false"]
    s = run_experiment("cifar10-moe", sets, out=tmp_path / "r", data_dir=str(cifar_dir), quiet=True)
    models = s["models"]
    assert set(models) == {"moe", "dense-equal-flops", "dense-twin"}
    for name, r in models.items():
        _learned(name, r)
    moe, twin = models["moe"], models["dense-twin"]
    assert moe["moe"] == "tokens" and len(moe["routing"]["lead_share"]) == 4
    m = Model(width=16, moe="tokens", moe_blocks=[2, 3], num_experts=4, router="topk", k=2)
    _check_matched(m, models, ("dense-equal-flops",))
    # the twin: one dense FFN of k x the hidden width per token MoE; the same FLOPs but the routers' projections
    assert twin["flops_per_example"] < moe["flops_per_example"] < 1.05 * twin["flops_per_example"]
    assert twin["params"] < moe["params"] and "routing" not in twin and twin["matched_to"] == "architecture"
