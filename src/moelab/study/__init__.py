"""``moelab study``: an experiment over a grid of settings and seeds, MoE against dense at equal cost.

    moelab study mnist-sparse --grid model.num_experts=4,8,16,32 --seeds 3 --out runs/e-sweep

Each cell x seed is an ordinary run directory; dense rows that coincide across cells are trained once
per seed (:class:`moelab.experiments.baselines.SharedRows`); ``study.csv`` / ``study.md`` / ``study.html``
hold the table and the accuracy-vs-cost plots (:mod:`moelab.study.report`).
"""

from moelab.study.run import run_study

__all__ = ["run_study"]
