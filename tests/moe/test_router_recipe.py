"""The router recipe options (issue #33 item 4): zero-initialised gates, training noise on the choosing scores,
auxiliary-loss-free bias balancing, the routers' own learning rate, and the per-sample soft mixture."""

import math

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from moelab import MLPExperts, MoE, kernels
from moelab.errors import MoelabError
from moelab.models.mlp_mixture import SparseMoEMLP
from moelab.moe import update_router_biases
from moelab.moe.routers import make_router
from moelab.parallel import ddp
from moelab.train.optim import Optim, make_schedule, onecycle_or_plateau, param_groups, routing_parameters
from moelab.train.trainer import minibatch_epoch
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401
from tests.moe.test_gpu_ready import SyncOps, accelerator_like  # noqa: F401

D, E = 6, 4


@pytest.fixture(autouse=True)
def _pytorch_paths():
    """The PyTorch routing paths (a noisy or biased router takes them anyway); no fused-kernel build."""
    with kernels.use(False):
        yield


def _zero(p) -> bool:
    return int(torch.count_nonzero(p)) == 0

LEARNED = ["dense", "topk", "noisy_topk", "switch", "expert_choice", "soft", "multi_gate"]


def _bad(router: str, match: str, **opts):
    with pytest.raises(MoelabError, match=match):
        make_router(router, D, E, **opts)


# ------------------------------------------------------------------ zero init


@pytest.mark.parametrize("router", LEARNED)
def test_zero_init_gives_every_expert_the_same_score(router):
    r = make_router(router, D, E, init="zeros").eval()  # eval: noisy_topk reports its clean logits
    assert all(_zero(p) for p in r.gate.parameters())
    x = torch.randn(5, 3, D) if router == "soft" else torch.randn(5, D)
    out = r(x)
    assert torch.equal(out.logits, torch.zeros_like(out.logits))
    if router in ("dense", "multi_gate"):  # uniform gates (multi_gate: the sum of 2 heads)
        assert_close(out.gates, torch.full((5, E), (2 if router == "multi_gate" else 1) / E), 1e-7, "gates")
    assert not any(_zero(p) for p in make_router(router, D, E).gate.parameters())  # default: random


def test_zero_init_of_a_custom_gate_and_its_limits():
    gate = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, E))
    make_router("topk", None, E, gate=gate, init="zeros")
    assert _zero(gate[2].weight) and _zero(gate[2].bias) and not _zero(gate[0].weight)
    heads = [nn.Linear(D, E), nn.Linear(D, E)]
    make_router("multi_gate", None, E, gate=heads, init="zeros")
    assert all(_zero(h.weight) for h in heads)
    with pytest.raises(MoelabError, match="init='zeros'.*NormalizedSlots has none"):
        make_router("soft", D, E, normalize=True, init="zeros")
    _bad("topk", r"router 'topk': init must be one of default, zeros, got 'xavier'", init="xavier")
    _bad("hash", r"does not take option\(s\) \['init'\]", init="zeros")


# ------------------------------------------------------------------ training noise


@pytest.mark.parametrize("router,k", [("topk", 2), ("switch", 1)])
def test_training_noise_moves_the_choice_not_the_weights(router, k):
    r = make_router(router, D, E, train_noise="uniform", noise_scale=0.7, **({"k": k} if router == "topk" else {}))
    x = torch.randn(64, D)
    torch.manual_seed(3)
    noisy = r(x)
    torch.manual_seed(3)
    u = torch.rand(64, E) * 0.7  # the draw the router made
    assert torch.equal(noisy.indices, (noisy.logits + u).topk(k, dim=-1).indices)
    clean_top = noisy.logits.gather(1, noisy.indices)
    want = clean_top.softmax(-1) if router == "topk" else noisy.logits.softmax(-1).gather(1, noisy.indices)
    assert_close(noisy.weights, want, 1e-6, "weights from the clean logits")
    torch.manual_seed(3)
    assert torch.equal(r(x).indices, noisy.indices)  # reproducible from the seed
    r.eval()
    clean = r(x)
    assert torch.equal(clean.indices, clean.logits.topk(k, dim=-1).indices)  # no noise in eval
    assert not torch.equal(clean.indices, noisy.indices)
    torch.manual_seed(4)
    assert torch.equal(r(x).indices, clean.indices)


