"""Config sections every family that has them spells the same way (:mod:`moelab.schema`), declared once.

``compute``: how a run computes, not what it learns: ``compute.threads`` (``torch.set_num_threads``; 0
keeps torch's default), ``compute.bf16`` (bf16 autocast: true | false | "auto" = where the device computes
bf16 natively, :func:`moelab.precision.resolve_bf16`) and, for the CNN families, ``compute.channels_last``.
``eval``: ``eval.batch_size``, the images per inference batch. A family gives its own defaults with
``field(default_factory=lambda: Compute(threads=1))`` (:func:`moelab.schema.defaults_of` reads them) or
extends a section with its own keys (a subclass).

Every minibatch size is ``batch_size`` (``train.batch_size``, ``experts.batch_size``, ...); the older
spellings (``threads``, ``train.bf16``, ``train.batch``, ...) are read for one release with a warning:
:data:`moelab.config.RENAMED_KEYS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from moelab.config import Int, Switch


@dataclass(frozen=True)
class Compute:
    """The ``compute`` section (``compute.threads``, ``compute.bf16``)."""

    threads: Annotated[int, Int(ge=0)] = 0  # torch.set_num_threads; 0 keeps torch's default
    bf16: Switch = Switch("false")  # bf16 autocast; "auto": where the device computes bf16 natively


@dataclass(frozen=True)
class ConvCompute(Compute):
    """The CNN families' ``compute`` section: also ``compute.channels_last``."""

    bf16: Switch = Switch("auto")
    channels_last: bool = True


@dataclass(frozen=True)
class Eval:
    """The ``eval`` section (``eval.batch_size``)."""

    batch_size: Annotated[int, Int(ge=1)] = 1000  # images per inference batch
