"""Sparse MoE MLPs on MNIST 14x14 against dense networks of equal cost (``mnist-sparse``).

The network (:class:`moelab.models.mlp_mixture.SparseMoEMLP`) is a residual MLP on the flat 14x14 image,
``Linear(196, dim) -> [z + FFN(LayerNorm(z))] x depth -> LayerNorm -> Linear(dim, 10)``, whose FFN is a
:class:`moelab.MoE` layer: E ``dim-hidden-dim`` GELU experts, each example routed to k of them by the router
``model.router`` (``topk``, ``noisy_topk``, ``switch``, ``expert_choice``, ``soft``; ``model.k``,
``model.capacity_factor``; ``dense``: the per-sample soft mixture, every expert weighted by a softmax). The
router's own auxiliary losses (its default weights times ``train.aux_scale``) are added to the cross-entropy.
The router recipe (:mod:`moelab.experiments.router_recipe`): ``model.router_init``, ``model.router_noise``,
``model.balance`` / ``model.bias_rate`` and ``train.routing_lr_scale``.

Baselines, trained in the same run with exactly the same recipe (optimizer, schedule, epochs, batch size,
augmentation, label smoothing; ``baselines.equal_cost = false`` skips them):

``dense-equal-flops``
    the same network with a dense FFN whose hidden width makes its counted inference FLOPs per example
    (:func:`moelab.cost.flops_per_example`, FlopCounterMode) closest to the mixture's counted *active*
    FLOPs, router included;
``dense-equal-params``
    the same network with a dense FFN whose width makes its parameter count closest to the mixture's
    total (all E experts).

Data: the seed's 14x14 MNIST (``data.resize = "seed_half"``), standardised, random +-1 px shifts of the
28x28 image before the zoom (:class:`moelab.data.augment.Augment`; optional random rotation and zoom,
``train.rotate`` / ``train.scale``), and ``data.val_size`` training images held out (stratified) as a validation split: every design choice was
made on it; the summary reports validation and test error of the last epoch.
"""

from moelab.experiments.sparse_mlp.config import (
    DEFAULTS,
    RESUMABLE,
    ROUTERS,
    RULES,
    Baselines,
    Config,
    Data,
    Model,
    Train,
    check_config,
)
from moelab.experiments.sparse_mlp.experiment import run
from moelab.experiments.sparse_mlp.model import build_model

__all__ = ["DEFAULTS", "RESUMABLE", "ROUTERS", "RULES", "Baselines", "Config", "Data", "Model", "Train", "build_model",
           "check_config", "run"]
