"""Test-set predictions saved beside a run, so analysis never needs to re-run a model.

``RUN_DIR/eval/<model>.safetensors`` holds, for the test split:
``labels`` (N,) int64, ``probs`` (N, C) float32 class probabilities and, for mixtures,
``gates`` (N, E) float32 combine weights and, for a task with latent classes (:mod:`moelab.data.tasks`),
``latent`` (N,) int64. Routing statistics (lead share, class x
expert matrix, ...) are derived from these by ``moelab.analysis``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moelab.train.checkpoint import load_checkpoint, save_checkpoint
from moelab.train.run import Run


def eval_path(run_dir: str | Path, model_name: str) -> Path:
    return Path(run_dir) / "eval" / f"{model_name}.safetensors"


def save_eval(
    run: Run,
    model_name: str,
    labels: torch.Tensor,
    probs: torch.Tensor,
    gates: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    latent: torch.Tensor | None = None,
) -> None:
    """``eval/<model>.safetensors``: test labels, probabilities, gates and a task's latent classes (if any)."""
    if not run.is_main:
        return
    tensors = {"labels": labels.long(), "probs": probs.float()}
    if gates is not None:
        tensors["gates"] = gates.float()
    if latent is not None:
        tensors["latent"] = latent.long()
    save_checkpoint(eval_path(run.dir, model_name), tensors, {"model": model_name, "classes": class_names or []})


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (a fraction) of (N, C) scores against (N,) labels."""
    return float((scores.argmax(1) == labels).float().mean())


def error_pct(probs: torch.Tensor, labels: torch.Tensor, digits: int = 4) -> float:
    """Top-1 error in percent of (N, C) scores against (N,) labels, rounded to ``digits``."""
    return round(100 * float((probs.argmax(1) != labels).float().mean()), digits)


def load_eval(run_dir: str | Path, model_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_checkpoint(eval_path(run_dir, model_name))


def routing_stats(labels: torch.Tensor, gates: torch.Tensor, num_classes: int) -> dict:
    """Lead share per expert (fraction of examples where it has the largest gate), mean gate weight,
    and the class x expert matrix of lead counts."""
    lead = gates.argmax(dim=1)  # (N,)
    num_experts = gates.shape[1]
    lead_share = torch.bincount(lead, minlength=num_experts).float() / max(len(lead), 1)
    matrix = torch.zeros(num_classes, num_experts, dtype=torch.long)
    matrix.index_put_((labels.long(), lead), torch.ones_like(lead), accumulate=True)
    return {
        "lead_share": lead_share.tolist(),
        "mean_gate": gates.float().mean(0).tolist(),
        "class_expert_matrix": matrix.tolist(),
    }
