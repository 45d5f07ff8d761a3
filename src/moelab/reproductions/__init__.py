"""The seed experiments' own pieces, built on the library (:mod:`moelab.moe`) and kept apart from it.

Seed 1 (CIFAR-10: ten CNN experts on class pairs, frozen, and a gating CNN, in Keras) needs parts no other
model uses; they live here, above ``moe/`` and ``models/``, and the library never imports them:

    routers.py        its combine rules as routers whose gate outputs weigh the experts un-normalised
                      (RawDenseRouter, RawTopKRouter, RawMultiGateRouter; SEED_ROUTERS: seed_standard,
                      seed_sparse, seed_two_gates, seed_two_gates_max)
    gating.py         its gate CNN (GateNet), gate kinds and learning rates, seed_moe / SeedCombine
    conv_experts.py   ConvExperts: the ten seed CNNs as one expert stack (E, N, classes)
    hierarchical.py   the two-level mixture of the class-pair experts (``cifar10-hierarchical``, ours)

The experiment families that run them are in :mod:`moelab.experiments` (``cifar10-experts`` and its
variants). Not to be confused with ``moelab run --seeds`` (random seeds, :mod:`moelab.experiments.seeds`).
"""
