import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import Seed1CNN, conv_l2_penalty


def test_shapes_and_features():
    m = Seed1CNN()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 10)
    assert m.features(x).shape == (2, 128 * 4 * 4) and m.feature_dim == 2048
    assert Seed1CNN(num_classes=7, width=8, in_channels=1)(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert Seed1CNN(width=8).feature_dim == 32 * 16


def test_parameter_count_matches_keras():
    m = Seed1CNN()
    # convs 287,008 + BN gamma/beta 896 + dense 20,490 = Keras "trainable params"
    assert sum(p.numel() for p in m.parameters()) == 308_394
    # + 896 BN moving mean/var = Keras "total params"
    assert sum(b.numel() for n, b in m.named_buffers() if "running" in n) == 896


def test_layer_order_and_keras_batchnorm():
    trunk = list(Seed1CNN().trunk)
    kinds = [type(layer).__name__ for layer in trunk[:3]]
    assert kinds == ["Conv2d", "ELU", "BatchNorm2d"]  # conv -> ELU -> BN, not conv-BN-ELU
    bns = [layer for layer in trunk if isinstance(layer, nn.BatchNorm2d)]
    assert len(bns) == 6 and all(b.momentum == 0.01 and b.eps == 1e-3 for b in bns)
    assert [layer.p for layer in trunk if isinstance(layer, nn.Dropout)] == [0.2, 0.3, 0.4]


def test_head_activation_gate():
    gate = Seed1CNN(head_activation="elu").eval()
    x = torch.randn(3, 3, 32, 32)
    out = gate(x)
    assert out.shape == (3, 10) and (out >= -1).all()
    assert torch.allclose(out, nn.functional.elu(gate.head(gate.features(x))))
    with pytest.raises(MoelabError, match="'gelu'"):
        Seed1CNN(head_activation="gelu")


def test_l2_penalty():
    m = Seed1CNN()
    convs = [layer.weight for layer in m.trunk if isinstance(layer, nn.Conv2d)]
    expected = 1e-4 * sum((w**2).sum() for w in convs)
    assert torch.allclose(m.l2_penalty(), expected)
    assert torch.allclose(conv_l2_penalty(m, coef=1.0), expected / 1e-4)
    m.l2_penalty().backward()
    assert torch.allclose(convs[0].grad, 2e-4 * convs[0].detach())
    assert m.head.weight.grad is None  # dense kernel is not regularised
    assert conv_l2_penalty(nn.Linear(2, 2)) == 0


@pytest.mark.parametrize("bad", [(0.1, 0.2), (0.1, 0.2, 1.0), "abc", (0.1, -0.1, 0.2)])
def test_bad_dropout(bad):
    with pytest.raises(MoelabError, match="dropout"):
        Seed1CNN(dropout=bad)


@pytest.mark.parametrize("kw", [{"num_classes": 0}, {"width": -1}, {"in_channels": 2.5}])
def test_bad_sizes(kw):
    with pytest.raises(MoelabError, match=repr(next(iter(kw.values())))):
        Seed1CNN(**kw)
