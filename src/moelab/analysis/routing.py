"""Statistics of a model's test predictions: accuracy, confusion, and for mixtures how they route.

Inputs are the tensors of ``eval/<model>.safetensors``: ``labels`` (N,), ``probs`` (N, C),
``gates`` (N, E) and optionally ``expert_probs`` (E, N, C). The expert an example is *routed to*
is the one with the largest gate (its lead expert). Entropies are in bits.
"""

from __future__ import annotations

import math

import torch


def confusion_matrix(labels: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    c = probs.shape[1]
    pred = probs.argmax(1)
    m = torch.zeros(c, c, dtype=torch.long)
    m.index_put_((labels.long(), pred), torch.ones_like(pred), accumulate=True)
    return m


def entropy_bits(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in bits along ``dim`` (0 log 0 = 0); ``p`` need not be normalised."""
    p = p.double().clamp_min(0)
    p = p / p.sum(dim, keepdim=True).clamp_min(1e-300)
    return -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(dim)


def mutual_information(joint: torch.Tensor) -> float:
    """I(X; Y) in bits of a joint count (or probability) matrix."""
    p = joint.double()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    px, py = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    ratio = torch.where(p > 0, p / (px * py), torch.ones_like(p))
    return max(float((p * torch.log2(ratio)).sum()), 0.0)


def label_expert_counts(labels: torch.Tensor, gates_or_lead: torch.Tensor, num_labels: int,
                        num_experts: int | None = None) -> torch.Tensor:
    """(L, E) counts of examples of label l led by expert e; ``gates_or_lead``: gates (N, E) (the lead expert is
    the argmax) or the lead experts' indices (N,) (then E = ``num_experts``, else the largest index + 1)."""
    if gates_or_lead.dim() == 2:
        lead, e = gates_or_lead.argmax(1), gates_or_lead.shape[1]
    else:
        lead = gates_or_lead.long()
        e = num_experts or (int(lead.max()) + 1 if len(lead) else 1)
    joint = torch.zeros(num_labels, e, dtype=torch.long)
    joint.index_put_((labels.long().cpu(), lead.cpu()), torch.ones(len(lead), dtype=torch.long), accumulate=True)
    return joint


def joint_info_ratio(joint: torch.Tensor) -> float:
    """I(row; column) / H(row) of a (label, expert) count matrix, in [0, 1]; 0 when H(row) = 0."""
    h = float(entropy_bits(joint.sum(1).double()))
    return min(mutual_information(joint) / h, 1.0) if h > 0 else 0.0


def info_ratio(labels: torch.Tensor, gates_or_lead: torch.Tensor, num_labels: int,
               num_experts: int | None = None) -> float:
    """I(label; lead expert) / H(label) in [0, 1]: how much of the label the routing alone tells (1: each label
    has experts of its own; 0: routing independent of it, or a single label). With the latent labels of a task
    (:mod:`moelab.data.tasks`) it measures whether a mixture splits the data by the hidden clusters."""
    return joint_info_ratio(label_expert_counts(labels, gates_or_lead, num_labels, num_experts))


def latent_routing(latent: torch.Tensor | None, gates: torch.Tensor | None, num_latent: int) -> dict:
    """A model row's latent routing fields (empty without latent labels or gates): ``latent_expert_info`` =
    I(latent class; lead expert) / H(latent class) and ``latent_expert_matrix``, the (latent class, expert) counts."""
    if latent is None or gates is None:
        return {}
    joint = label_expert_counts(latent, gates, num_latent)
    return {"latent_expert_info": round(joint_info_ratio(joint), 4), "latent_expert_matrix": joint.tolist()}


def model_stats(labels: torch.Tensor, probs: torch.Tensor) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of one model."""
    labels = labels.long()
    conf = confusion_matrix(labels, probs)
    support = conf.sum(1)
    per_class = torch.where(support > 0, conf.diagonal().double() / support.clamp_min(1), torch.nan)
    n = len(labels)
    return {
        "n": n,
        "num_classes": probs.shape[1],
        "accuracy": float(conf.diagonal().sum()) / n if n else math.nan,
        "per_class_accuracy": per_class.tolist(),
        "confusion": conf.tolist(),
    }


def routing_analysis(
    labels: torch.Tensor, probs: torch.Tensor, gates: torch.Tensor, expert_probs: torch.Tensor | None = None
) -> dict:
    """How a mixture routes the test set.

    - ``mean_gate`` / ``lead_share``: per expert, its mean gate weight / the fraction of examples it leads;
    - ``class_expert``: (C, E) counts of class c led by expert e (the routing heat map);
    - ``gate_entropy_bits``: mean per-example gate entropy (0 = hard routing; ``max_entropy_bits`` = uniform);
      ``usage_entropy_bits``: entropy of the lead shares (how evenly experts are used);
    - ``expert_accuracy``: per expert, accuracy on the examples it leads: of the expert's own
      prediction if ``expert_probs`` is given (``expert_accuracy_of = "expert"``), else of the mixture
      (``"mixture"``); NaN for an expert that leads no example;
    - ``mi_bits`` = I(class; lead expert), ``specialisation`` = mi_bits / H(class) in [0, 1].
    """
    labels = labels.long()
    n, e = gates.shape
    c = probs.shape[1]
    lead = gates.argmax(1)
    counts = torch.bincount(lead, minlength=e)
    joint = torch.zeros(c, e, dtype=torch.long)
    joint.index_put_((labels, lead), torch.ones_like(lead), accumulate=True)
    if expert_probs is not None:
        correct = expert_probs.argmax(2)[lead, torch.arange(n)] == labels
        source = "expert"
    else:
        correct = probs.argmax(1) == labels
        source = "mixture"
    hits = torch.zeros(e, dtype=torch.long).index_add_(0, lead, correct.long())
    acc = torch.where(counts > 0, hits.double() / counts.clamp_min(1), torch.nan)
    h_class = float(entropy_bits(joint.sum(1).double()))
    mi = mutual_information(joint)
    return {
        "num_experts": e,
        "mean_gate": gates.double().mean(0).tolist() if n else [math.nan] * e,
        "lead_share": (counts.double() / max(n, 1)).tolist(),
        "lead_count": counts.tolist(),
        "class_expert": joint.tolist(),
        "gate_entropy_bits": float(entropy_bits(gates).mean()) if n else math.nan,
        "max_entropy_bits": math.log2(e) if e else 0.0,
        "usage_entropy_bits": float(entropy_bits(counts.double())) if n else math.nan,
        "expert_accuracy": acc.tolist(),
        "expert_accuracy_of": source,
        "mi_bits": mi,
        "class_entropy_bits": h_class,
        "specialisation": mi / h_class if h_class > 0 else 0.0,
    }


def analyse_eval(tensors: dict[str, torch.Tensor]) -> dict:
    """``model_stats`` plus, when gates are present, ``routing`` (see :func:`routing_analysis`; with the
    task's ``latent`` labels also ``latent_specialisation``, :func:`info_ratio`)."""
    out = model_stats(tensors["labels"], tensors["probs"])
    if "gates" in tensors:
        out["routing"] = routing_analysis(
            tensors["labels"], tensors["probs"], tensors["gates"], tensors.get("expert_probs")
        )
        if "latent" in tensors:  # a task's latent classes (save_eval's ``latent``): I(latent; expert) / H
            latent = tensors["latent"].long()
            out["routing"]["latent_specialisation"] = info_ratio(latent, tensors["gates"], int(latent.max()) + 1)
    return out
