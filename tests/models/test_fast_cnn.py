"""FastCNN (the airbench-style dense reference of cifar10-moe): shapes, whitening, replacement hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.models.fast_cnn import ConvGroup, FastCNN
from moelab.moe import CondConv2d


def test_shapes_and_frozen_parts():
    torch.manual_seed(0)
    net = FastCNN((8, 16, 16))
    x = torch.randn(5, 3, 32, 32)
    logits, aux, auxes = net.forward_with_aux(x)
    assert logits.shape == (5, 10) and float(aux) == 0 and auxes == []
    z, _, _ = net.features(x)
    assert z.shape == (5, 16)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad
    assert all(not b.norm1.weight.requires_grad for b in net.blocks)
    # airbench's dirac init: block 2's second conv starts as the identity
    w = net.blocks[1].conv2.weight
    assert torch.equal(w[:, :, 1, 1], torch.eye(16)) and float(w[:, :, 0].detach().abs().sum()) == 0


def test_whitening_decorrelates_the_patches():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 3, 32, 32)).cumsum(2)  # correlated pixels
    net = FastCNN((8, 8, 8))
    net.init_whitening(images, eps=0)
    out = net.whiten(images)[:, :12] - net.whiten.bias[:12].view(1, -1, 1, 1)  # (N, 12, 31, 31)
    flat = out.permute(1, 0, 2, 3).reshape(12, -1).double()
    cov = torch.cov(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=2e-2)
    assert torch.equal(net.whiten.weight[12:], -net.whiten.weight[:12])


def test_conv_and_block_factories():
    made = []

    def conv(name, c_in, c_out):
        made.append(name)
        return CondConv2d(c_in, c_out, 3, 4, padding=1, bias=False) if name.startswith("block3") else None

    net = FastCNN((8, 16, 32), conv_factory=conv)
    assert made == ["block1.conv1", "block1.conv2", "block2.conv1", "block2.conv2", "block3.conv1", "block3.conv2"]
    assert isinstance(net.blocks[2].conv1, CondConv2d) and isinstance(net.blocks[1].conv1, nn.Conv2d)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    class Twice(nn.Module):  # a block returning (y, aux) has its aux collected
        def __init__(self, c_in, c_out):
            super().__init__()
            self.inner = ConvGroup(c_in, c_out)

        def forward(self, x):
            return self.inner(x), type("Aux", (), {"loss": torch.tensor(0.25)})()

    net = FastCNN((8, 16, 32), block_factory=lambda b, ci, co: Twice(ci, co) if b == 2 else None)
    _, aux, auxes = net.forward_with_aux(torch.randn(2, 3, 32, 32))
    assert float(aux) == 0.25 and len(auxes) == 1


def test_bad_widths():
    with pytest.raises(MoelabError, match=r"FastCNN: widths must be three block widths, got \(8, 8\)"):
        FastCNN((8, 8))
    with pytest.raises(MoelabError, match=r"FastCNN: widths\[1\] must be an integer >= 1, got 0"):
        FastCNN((8, 0, 8))


def test_condconv_expert_kernels_start_as_identity_like_the_dense_convs():
    """FastCNN's dirac init reaches every expert kernel of a CondConv2d: a mixture of them (weights summing to
    one) passes its first filters' inputs through exactly like the dense conv does."""
    net = FastCNN((8, 16, 32), conv_factory=lambda n, ci, co: CondConv2d(ci, co, 3, 3, padding=1, bias=False,
                                                                         routing="softmax"))
    for block in net.blocks:
        for conv in (block.conv1, block.conv2):
            k = conv.kernels  # (E, O, C, 3, 3)
            o, c = k.shape[1:3]
            d = min(o, c)
            eye = torch.zeros(d, c, 3, 3)
            eye[torch.arange(d), torch.arange(d), 1, 1] = 1
            assert torch.equal(k[:, :d], eye.expand(k.shape[0], -1, -1, -1, -1))
            if o > c:  # the rest: PyTorch's default init, different per expert
                assert k[:, c:].abs().sum() > 0 and not torch.equal(k[0, c:], k[1, c:])

