"""The ``cifar_moe`` family's networks: :class:`moelab.models.fast_cnn.FastCNN` with mixtures in some of its
blocks (``model.moe``: CondConv, expert blocks, token MoEs), or dense at a given width."""

from __future__ import annotations

from torch import Tensor, nn

from moelab.experiments.cifar_moe.config import Model
from moelab.experiments.router_recipe import loss_weights, recipe_options
from moelab.models.fast_cnn import BlockThen, ConvGroup, FastCNN, batch_norm
from moelab.moe import CondConv2d, ConvBlockExperts, MoE, TokenMoE2d
from moelab.moe.routers import resolve
from moelab.moe.routers.base import zero_gate


def block_widths(width: int) -> tuple[int, int, int]:
    return (max(1, width // 4), width, width)


def build_model(m: Model, width: int | None = None, dense: bool = False, aux_scale: float = 1.0,
                twin: bool = False, num_classes: int = 10) -> FastCNN:
    """The mixture of ``m`` (``dense=False``) or the dense FastCNN of block-3 width ``width``; ``twin=True``
    (``model.moe = "tokens"``): the mixture's dense twin, each token MoE one dense FFN of k x its hidden
    width, k the experts a token runs (``model.k``; 1 for switch): the same active FLOPs, router aside."""
    widths = block_widths(width or m.width)
    if dense or m.moe == "none":
        return FastCNN(widths, num_classes)
    blocks, e = set(m.moe_blocks), m.num_experts
    if m.moe == "condconv":
        def conv(name: str, c_in: int, c_out: int) -> nn.Module | None:
            if int(name[5]) not in blocks:  # "block{b}.conv{i}"
                return None
            cc = CondConv2d(c_in, c_out, 3, e, padding=1, bias=False, routing=m.routing, temperature=m.temperature)
            if m.router_init == "zeros":
                zero_gate("condconv", cc.routing_fn)
            return cc

        return FastCNN(widths, num_classes, conv_factory=conv)
    router_cls, options = resolve(m.router)[0], recipe_options(m)  # the router's options besides k
    weights = loss_weights(m.router, m, aux_scale)  # the router's defaults x aux_scale (no balance loss with bias)
    k = m.k if router_cls.takes_k else None
    if m.capacity_factor:
        options["capacity_factor"] = m.capacity_factor
    if m.moe == "tokens":
        k_active = k if k is not None else 1 if m.router == "switch" else e if m.router == "dense" else m.k  # per token

        def token_block(b: int, c_in: int, c_out: int) -> nn.Module | None:
            if b not in blocks:
                return None
            hidden = m.expert_hidden or 2 * c_out
            moe = TokenMoE2d(c_out, 1, k_active * hidden, router="dense", norm=batch_norm(c_out)) if twin else \
                TokenMoE2d(c_out, e, hidden, router=m.router, k=k, norm=batch_norm(c_out), aux_loss_weights=weights,
                           router_options=options or None)
            return BlockThen(ConvGroup(c_in, c_out), moe)

        return FastCNN(widths, num_classes, block_factory=token_block)

    def pooled_linear(c_in: int) -> nn.Sequential:  # (N, C, H, W) -> (N, E) logits
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, e, bias=False))

    def block(b: int, c_in: int, c_out: int) -> nn.Module | None:
        if b not in blocks:
            return None
        gate, block_options = pooled_linear(c_in), dict(options)
        for name in router_cls.extra_gates:  # noisy_topk's noise std: from the same pooled features, zero-initialised
            extra = pooled_linear(c_in)
            nn.init.zeros_(extra[-1].weight)
            block_options[name] = extra
        if m.expert_block == "resnet":
            experts = ConvBlockExperts(c_in, c_out, e, stride=2)
        else:  # E copies of the dense block it replaces (each run on exactly its images)
            experts = [ConvGroup(c_in, c_out) for _ in range(e)]
        return MoE(None, e, router=m.router, k=k, router_options=block_options, gate=gate, experts=experts,
                   aux_loss_weights=weights)

    return FastCNN(widths, num_classes, block_factory=block)


def condconv_routing(model: FastCNN) -> list[Tensor]:
    """The per-image routing weights (N, E) of each CondConv2d in the last forward (in order)."""
    return [m.last_routing for m in model.modules() if getattr(m, "last_routing", None) is not None]
