"""The ``sparse_mlp`` family's networks: the mixture of :class:`moelab.models.mlp_mixture.SparseMoEMLP` and its
dense twin of a given FFN width."""

from __future__ import annotations

from moelab.experiments.router_recipe import loss_weights, recipe_options
from moelab.experiments.sparse_mlp.config import Model
from moelab.models.mlp_mixture import SparseMoEMLP


def build_model(m: Model, in_dim: int, num_classes: int, hidden: int | None = None, dense: bool = False,
                aux_scale: float = 1.0) -> SparseMoEMLP:
    """The mixture (``dense=False``) or the dense network with FFN width ``hidden``."""
    if dense:
        return SparseMoEMLP(in_dim, m.dim, hidden or m.hidden, num_classes, m.depth, 0,
                            activation=m.activation, arch=m.arch)
    router = m.router
    opts = {"normalize": m.normalize} if router == "topk" else {}
    return SparseMoEMLP(in_dim, m.dim, m.hidden, num_classes, m.depth, m.num_experts, router,
                        k=m.k, capacity_factor=m.capacity_factor or None,
                        aux_loss_weights=loss_weights(router, m, aux_scale), moe_layers=m.moe_layers,
                        activation=m.activation, arch=m.arch, router_options={**opts, **recipe_options(m)} or None)
