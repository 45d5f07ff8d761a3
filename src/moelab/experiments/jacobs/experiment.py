"""The jacobs family's entry: the data, then the faithful or the modern mode (see :mod:`moelab.experiments.jacobs`)."""

from __future__ import annotations

import time

import torch

from moelab.experiments import family
from moelab.experiments.digits import load_data
from moelab.experiments.jacobs.config import RESUMABLE, Config, check_config
from moelab.experiments.jacobs.faithful import run_faithful
from moelab.experiments.jacobs.modern import run_modern
from moelab.parallel import ddp
from moelab.train.run import Run


@family("jacobs", check=check_config, resumable=RESUMABLE, schema=Config)
def run(c: Config, run_ctx: Run) -> dict:
    if c.mode == "faithful":
        ddp.require_single_process(f"{run_ctx.name} (mode = \"faithful\": full-batch gradient descent)")
    t0 = time.perf_counter()
    data = load_data(c.data, run_ctx.seed, run_ctx.data_dir, shuffle_split=c.seed_protocol.shuffle_split,
                     batch_size=c.train.batch_size if c.mode == "modern" else None)
    for note in data["notes"]:
        run_ctx.log(note)
    run_ctx.log(f"data: {data['dataset']} {data['shape'][0]}x{data['shape'][1]}, "
                f"{len(data['train_y'])} train / {len(data['test_y'])} test images "
                f"({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}")
    out = run_faithful(c, run_ctx, data) if c.mode == "faithful" else run_modern(c, run_ctx, data)
    if c.data.folder:
        out.setdefault("protocol", {})["dataset"] = data["dataset"]
    return out
