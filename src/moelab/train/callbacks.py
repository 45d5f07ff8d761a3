"""Callbacks into training: every function in :data:`CALLBACKS` is called as ``cb(point, **info)`` at
these points of :meth:`moelab.train.trainer.Trainer.fit`, in this order per epoch (``epoch`` counts from 0):

``epoch_start`` (``run``, ``phase``, ``epoch``, ``model``), ``step`` (after each optimiser step of a minibatch
epoch: ``phase``, ``epoch``, ``step``), ``train_end`` (the epoch's training done: ``phase``, ``epoch``),
``evaluate`` (before the validation pass: ``phase``, ``epoch``), ``epoch_end`` (after the epoch's
checkpoint: ``phase``, ``epoch``, ``row``); and ``checkpoint_write`` from
:func:`moelab.train.checkpoint.save_checkpoint` (``tmp``, the temp file written but not yet renamed,
and ``meta``, the checkpoint's metadata).

moelab itself registers none: the tests do (``tests/killhook.py`` kills a run at an exact moment).
"""

from __future__ import annotations

from collections.abc import Callable

CALLBACKS: list[Callable[..., None]] = []


def fire(point: str, **info) -> None:
    for cb in CALLBACKS:
        cb(point, **info)
