import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from moelab.errors import MoelabError
from moelab.moe import CondConv2d
from tests.moe.moe_helpers import assert_close, seeded  # noqa: F401

N, C, H, W = 3, 4, 7, 6


def _naive(m: CondConv2d, x):
    """Routing written out, then one mixed kernel and one F.conv2d per image."""
    logits = F.linear(x.mean(dim=(2, 3)), m.routing_fn.weight, m.routing_fn.bias) / m.temperature
    r = torch.sigmoid(logits) if m.routing == "sigmoid" else torch.softmax(logits, dim=-1)  # (N, E)
    outs = []
    for i in range(x.shape[0]):
        kernel = torch.einsum("e,eoikl->oikl", r[i], m.kernels)
        bias = None if m.bias is None else r[i] @ m.bias
        outs.append(F.conv2d(x[i : i + 1], kernel, bias, m.stride, m.padding, m.dilation, m.groups))
    return torch.cat(outs)


def _params(m):
    return [m.weight, m.routing_fn.weight, m.routing_fn.bias] + ([m.bias] if m.bias is not None else [])


IDS = ["pad1", "stride2", "asym-nobias", "groups2-same-dil2-softmax-T3", "depthwise-3x1-softmax"]
CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, num_experts=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, num_experts=3, stride=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, num_experts=2, stride=(2, 1), padding=(1, 0), bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, num_experts=4, groups=2, padding="same", dilation=2,
         routing="softmax", temperature=3.0),
    dict(in_channels=4, out_channels=8, kernel_size=(3, 1), num_experts=3, groups=4, padding=(1, 0),
         routing="softmax"),
]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_naive_per_image_loop_float64(case, train):
    m = CondConv2d(**case).double().train(train)
    x = torch.randn(N, C, H, W, dtype=torch.float64, requires_grad=True)
    y, y_ref = m(x), _naive(m, x)
    assert_close(y, y_ref, 1e-12, "output")
    g = torch.randn_like(y)
    inputs = [x, *_params(m)]
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    for name, a, b in zip(["x", "weight", "router weight", "router bias", "bias"], grads, grads_ref):
        assert_close(a, b, 1e-12, f"grad {name}")
    assert_close(m.last_routing, m.routing_weights(x).detach(), 0.0, "last_routing")
    assert not m.last_routing.requires_grad and m.last_routing.shape == (N, case["num_experts"])


def test_one_expert_and_equal_routing_reduce_to_a_plain_conv():
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    m = CondConv2d(C, 5, 3, 1, padding=1, routing="softmax").double()  # softmax over one expert: r = 1
    assert_close(m.routing_weights(x), torch.ones(N, 1, dtype=torch.float64), 0.0, "routing")
    assert_close(m(x), F.conv2d(x, m.kernels[0], m.bias[0], padding=1), 1e-12, "E=1 softmax")
    m = CondConv2d(C, 5, 3, 3, stride=2).double()
    with torch.no_grad():  # sigmoid(0) = 1/2 for every expert: the kernel is half the experts' sum
        m.routing_fn.weight.zero_()
        m.routing_fn.bias.zero_()
    assert_close(m(x), F.conv2d(x, 0.5 * m.kernels.sum(0), 0.5 * m.bias.sum(0), stride=2), 1e-12, "sigmoid 1/2")


