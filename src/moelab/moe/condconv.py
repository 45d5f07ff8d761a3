"""Conditionally parameterised convolution: one kernel per image, mixed from E expert kernels.

CondConv (Yang, Bender, Le & Ngiam 2019, "CondConv: Conditionally Parameterized Convolutions for
Efficient Inference", arXiv 1904.04971) with sigmoid routing; dynamic convolution (Chen et al. 2020,
"Dynamic Convolution: Attention over Convolution Kernels", arXiv 1912.03458) is the same layer with
softmax routing and a temperature (annealed from ~30 to 1 during training in that paper).

Shapes (N images, E experts, C = in_channels, O = out_channels, g = groups, K = kh * kw):

    pooled  = mean_{h,w} x               (N, C)
    r       = act(routing_fn(pooled) / T) (N, E)        act: sigmoid or softmax over E
    kernel  = r @ weight                 (N, O * C/g * K) -> (N*O, C/g, kh, kw)
    bias    = r @ bias                   (N, O)
    y       = conv2d(x.reshape(1, N*C, H, W), kernel, bias, groups=N*g).view(N, O, H', W')

so image n is convolved with ``sum_e r[n, e] * kernels[e]`` (plus ``sum_e r[n, e] * bias[e]``): one
matmul mixes the kernels and one grouped convolution runs every image with its own kernel (the
trick of the reference CondConv and timm implementations), no loop over images or experts.
As in timm, ``weight`` is stored flat, (E, O * C/g * kh * kw) (``kernels`` is the (E, O, C/g, kh, kw)
view): a 5-D parameter would make ``model.to(memory_format=torch.channels_last)`` fail.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.errors import MoelabError

__all__ = ["CondConv2d", "ROUTINGS"]

ROUTINGS = ("sigmoid", "softmax")


def _pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum -> (a, b); MoelabError naming ``name`` otherwise."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, tuple | list) else None
    if (pair is None or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in pair)):
        raise MoelabError(f"CondConv2d: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return pair


class CondConv2d(nn.Module):
    """``nn.Conv2d``-like layer whose kernel is a per-image mixture of ``num_experts`` expert kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``
            (``padding`` may be an int, a pair, ``"same"`` (stride 1 only) or ``"valid"``).
        num_experts: E expert kernels.
        routing: ``"sigmoid"`` (CondConv: independent weights in (0, 1)) or ``"softmax"`` (dynamic
            convolution: weights sum to 1).
        temperature: logits are divided by it (> 0); a plain attribute, so it can be annealed.
        dropout: dropout probability on the pooled features feeding the routing function (training only).

    Parameters: ``weight`` (E, O * C/g * kh * kw) (``kernels``: its (E, O, C/g, kh, kw) view), ``bias``
    (E, O) or None, ``routing_fn`` nn.Linear(C, E).
    ``last_routing``: the (N, E) routing weights of the latest forward, detached (None before the first).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], num_experts: int,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *,
                 routing: str = "sigmoid", temperature: float = 1.0, dropout: float = 0.0):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("num_experts", num_experts), ("groups", groups)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MoelabError(f"CondConv2d: {name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise MoelabError(f"CondConv2d: in_channels ({in_channels}) and out_channels ({out_channels}) must "
                              f"both be divisible by groups ({groups})")
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.dilation = _pair("dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise MoelabError(f"CondConv2d: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise MoelabError(f"CondConv2d: padding='same' needs stride 1, got stride={stride!r}")
            self.padding: tuple[int, int] | str = padding
        else:
            self.padding = _pair("padding", padding, 0)
        if routing not in ROUTINGS:
            raise MoelabError(f"CondConv2d: routing must be one of {', '.join(map(repr, ROUTINGS))}, got {routing!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise MoelabError(f"CondConv2d: dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.out_channels, self.num_experts, self.groups = in_channels, out_channels, \
            num_experts, groups
        self.routing = routing
        self.temperature = temperature
        self.dropout = float(dropout)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels * in_channels // groups
                                               * math.prod(self.kernel_size)))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        self.routing_fn = nn.Linear(in_channels, num_experts)
        self.last_routing: Tensor | None = None
        self.reset_parameters()

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise MoelabError(f"CondConv2d: temperature must be a finite number > 0, got {value!r}")
        self._temperature = float(value)

    @property
    def kernels(self) -> Tensor:
        """The expert kernels (E, O, C/g, kh, kw), a view of ``weight``."""
        return self.weight.view(self.num_experts, self.out_channels, -1, *self.kernel_size)

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init for each expert kernel and bias: kaiming_uniform_(a=sqrt(5)) is
        U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C/g * kh * kw, as is the bias; nn.Linear's default
        for the routing function."""
        bound = 1.0 / math.sqrt(self.weight.shape[1] // self.out_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self.routing_fn.reset_parameters()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding!r}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        s += f", routing={self.routing!r}, temperature={self.temperature:g}"
        return s + (f", dropout={self.dropout:g}" if self.dropout else "")

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise MoelabError(f"CondConv2d expected images of shape (N, {self.in_channels}, H, W), "
                              f"got {tuple(x.shape)}")

    def routing_weights(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> routing weights (N, E), float32 (float64 for float64 x)."""
        self._check(x)
        pooled = x.mean(dim=(2, 3))  # (N, C)
        if self.dropout:
            pooled = F.dropout(pooled, self.dropout, self.training)
        logits = self.routing_fn(pooled)  # (N, E), bf16 under autocast
        logits = (logits if logits.dtype == torch.float64 else logits.float()) / self.temperature
        return torch.sigmoid(logits) if self.routing == "sigmoid" else torch.softmax(logits, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> (N, O, H', W'); channels_last in gives channels_last out."""
        r = self.routing_weights(x)  # (N, E)
        self.last_routing = r.detach()
        n, c, h, w = x.shape
        o = self.out_channels
        if n == 0:  # no images (a grouped conv needs groups >= 1): nn.Conv2d's (0, O, H', W'), still attached
            return F.conv2d(x, self.kernels[0].to(x.dtype), None, self.stride, self.padding, self.dilation,
                            self.groups) + 0 * r.sum().to(x.dtype)
        kernel = r.to(self.weight.dtype) @ self.weight  # (N, O * C/g * kh * kw)
        kernel = kernel.view(n * o, c // self.groups, *self.kernel_size)  # (N*O, C/g, kh, kw)
        bias = None if self.bias is None else (r.to(self.bias.dtype) @ self.bias).view(n * o)  # (N*O,)
        y = F.conv2d(x.reshape(1, n * c, h, w), kernel, bias, self.stride, self.padding, self.dilation,
                     groups=n * self.groups)  # (1, N*O, H', W')
        y = y.view(n, o, *y.shape[2:])
        if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y
