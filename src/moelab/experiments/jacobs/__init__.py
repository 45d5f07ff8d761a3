"""Seed experiment 2: a mixture of MLP experts with a softmax gate (Jacobs et al. 1991) on MNIST 14x14.

Two modes (``mode``):

``faithful`` (``mnist-jacobs-faithful``)
    The seed's NumPy script, exactly: MNIST 28x28 -> 14x14 by ``scipy.ndimage.zoom(img, 0.5, order=3)``
    (uint8, as the seed's uint8 images give), the seed's scaling over the whole data set
    (``x += x.min(); x /= x.max()``; the ``+=`` is the seed's, harmless because the minimum is 0),
    a bias column of ones; ten 196-25-10 sigmoid experts and a 196-25 sigmoid -> 10 softmax gate with
    weights uniform in [-0.5, 0.5); Jacobs' competitive loss ``0.5 * sum_i g_i ||y - o_i||^2`` (mean over
    examples), output ``sum_i g_i o_i``; full-batch gradient descent, learning rate 10, 3000 epochs.
    Baseline: one 196-25-10 sigmoid MLP, ``0.5 * sum (o - y)^2 / N``, full-batch GD, lr 10, 2000 epochs.
    The gradient is the seed's ``gradient_ME``, whose gate part is twice the gradient of its loss
    (``faithful.gate_grad_scale = 2.0``; 1.0 gives true gradient descent; see
    :mod:`moelab.models.mlp_mixture`), computed by hand in blocks (``faithful.chunk``) split over
    ``faithful.workers`` threads: the 3000 + 2000 full-batch epochs take about 6 minutes on 2 cores.
    Lead shares on the training split are logged every ``faithful.log_every`` epochs.

    Protocol: trained on the train split, evaluated on the test split. The seed's MoE loop trains on
    ``data_test`` (its 10000-image test split) and reports the error on that same split; set
    ``seed_protocol.train_on_test = true`` to do that (the baseline still trains on the train split, as in
    the seed) and the summary then also gives the MoE's error on the 60000 train images it never saw.
    ``seed_protocol.shuffle_split = true`` replaces the canonical 60000/10000 split by the seed's random
    split of all 70000 images.

``modern`` (``mnist-jacobs``, ``digits-jacobs``)
    The same parameter budget (E experts in-hidden-classes and an in-gate_hidden-E gate) trained the
    modern way: minibatches, AdamW or SGD with a one-cycle/cosine schedule, a mixture loss
    (``mixture_ce``: ``-log sum_i g_i softmax(z_i)[y]``; ``jacobs_loglik``; ``logit_mixture_ce``:
    cross-entropy of ``sum_i g_i z_i``; ``competitive``), label smoothing, an optional gate balance loss,
    random translations of the original images before the seed's zoom (:class:`Augment`), optional bf16
    autocast. The single-network baseline (one in-hidden-classes MLP) is trained the same way with
    cross-entropy. ``mnist-jacobs`` reaches about 1.8% test error against 3.6% for the single network
    (11x smaller) and 1.2% for the dense network of equal parameters and FLOPs (docs/results-jacobs.md).

Both train the mixture (phase ``moe``), the single network (phase ``single``: one expert's size, labelled
as the smaller network in its row) and, with ``baselines.equal_cost`` (default), the equal-cost baselines
``dense-equal-params`` / ``dense-equal-flops`` (:func:`equal_cost_rows`: one dense MLP of the single
network's kind and recipe, widened to the mixture's counted parameters / counted inference FLOPs; the
dense gate runs every expert, so both widths coincide and that network is trained once), and report
all under ``models`` with ``params``, ``flops_per_example`` and ``train_time_s``, with the mixture's lead share per expert (the fraction of test examples whose largest gate is
that expert: the seed's "% of examples where an expert was chosen as the lead") and the class x expert
lead-count matrix.
"""

from moelab.experiments.jacobs.config import (
    BALANCES,
    DEFAULTS,
    LOSSES,
    RESUMABLE,
    RULES,
    Baselines,
    Config,
    Faithful,
    Model,
    SeedProtocol,
    Train,
    check_config,
)
from moelab.experiments.jacobs.experiment import run
from moelab.experiments.jacobs.modern import balance_loss, mixture_loss

__all__ = ["BALANCES", "DEFAULTS", "LOSSES", "RESUMABLE", "RULES", "Baselines", "Config", "Faithful", "Model",
           "SeedProtocol", "Train", "balance_loss", "check_config", "mixture_loss", "run"]