def test_training_noise_breaks_the_ties_of_a_zero_gate():
    """Chen et al. 2022: a zero-initialised router picks its experts by the noise alone at first."""
    r = make_router("switch", D, E, init="zeros", train_noise="uniform")
    counts = r(torch.randn(4000, D)).expert_counts
    assert counts.min() > 800  # ~1000 each; without noise every token would go to expert 0
    assert (r.eval()(torch.randn(10, D)).indices == 0).all()


def test_bad_noise_options():
    _bad("topk", r"train_noise must be one of none, uniform, got 'gauss'", train_noise="gauss")
    _bad("switch", r"noise_scale must be > 0", noise_scale=0.0)
    _bad("dense", r"does not take option\(s\) \['train_noise'\]", train_noise="uniform")


# ------------------------------------------------------------------ bias balancing


def _onehot_router(router="topk", **kw):
    """Gate = identity on x in R^E: a one-hot token e_i scores expert i highest."""
    r = make_router(router, None, E, gate=nn.Identity(), balance="bias", **kw)
    return r


def test_bias_moves_against_the_load_by_exactly_rate_times_sign():
    r = _onehot_router(k=1, normalize=False, bias_rate=0.25)
    x = torch.eye(E)[[0, 0, 0, 1, 2, 0, 1, 2]]  # load (4, 2, 2, 0), mean 2
    r.train()(x)
    assert r.expert_load.tolist() == [4, 2, 2, 0]
    update_router_biases(r)
    assert r.expert_bias.tolist() == [-0.25, 0.0, 0.0, 0.25] and r.expert_load.tolist() == [0, 0, 0, 0]
    update_router_biases(r)  # no forward since: nothing moves
    assert r.expert_bias.tolist() == [-0.25, 0.0, 0.0, 0.25]
    r.eval()(x)  # evaluation forwards are not counted
    assert r.expert_load.tolist() == [0, 0, 0, 0]
    r.train()(x[:3])  # two forwards before a step (gradient accumulation): summed
    r(x[3:])
    assert r.expert_load.tolist() == [4, 2, 2, 0]
    r.update_bias()
    assert r.expert_bias.tolist() == [-0.5, 0.0, 0.0, 0.5]


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_bias_chooses_but_does_not_weigh(router):
    r = make_router(router, D, E, balance="bias", **({"k": 2} if router == "topk" else {})).eval()
    x = torch.randn(32, D)
    before = r(x)
    r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 100.0]))
    after = r(x)
    assert torch.equal(after.logits, before.logits)
    assert (after.indices[:, 0] == 3).all()  # the bias decides (in evaluation too)
    top = after.logits.gather(1, after.indices)
    want = top.softmax(-1) if router == "topk" else after.logits.softmax(-1).gather(1, after.indices)
    assert_close(after.weights, want, 1e-6, "weights from the unbiased logits")


def test_bias_is_saved_and_loaded(tmp_path):
    layer = MoE(D, E, 8, router="topk", router_options={"balance": "bias"})
    layer.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    sd = layer.state_dict()
    assert "router.expert_bias" in sd and "router.expert_load" not in sd
    torch.save(sd, tmp_path / "m.pt")
    fresh = MoE(D, E, 8, router="topk", router_options={"balance": "bias"})
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert torch.equal(fresh.router.expert_bias, layer.router.expert_bias)
    assert "router.expert_bias" not in MoE(D, E, 8, router="topk").state_dict()  # default layout unchanged


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_bias_balancing_has_no_balance_loss(router):
    layer = MoE(D, E, 8, router=router, router_options={"balance": "bias"})
    assert layer.aux_loss_weights == {} and float(layer(torch.randn(10, D))[1].loss) == 0
    assert MoE(D, E, 8, router=router).aux_loss_weights == {"balance": 0.01}
    both = MoE(D, E, 8, router=router, aux_loss_weights={"balance": 0.01}, router_options={"balance": "bias"})
    assert both.aux_loss_weights == {"balance": 0.01}  # asked for explicitly: kept


def test_bad_balance_options():
    _bad("topk", r"balance must be one of aux, bias, got 'loss'", balance="loss")
    for rate in (0.0, -1e-3, math.nan):
        _bad("switch", "bias_rate must be > 0", balance="bias", bias_rate=rate)
    _bad("expert_choice", r"does not take option\(s\) \['balance'\]", balance="bias")


