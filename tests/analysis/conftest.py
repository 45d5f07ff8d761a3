"""Synthetic run directories (the layout `moelab run` writes), built without training."""

import json

import pytest
import torch

from moelab.config import dumps_toml
from moelab.train.checkpoint import save_checkpoint


def _make_run(path, seed=0, *, lr=0.1, n=240, classes=4, experts=3, finished=True, expert_probs=False):
    """A finished two-model run (mixture `moe` with gates, baseline `single`) in ``path``."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    cfg = {"family": "jacobs", "description": "synthetic", "train": {"epochs": 3, "lr": lr},
           "run": {"name": "synth", "seed": seed}}
    (path / "config.toml").write_text(dumps_toml(cfg))
    rows = [{"phase": p, "epoch": e, "loss": 1.0 / e + 0.01 * seed, "val_accuracy": 0.5 + 0.1 * e}
            for p in ("moe", "single") for e in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = torch.arange(n) % classes
    logits = torch.randn(n, classes, generator=g) + 2.5 * torch.nn.functional.one_hot(labels, classes)
    probs = logits.softmax(1)
    # class c is mostly routed to expert c % experts
    gate_logits = torch.randn(n, experts, generator=g) + 3 * torch.nn.functional.one_hot(labels % experts, experts)
    tensors = {"labels": labels, "probs": probs, "gates": gate_logits.softmax(1)}
    if expert_probs:
        tensors["expert_probs"] = torch.randn(experts, n, classes, generator=g).softmax(2)
    save_checkpoint(path / "eval" / "moe.safetensors", tensors, {"model": "moe", "classes": list("abcd")[:classes]})
    save_checkpoint(path / "eval" / "single.safetensors", {"labels": labels, "probs": probs.roll(1, 0)},
                    {"model": "single", "classes": []})
    if finished:
        accs = {m: float((p.argmax(1) == labels).float().mean()) for m, p in
                (("moe", probs), ("single", probs.roll(1, 0)))}
        summary = {"test_accuracy": accs["moe"], "models": {m: {"test_accuracy": a} for m, a in accs.items()},
                   "wall_time_s": 1.5 + seed, "name": "synth", "family": "jacobs", "seed": seed}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def make_run():
    """``make_run(path, seed=0, *, lr=0.1, finished=True, expert_probs=False, ...)`` -> path."""
    return _make_run


@pytest.fixture
def synth_run(tmp_path):
    return _make_run(tmp_path / "run")


@pytest.fixture(scope="session")
def reported_run(tmp_path_factory):
    """A synthetic run with its report written (shared by the tests: plotting is slow)."""
    from moelab.analysis.report import write_report

    run = _make_run(tmp_path_factory.mktemp("reported") / "run")
    write_report(run)
    return run
