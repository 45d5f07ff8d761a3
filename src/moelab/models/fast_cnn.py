"""A fast CIFAR-10 CNN of the airbench kind (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a
single GPU", arXiv 2404.00498): the dense reference of the ``cifar10-moe`` experiments.

Shapes for 32x32 inputs and ``widths = (w1, w2, w3)`` (airbench94: 64, 256, 256)::

    x (N, 3, 32, 32)
    whiten   conv2x2(3 -> 24, no padding), frozen weights from the training patches' PCA   (N, 24, 31, 31)
    GELU
    block1   conv3x3(24 -> w1) - maxpool2 - BN - GELU - conv3x3(w1 -> w1) - BN - GELU      (N, w1, 15, 15)
    block2   the same, w1 -> w2                                                              (N, w2, 7, 7)
    block3   the same, w2 -> w3                                                              (N, w3, 3, 3)
    head     maxpool3 (global) - Linear(w3, classes, no bias) - x scale                     (N, classes)

BatchNorm has no learnable scale (only a bias) and momentum 0.4 (airbench's 0.6 in its own
convention). ``conv_factory(name, c_in, c_out)`` may replace any block's 3x3 convolutions (names
``block{b}.conv{i}``, b = 1..3, i = 1..2), e.g. with :class:`moelab.moe.CondConv2d`; a replacement
must map (N, c_in, H, W) to (N, c_out, H, W) ("same" padding). ``block_factory(b, c_in, c_out)`` may
replace a whole block (e.g. with an MoE of conv blocks); a module that returns ``(y, aux)`` (an
:class:`moelab.moe.MoE`) has its auxiliary loss collected by :meth:`FastCNN.forward_with_aux`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.models.cifar_cnn import check_positive_int
from moelab.moe.condconv import CondConv2d

AIRBENCH_WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
BN_MOMENTUM = 0.4  # PyTorch convention (airbench writes 1 - 0.4 = 0.6)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with a bias only (the scale is fixed at 1, as in airbench)."""
    bn = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def _dirac_first(w: Tensor, groups: int = 1) -> None:
    """In place: the first ``in`` filters of conv weight ``w`` (O, C/g, kh, kw) pass their input through."""
    torch.nn.init.dirac_(w[: w.shape[1]] if w.shape[0] >= w.shape[1] * groups else w)


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)


class ConvGroup(nn.Module):
    """airbench's ConvGroup, ``conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU``: (N, c_in, H, W) ->
    (N, c_out, H/2, W/2). (Not the residual expert block of the library, :class:`moelab.moe.conv_blocks.ConvBlock`.)"""

    def __init__(self, c_in: int, c_out: int, conv1: nn.Module | None = None, conv2: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1 if conv1 is not None else conv3x3(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = batch_norm(c_out)
        self.conv2 = conv2 if conv2 is not None else conv3x3(c_out, c_out)
        self.norm2 = batch_norm(c_out)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class BlockThen(nn.Module):
    """``after(block(x))``: a block followed by a module that may return ``(y, aux)`` (e.g. a
    :class:`moelab.moe.TokenMoE2d`), whose pair is passed on for :meth:`FastCNN.forward_with_aux`."""

    def __init__(self, block: nn.Module, after: nn.Module):
        super().__init__()
        self.block, self.after = block, after

    def forward(self, x: Tensor):
        return self.after(self.block(x))


class FastCNN(nn.Module):
    """The airbench-style CNN (module docstring). ``forward(x) -> logits``; ``forward_with_aux(x) ->
    (logits, summed auxiliary loss, list of the MoE blocks' MoEAux)``."""

    def __init__(self, widths: tuple[int, int, int] = AIRBENCH_WIDTHS, num_classes: int = 10,
                 scale: float = 1 / 9, conv_factory: Callable[[str, int, int], nn.Module | None] | None = None,
                 block_factory: Callable[[int, int, int], nn.Module | None] | None = None):
        super().__init__()
        if len(widths) != 3:
            raise MoelabError(f"FastCNN: widths must be three block widths, got {widths!r}")
        for i, w in enumerate(widths):
            check_positive_int(f"FastCNN: widths[{i}]", w)
        check_positive_int("FastCNN: num_classes", num_classes)
        self.widths, self.num_classes, self.scale = tuple(widths), num_classes, float(scale)
        whiten_width = 2 * 3 * WHITEN_KERNEL ** 2
        self.whiten = nn.Conv2d(3, whiten_width, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        blocks, c_in = [], whiten_width
        for b, c_out in enumerate(widths, start=1):
            block = block_factory(b, c_in, c_out) if block_factory is not None else None
            if block is None:
                convs = [conv_factory(f"block{b}.conv{i}", ci, c_out) if conv_factory is not None else None
                         for i, ci in ((1, c_in), (2, c_out))]
                block = ConvGroup(c_in, c_out, *convs)
            blocks.append(block)
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():  # airbench: identity-initialised first filters ("dirac"), the rest PyTorch's default
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                _dirac_first(m.weight.data, m.groups)
            elif isinstance(m, CondConv2d):  # each expert kernel
                for k in m.kernels.data:
                    _dirac_first(k, m.groups)
        self.whiten.bias.data.zero_()

    @torch.no_grad()
    def init_whitening(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the frozen 2x2 whitening filters from training images (N, 3, H, W): the eigenvectors of
        the patches' covariance scaled by 1/sqrt(eigenvalue + eps), and their negatives."""
        k = WHITEN_KERNEL
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, 3, H-1, W-1, k, k)
        patches = patches.transpose(1, 3).reshape(-1, 3 * k * k).double()  # (M, 12): (c, kh, kw) order
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        vals, vecs = vals.flip(0), vecs.T.flip(0)  # (12,), (12, 12) rows are eigenvectors
        filters = (vecs / torch.sqrt(vals + eps).unsqueeze(1)).view(-1, 3, k, k).float()
        self.whiten.weight.copy_(torch.cat([filters, -filters]))

    def features(self, x: Tensor) -> tuple[Tensor, Tensor, list]:
        aux, auxes = x.new_zeros((), dtype=torch.float32), []
        x = self.act(self.whiten(x))
        for block in self.blocks:
            out = block(x)
            if isinstance(out, tuple):  # an MoE block: (y, MoEAux)
                out, a = out
                aux = aux + a.loss
                auxes.append(a)
            x = out
        return self.pool(x).flatten(1), aux, auxes

    def forward_with_aux(self, x: Tensor) -> tuple[Tensor, Tensor, list]:
        z, aux, auxes = self.features(x)
        return self.head(z) * self.scale, aux, auxes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_aux(x)[0]
