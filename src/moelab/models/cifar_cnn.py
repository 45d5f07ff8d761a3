"""The CNN of seed experiment 1 (Keras, CIFAR-10): one expert, or the gate trunk.

Per stage s = 1, 2, 3 with C = width * 2**(s-1) channels::

    [conv3x3(C, padding same) - ELU - BatchNorm] x2 - maxpool2 - dropout(p_s)

then flatten (4*width * 4*4 = 2048 features for 32x32 inputs) and dense(num_classes).
The layer order is conv -> ELU -> BN, as in the Keras model (not conv-BN-ELU).
BatchNorm uses the Keras defaults (momentum 0.99, i.e. PyTorch ``momentum=0.01``; eps 1e-3) and
weights are initialised as Keras does (Glorot-uniform kernels, zero biases). The Keras model has an
L2 1e-4 regulariser on the conv kernels: add :func:`conv_l2_penalty` to the loss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from moelab.errors import MoelabError

IMAGE_SIZE = 32  # the head's input size assumes 32x32 images (3 max-pools -> 4x4)
BN_MOMENTUM = 0.01  # Keras momentum 0.99
BN_EPS = 1e-3  # Keras default
L2_COEF = 1e-4  # Keras kernel_regularizer=l2(1e-4) on the conv kernels
HEAD_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "softmax": lambda: nn.Softmax(dim=-1)}


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoelabError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_dropout(dropout) -> tuple[float, float, float]:
    ok = isinstance(dropout, Sequence) and len(dropout) == 3
    ok = ok and all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < 1 for p in dropout)
    if not ok:
        raise MoelabError(f"dropout must be three probabilities in [0, 1), one per stage; got {dropout!r}")
    return tuple(float(p) for p in dropout)


def seed1_trunk(width: int = 32, in_channels: int = 3, dropout=(0.2, 0.3, 0.4)) -> nn.Sequential:
    """The conv trunk, layers named ``conv{stage}_{i}``, ``elu..``, ``bn..``, ``pool{stage}``, ``drop{stage}``."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for s, p in enumerate(dropout, start=1):
        c = width * 2 ** (s - 1)
        for i in (1, 2):
            conv = nn.Conv2d(c_in, c, 3, padding=1)
            nn.init.xavier_uniform_(conv.weight)  # Keras glorot_uniform, zero bias
            nn.init.zeros_(conv.bias)
            layers[f"conv{s}_{i}"] = conv
            layers[f"elu{s}_{i}"] = nn.ELU(inplace=True)  # safe: conv backward does not need its output
            layers[f"bn{s}_{i}"] = nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
            c_in = c
        layers[f"pool{s}"] = nn.MaxPool2d(2)
        layers[f"drop{s}"] = nn.Dropout(p)
    return nn.Sequential(layers)


class Seed1CNN(nn.Module):
    """Seed-1 CNN: ``forward(x: (N, in_channels, 32, 32)) -> (N, num_classes)`` logits (no softmax).

    ``head_activation`` (None, "elu", "relu", "softmax" or an ``nn.Module``) is applied after the dense
    layer; the seed-1 gate is this network with ``head_activation="elu"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 32,
        in_channels: int = 3,
        dropout: Sequence[float] = (0.2, 0.3, 0.4),
        head_activation: str | nn.Module | None = None,
    ):
        super().__init__()
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.width = check_positive_int("width", width)
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.dropout = _check_dropout(dropout)
        self.feature_dim = 4 * width * (IMAGE_SIZE // 8) ** 2  # 128 * 4 * 4 = 2048 for width 32
        self.trunk = seed1_trunk(width, in_channels, self.dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if head_activation is None or isinstance(head_activation, nn.Module):
            self.head_activation = head_activation
        elif isinstance(head_activation, str) and head_activation in HEAD_ACTIVATIONS:
            self.head_activation = HEAD_ACTIVATIONS[head_activation]()
        else:
            raise MoelabError(
                f"head_activation must be None, an nn.Module or one of {sorted(HEAD_ACTIVATIONS)}; "
                f"got {head_activation!r}"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, 32, 32) -> (N, feature_dim) flattened trunk output (channel-major, as Keras
        channels_first would flatten; the head is trained from scratch so the order is a convention)."""
        return self.trunk(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.features(x))
        return out if self.head_activation is None else self.head_activation(out)

    def l2_penalty(self, coef: float = L2_COEF) -> torch.Tensor:
        """``coef * sum(w**2)`` over the conv kernels (the Keras kernel regulariser)."""
        return conv_l2_penalty(self, coef)


def conv_l2_penalty(module: nn.Module, coef: float = L2_COEF) -> torch.Tensor:
    """``coef * sum(w**2)`` over the conv kernels (weights, not biases) in ``module``.

    Kernels are the weights of every ``nn.Conv2d`` plus whatever a submodule yields from a
    ``conv_kernels()`` method (e.g. the stacked kernels of :class:`moelab.reproductions.conv_experts.ConvExperts`).
    """
    kernels = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            kernels.append(m.weight)
        elif hasattr(m, "conv_kernels"):
            kernels.extend(m.conv_kernels())
    if not kernels:
        return torch.zeros(())
    return coef * sum(w.square().sum() for w in kernels)
