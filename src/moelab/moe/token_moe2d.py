"""A residual MoE over the positions of a feature map: every pixel is a token, routed on its own.

V-MoE (Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts", arXiv 2106.05974) routes
each image patch to its own experts; pMoE (Chowdhury et al. 2023, "Patch-level Routing in
Mixture-of-Experts is Provably Sample-Efficient for Convolutional Neural Networks", arXiv 2306.04073)
does so inside CNNs. Per-position routing gives every expert H*W times more training rows than
per-image routing (each image sends its positions to different experts), which is what lets the
extra parameters pay at the same compute: an expert is a pointwise MLP (a 1x1-conv FFN), run only on
the positions routed to it, through :class:`moelab.MoE`'s sparse path (sort -> gather -> grouped
GEMMs -> weighted combine).

Shapes (N images, C channels, H x W positions, T = N*H*W tokens, E experts, k per token)::

    x       (N, C, H, W)
    tokens  (T, C)        x.permute(0, 2, 3, 1) (free under channels_last)
    moe     (T, C)        sum_j g[t, j] * expert_{i[t, j]}(tokens[t]),  expert: C -> hidden -> C, GELU
    y       (N, C, H, W)  x + norm(moe)          norm: BatchNorm2d by default (``norm=`` replaces it)

``forward(x) -> (y, aux)`` like :class:`moelab.MoE` (``aux.gates`` is per token, (T, E)). With
``num_experts=1`` and ``k=1`` it is the dense FFN of the same active FLOPs: the equal-compute
twin of a top-k layer with hidden width ``k * hidden_dim``.
"""

from __future__ import annotations

from torch import Tensor, nn

from moelab.errors import MoelabError
from moelab.moe.layer import MoE, MoEAux

__all__ = ["TokenMoE2d"]


class TokenMoE2d(nn.Module):
    """``y = x + norm(MoE(x at each position))`` on (N, C, H, W); see the module docstring.

    Args:
        channels: C.
        num_experts, hidden_dim, router, k: as :class:`moelab.MoE` (experts are GELU MLPs C -> hidden -> C).
        norm: module applied to the MoE output before the residual sum (default ``nn.BatchNorm2d(C)``;
            ``nn.Identity()`` for none).
        **moe_kwargs: further :class:`moelab.MoE` options (``router_options``, ``aux_loss_weights``, ``experts``
            for other experts than GELU MLPs with bias, ...).
    """

    def __init__(self, channels: int, num_experts: int, hidden_dim: int, router: str = "topk", k: int | None = None,
                 norm: nn.Module | None = None, **moe_kwargs):
        super().__init__()
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise MoelabError(f"TokenMoE2d: channels must be a positive int, got {channels!r}")
        self.channels = channels
        self.moe = MoE(channels, num_experts, hidden_dim, router=router, k=k, **moe_kwargs)
        self.norm = nn.BatchNorm2d(channels) if norm is None else norm

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise MoelabError(f"TokenMoE2d expected input (N, {self.channels}, H, W), got {tuple(x.shape)}")
        tokens = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        y, aux = self.moe(tokens)  # (N, H, W, C)
        return x + self.norm(y.permute(0, 3, 1, 2)), aux