def _toy_train(balance: str, steps: int = 50) -> list[int]:
    """A top-1 layer whose gate starts with expert 0 favoured, trained on a regression with no balance loss;
    -> the tokens per expert of a held-out batch after training."""
    torch.manual_seed(0)
    gate = nn.Linear(D, E)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    layer = MoE(D, E, 8, router="topk", k=1, gate=gate, aux_loss_weights={"balance": 0},
                router_options={"normalize": False, "balance": balance, "bias_rate": 0.05})
    w = torch.randn(D, D)
    batches = [(x, x @ w, 1.0) for x in torch.randn(steps, 64, D)]
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    minibatch_epoch(layer, opt, None, batches, layer, lambda out, y: (F.mse_loss(out[0], y), out[1].loss))
    return layer.eval()(torch.randn(512, D))[1].expert_counts.tolist()


def test_bias_balancing_evens_the_load_in_training():
    """The training loop's hook (minibatch_epoch -> update_router_biases) moves the bias every step."""
    unbalanced, balanced = _toy_train("aux"), _toy_train("bias")
    assert max(unbalanced) > 400, unbalanced  # expert 0 takes nearly everything
    assert max(balanced) < 0.6 * max(unbalanced), (balanced, unbalanced)


def test_bias_balancing_reads_nothing_back(accelerator_like):  # noqa: F811
    """Forward, backward and the bias update on the grouped bf16 path: no host sync."""
    layer = MoE(32, 8, router="topk", experts=MLPExperts(8, 32, 64, sparse_impl="grouped"),
                router_options={"balance": "bias", "train_noise": "uniform"}).to(torch.bfloat16)
    x = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    with SyncOps() as ops:
        y, aux = layer(x)
        (y.float().square().sum() + aux.loss).backward()
        update_router_biases(layer)
    assert ops.ops == [] and layer.router.expert_bias.abs().sum() > 0


