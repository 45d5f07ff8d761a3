import copy

import pytest
import torch

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import Seed1CNN
from moelab.reproductions.conv_experts import AUTO_TABLE, ConvExperts

E, N = 2, 4
IMPLS = ["separate", "grouped", "vmap"]


def _experts(impl, dropout=(0.2, 0.3, 0.4), dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ce = ConvExperts(E, dropout=dropout, impl=impl).to(dtype)
    with torch.no_grad():  # non-trivial BN affine params and running stats
        for name, t in ce.named_parameters():
            if ".bn" in name:
                t.add_(0.3 * torch.randn_like(t))
        for name, t in ce.named_buffers():
            if "running" in name:
                t.copy_(torch.rand_like(t) + (0.5 if "var" in name else -0.5))
    return ce


def _check_against_modules(ce, mods, x):
    """Outputs, input and parameter gradients of ce equal those of its per-expert modules."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ce(xa)
    ref = torch.stack([m(xb) for m in mods])
    assert out.shape == (E, N, 10)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for name, p in ce.named_parameters():
        for i, m in enumerate(mods):
            torch.testing.assert_close(
                p.grad[i], m.get_parameter(name).grad, msg=lambda s, n=name: f"{n}: {s}"
            )
    # BN running stats (and num_batches_tracked) stay identical per expert
    for i, m in enumerate(mods):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(ce.state_dict()[k][i], v, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.parametrize("impl", IMPLS)
def test_train_mode_matches_separate_cnns(impl):
    ce = _experts(impl, dropout=(0, 0, 0)).train()
    mods = ce.to_modules()
    assert all(m.training for m in mods)
    _check_against_modules(ce, mods, torch.randn(N, 3, 32, 32, dtype=torch.float64))
    assert ce.get_buffer("trunk.bn2_1.num_batches_tracked").tolist() == [1] * E


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_mode_matches_separate_cnns(impl):
    ce = _experts(impl).eval()  # default dropout, inactive in eval
    mods = ce.to_modules()
    assert not any(m.training for m in mods)
    _check_against_modules(ce, mods, torch.randn(N, 3, 32, 32, dtype=torch.float64))
    assert ce.get_buffer("trunk.bn2_1.num_batches_tracked").tolist() == [0] * E


@pytest.mark.parametrize("impl", IMPLS)
def test_train_mode_dropout_is_active_and_per_expert(impl):
    ce = ConvExperts(2, dropout=(0.5, 0.5, 0.5), impl=impl).train()
    x = torch.randn(2, 3, 32, 32)
    a, b = ce(x), ce(x)
    assert a.shape == (2, 2, 10) and not torch.allclose(a, b)
    ce.load_expert_state_dict(1, ce.expert_state_dict(0))  # identical experts, different masks
    out = ce(x)
    assert not torch.allclose(out[0], out[1])


def test_round_trip_and_expert_state_dicts():
    torch.manual_seed(1)
    mods = [Seed1CNN() for _ in range(E)]
    ce = ConvExperts.from_modules(mods, impl="grouped")
    assert ce.num_experts == E and ce.impl == "grouped" and ce.training
    assert ce.get_parameter("trunk.conv1_2.weight").shape == (E, 32, 32, 3, 3)
    for i, (m, back) in enumerate(zip(mods, ce.to_modules())):
        for k, v in m.state_dict().items():
            assert torch.equal(back.state_dict()[k], v)
            assert torch.equal(ce.expert_state_dict(i)[k], v)
    # load one expert, others untouched; the returned dict is a copy
    new = Seed1CNN().state_dict()
    ce.load_expert_state_dict(1, new)
    assert torch.equal(ce.expert_state_dict(1)["head.weight"], new["head.weight"])
    assert torch.equal(ce.expert_state_dict(0)["head.weight"], mods[0].head.weight)
    ce.expert_state_dict(0)["head.bias"].add_(1)
    assert torch.equal(ce.expert_state_dict(0)["head.bias"], mods[0].head.bias)
    # the checkpoint does not depend on impl
    other = ConvExperts(E, impl="separate")
    other.load_state_dict(ce.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(other.eval()(x), ce.eval()(x))


def test_from_modules_keeps_dtype_and_mode():
    mods = [Seed1CNN(dropout=(0, 0, 0)).double().eval() for _ in range(2)]
    ce = ConvExperts.from_modules(mods)
    assert ce.head.weight.dtype == torch.float64 and not ce.training and ce.dropout == (0, 0, 0)


def test_l2_penalty_sums_experts():
    ce = _experts("grouped")
    torch.testing.assert_close(ce.l2_penalty(), sum(m.l2_penalty() for m in ce.to_modules()))


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(2)
    ce = ConvExperts(2).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = torch.stack([m(x) for m in ce.to_modules()])
    xcl = x.contiguous(memory_format=torch.channels_last)
    for impl in IMPLS:
        ce.impl = impl
        torch.testing.assert_close(ce(xcl), ref, atol=1e-4, rtol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ce(xcl)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=0.1 * ref.abs().max().item(), rtol=0.1)
    ce.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in IMPLS:
            ce.impl = impl
            ce(xcl).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ce.parameters())


def test_auto_resolution():
    ce = ConvExperts(2)
    x = torch.randn(1, 3, 32, 32)
    assert ce.resolve_impl(x) == AUTO_TABLE[("cpu", torch.float32, True)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ce.eval().resolve_impl(x) == AUTO_TABLE[("cpu", torch.bfloat16, False)]
    ce.impl = "vmap"
    assert ce.resolve_impl(x) == "vmap"


def test_deepcopy_and_to_keep_working():
    ce = copy.deepcopy(ConvExperts(2)).to(torch.float64).eval()
    assert ce(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (2, 1, 10)
    assert ce.to(memory_format=torch.channels_last) is ce  # accepted (and a no-op) like on a Seed1CNN


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_bad_num_experts(bad):
    with pytest.raises(MoelabError, match=f"num_experts.*{bad!r}"):
        ConvExperts(bad)


def test_bad_impl_and_arguments():
    with pytest.raises(MoelabError, match="'fused'"):
        ConvExperts(2, impl="fused")
    ce = ConvExperts(2)
    with pytest.raises(MoelabError, match="'loop'"):
        ce.impl = "loop"
    with pytest.raises(MoelabError, match=r"\(0.1, 0.2\)"):
        ConvExperts(2, dropout=(0.1, 0.2))
    with pytest.raises(MoelabError, match="got 2"):
        ce.expert_state_dict(2)
    with pytest.raises(MoelabError, match=r"\(1, 3, 28, 28\)"):
        ce(torch.randn(1, 3, 28, 28))
    sd = Seed1CNN().state_dict()
    sd.pop("head.bias")
    with pytest.raises(MoelabError, match="head.bias"):
        ce.load_expert_state_dict(0, sd)
    with pytest.raises(MoelabError, match="head.weight"):
        ce.load_expert_state_dict(0, Seed1CNN(num_classes=5).state_dict())
    with pytest.raises(MoelabError, match="identically configured"):
        ConvExperts.from_modules([Seed1CNN(), Seed1CNN(width=16)])
    with pytest.raises(MoelabError, match="head activation"):
        ConvExperts.from_modules([Seed1CNN(head_activation="elu")])
    with pytest.raises(MoelabError, match="non-empty"):
        ConvExperts.from_modules([])


def test_bench_conv_smoke():
    from moelab.bench.conv import bench_conv, format_table

    rows = bench_conv(
        num_experts=2, batch=2, dtypes=("bf16",), impls=("separate", "grouped"), train_impls=("separate",),
        iters=1, warmup=0,
    )  # fmt: skip
    got = [(r["mode"], r["impl"]) for r in rows]
    assert got == [("infer", "separate"), ("infer", "grouped"), ("infer", "Seed1CNN"), ("train", "separate"),
                   ("train", "Seed1CNN")]  # fmt: skip
    assert all(r["error"] is None and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["vs_separate"] == 1.0 and rows[-1]["vs_separate"] is None
    assert "2 x grouped" in format_table(rows)
    with pytest.raises(MoelabError, match="'fp16'"):
        bench_conv(dtypes=("fp16",))