def test_gradcheck_float64():
    m = CondConv2d(2, 2, 3, 2, padding=1, groups=2, routing="softmax", temperature=2.0).double()
    names = ["weight", "bias", "routing_fn.weight", "routing_fn.bias"]
    params = tuple(m.get_parameter(k).detach().clone().requires_grad_() for k in names)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *p):
        return functional_call(m, dict(zip(names, p)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_channels_last_input_same_output_and_format():
    m = CondConv2d(C, 6, 3, 3, stride=2, padding=1)
    x = torch.randn(N, C, H, W)
    y = m(x)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    yc = m(xc)
    assert_close(yc, y, 1e-5, "channels_last")
    assert yc.is_contiguous(memory_format=torch.channels_last)
    yc.sum().backward()
    assert xc.grad.shape == x.shape
    net = torch.nn.Sequential(m).to(memory_format=torch.channels_last)  # no 5-D parameter to trip over
    assert_close(net(xc), y, 1e-5, "module in channels_last")


def test_bf16_autocast_runs_and_is_close():
    m = CondConv2d(C, 6, 3, 3, padding=1, routing="softmax")
    x = torch.randn(N, C, H, W, requires_grad=True)
    y32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        r = m.routing_weights(x)
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    assert_close(y.float(), y32, 3e-2, "bf16 vs fp32")
    y.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(m.weight.grad).all()


def test_dropout_on_pooled_features_only_in_training():
    m = CondConv2d(C, 6, 3, 3, padding=1, dropout=0.5).double().eval()
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    assert_close(m(x), _naive(m, x), 1e-12, "eval: no dropout")
    m.train()
    assert not torch.allclose(m.routing_weights(x), m.routing_weights(x))


def test_init_per_expert_like_conv2d_and_repr():
    m = CondConv2d(8, 16, 3, 4, groups=2)
    bound = 1 / math.sqrt(4 * 9)  # kaiming_uniform(a=sqrt(5)) and the bias: 1/sqrt(fan_in), fan_in = C/g * k*k
    assert m.weight.shape == (4, 16 * 4 * 9) and m.kernels.shape == (4, 16, 4, 3, 3) and m.bias.shape == (4, 16)
    assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    assert m.weight.std() > 0.8 * bound / math.sqrt(3)  # uniform(-b, b) has std b/sqrt(3)
    assert not torch.equal(m.kernels[0], m.kernels[1])
    r = repr(m)
    assert "8, 16, kernel_size=(3, 3), num_experts=4" in r and "groups=2" in r and "routing='sigmoid'" in r


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=3), r"in_channels \(4\) and out_channels \(6\) must both be divisible by groups \(3\)"),
    (dict(num_experts=0), "num_experts must be a positive int, got 0"),
    (dict(kernel_size=0), "kernel_size must be an int >= 1 or a pair of them, got 0"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size must be an int >= 1 or a pair"),
    (dict(stride=2, padding="same"), "padding='same' needs stride 1, got stride=2"),
    (dict(padding="full"), "padding must be an int, a pair, 'same' or 'valid', got 'full'"),
    (dict(padding=-1), "padding must be an int >= 0"),
    (dict(routing="relu"), "routing must be one of 'sigmoid', 'softmax', got 'relu'"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(in_channels=4, out_channels=6, kernel_size=3, num_experts=2) | kwargs
    with pytest.raises(MoelabError, match=match):
        CondConv2d(**args)


def test_bad_input_and_temperature_raise():
    m = CondConv2d(4, 6, 3, 2)
    with pytest.raises(MoelabError, match=r"expected images of shape \(N, 4, H, W\), got \(2, 3, 5, 5\)"):
        m(torch.randn(2, 3, 5, 5))
    with pytest.raises(MoelabError, match=r"expected images of shape \(N, 4, H, W\), got \(4, 5, 5\)"):
        m.routing_weights(torch.randn(4, 5, 5))
    with pytest.raises(MoelabError, match="temperature must be a finite number > 0, got -1"):
        m.temperature = -1
    m.temperature = 30  # annealing schedule start (Chen et al.)
    assert m.temperature == 30.0


@pytest.mark.parametrize("routing", ["sigmoid", "softmax"])
@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, dilation=2, groups=2, bias=False)])
def test_empty_batch(routing, kw):
    """No images: nn.Conv2d's empty (0, O, H', W') output (a grouped conv needs groups >= 1), with a backward."""
    m = CondConv2d(C, 6, 3, num_experts=4, routing=routing, **kw)
    nn_conv = torch.nn.Conv2d(C, 6, 3, **kw)
    x = torch.randn(0, C, H, W, requires_grad=True)
    y = m(x)
    assert y.shape == nn_conv(x).shape and y.shape[0] == 0
    assert m.last_routing.shape == (0, 4)
    y.square().sum().backward()
    assert x.grad.shape == x.shape and (m.weight.grad == 0).all()
    assert m(torch.randn(2, C, H, W)).shape == nn_conv(torch.randn(2, C, H, W)).shape  # then a real batch