def test_bias_and_noise_compile_as_one_graph():
    torch._dynamo.reset()
    layer = MoE(32, 8, router="topk", experts=MLPExperts(8, 32, 64, sparse_impl="grouped"),
                router_options={"balance": "bias", "train_noise": "uniform"}).to(torch.bfloat16)
    ref = MoE(32, 8, router="topk", experts=MLPExperts(8, 32, 64, sparse_impl="grouped"),
              router_options={"balance": "bias", "train_noise": "uniform"}).to(torch.bfloat16)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16, 32, dtype=torch.bfloat16)
    try:
        with kernels.use(False):
            torch.manual_seed(1)
            y0, _ = ref(x)
        torch.manual_seed(1)
        y1, _ = torch.compile(layer, fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert_close(y1.float(), y0.float(), 0, "output")
    assert torch.equal(layer.router.expert_load, ref.router.expert_load) and int(layer.router.expert_load.sum()) == 128


def test_bias_update_sums_the_load_over_ranks(world_of_one, monkeypatch):
    """With torch.distributed up the load is all-reduced (one process here); DDP leaves ``expert_load`` out of
    its buffer broadcast, which would overwrite each rank's tally with rank 0's."""
    r = _onehot_router(k=1, normalize=False)
    r.train()(torch.eye(E)[[0, 0, 1, 2]])
    r.update_bias()
    assert r.expert_bias.tolist() == pytest.approx([-1e-3, 0.0, 0.0, 1e-3])
    model = nn.Sequential(MoE(D, E, 8, router="switch", router_options={"balance": "bias"}))
    monkeypatch.setattr(ddp, "current", lambda: ddp.DistContext(0, 2))
    wrapped = ddp.wrap_model(model)
    assert model._ddp_params_and_buffers_to_ignore == ["0.router.expert_load"]
    del wrapped


# ------------------------------------------------------------------ routing learning rate


def test_routing_parameters_get_their_own_lr_and_the_schedules_keep_the_ratio():
    model = SparseMoEMLP(12, 8, 16, 3, depth=2, num_experts=4, router="noisy_topk", k=2)
    routers = [m.router for m in model.blocks]
    want = {id(p) for r in routers for p in r.parameters()}  # gate and noise gate of each block
    assert {id(p) for p in routing_parameters(model)} == want and len(want) == 4
    one = param_groups(model, 1e-2)
    assert len(one) == 1 and [id(p) for p in one[0]["params"]] == [id(p) for p in model.parameters()]
    groups = param_groups(model, 1e-2, 0.01)
    assert [g["name"] for g in groups] == ["weights", "routing"]
    assert {id(p) for p in groups[1]["params"]} == want and groups[1]["lr"] == pytest.approx(1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert [g["name"] for g in param_groups(SparseMoEMLP(12, 8, 16, 3), 1e-2, 0.01)] == ["weights"]  # no router
    for make in (lambda o: make_schedule(Optim(schedule="onecycle"), o, 20),
                 lambda o: onecycle_or_plateau("onecycle", o, 1e-2, 2, 10)):
        opt = torch.optim.SGD(param_groups(model, 1e-2, 0.01), lr=1e-2)
        sched = make(opt)
        for _ in range(15):
            assert opt.param_groups[1]["lr"] == pytest.approx(0.01 * opt.param_groups[0]["lr"], rel=1e-9)
            opt.step()
            sched.step()


# ------------------------------------------------------------------ per-sample soft mixture


def _naive_soft_mixture(layer: MoE, x):
    """Per image: softmax over every expert's score, every expert run, the weighted sum."""
    ex, rows = layer.experts, []
    for xn in x:
        g = torch.softmax(xn @ layer.router.gate.weight.t(), -1)  # (E,)
        outs = [F.gelu(xn @ ex.w1[i] + ex.b1[i]) @ ex.w2[i] + ex.b2[i] for i in range(layer.num_experts)]
        rows.append(sum(g[i] * outs[i] for i in range(layer.num_experts)))
    return torch.stack(rows)


def test_dense_router_is_the_per_sample_soft_mixture():
    layer = MoE(D, E, 8, router="dense").double()
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    y, aux = layer(x)
    ref = _naive_soft_mixture(layer, x)
    assert_close(y, ref, 1e-12, "output")
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * gy).sum(), [x, *layer.parameters()])
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-12, "gradient")
    assert aux.expert_counts.tolist() == [7] * E and float(aux.loss) == 0  # every expert runs; no aux loss
    tiny = MoE(3, 2, 4, router="dense").double()
    xt = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tiny(t)[0], (xt,))
    assert torch.autograd.gradcheck(lambda w: torch.func.functional_call(tiny, {"router.gate.weight": w}, (xt,))[0],
                                    (tiny.router.gate.weight.detach().clone().requires_grad_(),))


# ------------------------------------------------------------------ cifar10-moe's keys


def test_cifar_moe_recipe_keys():
    import moelab.experiments.cifar_moe as cm
    from moelab.errors import ConfigError
    from moelab.moe import CondConv2d

    recipe = {"router_init": "zeros", "router_noise": "uniform", "balance": "bias", "bias_rate": 0.01}
    net = cm.build_model(cm.Model(moe="blocks", router="topk", **recipe), aux_scale=2.0)
    block = net.blocks[2]
    assert (block.router.balance, block.router.train_noise, block.aux_loss_weights) == ("bias", "uniform", {})
    assert _zero(block.router.gate[-1].weight)
    tokens = cm.build_model(cm.Model(moe="tokens", router="switch", balance="bias"))
    assert [m.balance for m in tokens.modules() if hasattr(m, "route")] == ["bias"]
    cc = cm.build_model(cm.Model(moe="condconv", router_init="zeros"))
    assert all(_zero(m.routing_fn.weight) for m in cc.modules() if isinstance(m, CondConv2d))
    dense = cm.build_model(cm.Model(moe="blocks", router="dense", num_experts=3))
    assert type(dense.blocks[2].router).__name__ == "DenseRouter"
    cm.check_config(cm.Config(model=cm.Model(moe="blocks", router="switch", **recipe)))
    for model, key in ((cm.Model(moe="blocks", router="expert_choice", router_noise="uniform"), "model.router_noise"),
                       (cm.Model(moe="condconv", balance="bias"), "model.balance"),
                       (cm.Model(moe="tokens", router="dense", capacity_factor=1.0), "model.capacity_factor")):
        with pytest.raises(ConfigError, match=key):
            cm.check_config(cm.Config(model=model))
