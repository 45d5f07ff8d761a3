"""MoE CNNs on CIFAR-10 against the dense CNN of equal cost (``cifar10-moe``, issue #16).

The dense reference is :class:`moelab.models.fast_cnn.FastCNN` (airbench-style) trained with airbench's
recipe (:mod:`.recipe`: summed label-smoothed cross-entropy, Nesterov SGD with airbench's lr / wd
scaling, BN biases at ``bias_scaler`` x lr, a triangle schedule, flips and translations, flip +
translation TTA; no look-ahead averaging). ``model.moe`` puts a mixture in the blocks ``model.moe_blocks``:
``condconv`` (every 3x3 conv a :class:`moelab.moe.CondConv2d`) or ``blocks`` (each block a
:class:`moelab.MoE` of E expert blocks, every image routed to ``k`` of them by a linear gate on its
pooled features). Baselines in the same run, same recipe, every width counted (:mod:`moelab.cost`):
``dense-equal-flops``, ``dense-equal-params``, ``dense-equal-time`` (the equal-flops network given the
mixture's training time) and ``dense-reference``. All choices are made on ``data.val_size`` training
images held out (stratified); the test split is read once per model at the end. The design, the
recipe and the measured numbers: ``docs/results-cifar-moe.md``.
"""

from moelab.experiments.cifar_moe.config import (
    BLOCK_ROUTERS,
    DEFAULTS,
    MOES,
    RESUMABLE,
    RULES,
    Baselines,
    Config,
    Data,
    Eval,
    Model,
    Train,
    check_config,
)
from moelab.experiments.cifar_moe.experiment import run
from moelab.experiments.cifar_moe.model import block_widths, build_model
from moelab.experiments.cifar_moe.recipe import (
    class_probs,
    fit,
    lr_factor,
    make_optimizer,
    routing_parameters,
)

__all__ = ["BLOCK_ROUTERS", "DEFAULTS", "MOES", "RESUMABLE", "RULES", "Baselines", "Config", "Data", "Eval", "Model",
           "Train", "block_widths", "build_model", "check_config", "class_probs", "fit", "lr_factor", "make_optimizer",
           "routing_parameters", "run"]
