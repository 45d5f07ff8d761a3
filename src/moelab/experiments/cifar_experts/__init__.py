"""Seed experiment 1: ten CNN experts pretrained on pairs of similar CIFAR-10 classes, frozen, and a
CNN gate trained on top (four gating variants of the seed + ``expert-aware``), with baselines.

Pipeline (one ``moelab run cifar10-experts``):

0. Warm start (``cifar10-experts-warm``: ``experts.init`` / ``gate.init = "generalist"``): one CNN of
   the expert architecture is trained on all classes first (phase ``generalist``, cached by content);
   each expert then starts as a copy of it and is trained on its pair only (a specialist), and the
   gate's trunk starts from its trunk. ``baseline.epochs = 0`` gives the single-CNN baseline the
   mixture's whole measured training budget (``timings.mixture_budget_s``: generalist + experts +
   expert outputs + gate, cached phases at the time they took), converted to epochs at the
   generalist's measured speed: the comparison at equal wall-clock.
1. Data: CIFAR-10, ``data.val_size`` validation images carved from train (stratified).
2. Experts (phase ``expert<i>``): each a :class:`Seed1CNN` trained on its pair's images only (10-way
   softmax head, as in the seed), random shift + horizontal flip, Adam, learning rate halved on a
   validation plateau, early stopping, best checkpoint by validation accuracy. The ten trained experts
   are stacked into one :class:`ConvExperts` and cached by content (expert config + data checksum +
   seed) as ``<cache>/experts/<key>.safetensors``; a later run with the same key reuses them.
3. Expert outputs (softmax probabilities + pooled trunk features) for the plain and the flipped
   training images, the validation and the test images are computed once (bf16, channels_last) and
   cached too (``<cache>/expert-outputs/<key>.safetensors``): the gate phase never runs an expert.
4. Gate (phase ``gate``): the experts are frozen, so a gate step is one gate forward/backward. The
   gate sees a randomly flipped (and, with ``gate.shift``, shifted) image; the experts' outputs are
   the cached ones of the same image flipped the same way but not shifted (a shift moves an object
   by at most 3 pixels; it regularises the gate without running the experts).
   ``gate.kind = "hierarchical"`` (``cifar10-hierarchical``) trains no gate: the generalist's class
   probabilities weigh the experts by their pairs' mass and each expert decides within its pair
   (:func:`moelab.reproductions.hierarchical.combine_hierarchical`), so only the val/test outputs are computed.
5. Optional joint fine-tuning of experts + gate (``gate.finetune_epochs``).
6. Baselines (``baselines = true``): the uniform average of the experts (always reported: it is
   free), the gate trunk alone as a 10-way classifier (gate recipe), one CNN of the expert
   architecture trained on all ten classes (``baseline.*``).

``summary.json`` ``models``: every trained model's test accuracy, each expert's accuracy on its own
pair's test images, and the oracle-pair upper bound (each image routed to the experts of its class).
"""

from moelab.experiments.cifar_experts.config import (
    DEFAULTS,
    RESUMABLE,
    RULES,
    SEED_PAIRS,
    Config,
    check_config,
)
from moelab.experiments.cifar_experts.experiment import Pipeline, run_cifar_experts

__all__ = ["Config", "DEFAULTS", "RESUMABLE", "RULES", "SEED_PAIRS", "Pipeline", "check_config", "run_cifar_experts"]
