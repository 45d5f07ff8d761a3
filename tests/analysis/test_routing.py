"""Routing statistics on hand-made gates where the answer is known."""

import math

import pytest
import torch

from moelab.analysis.routing import (
    analyse_eval,
    confusion_matrix,
    entropy_bits,
    mutual_information,
    routing_analysis,
)


def test_perfect_specialisation():
    labels = torch.arange(40) % 4
    gates = torch.nn.functional.one_hot(labels, 4).float()  # class c -> expert c, hard routing
    probs = torch.nn.functional.one_hot(labels, 4).float()
    r = routing_analysis(labels, probs, gates)
    assert r["mi_bits"] == pytest.approx(2.0) and r["class_entropy_bits"] == pytest.approx(2.0)
    assert r["specialisation"] == pytest.approx(1.0)
    assert r["gate_entropy_bits"] == pytest.approx(0.0)
    assert r["usage_entropy_bits"] == pytest.approx(2.0) == r["max_entropy_bits"]
    assert r["lead_share"] == [0.25] * 4 and r["mean_gate"] == [0.25] * 4
    assert r["class_expert"] == [[10 if i == j else 0 for j in range(4)] for i in range(4)]
    assert r["expert_accuracy"] == [1.0] * 4 and r["expert_accuracy_of"] == "mixture"


def test_no_specialisation_and_uniform_gates():
    labels = torch.arange(60) % 3
    gates = torch.zeros(60, 2)
    gates[torch.arange(60) // 30 == 0, 0] = 1  # first half -> expert 0, whatever the class
    gates[torch.arange(60) // 30 == 1, 1] = 1
    r = routing_analysis(labels, torch.ones(60, 3) / 3, gates)
    assert r["mi_bits"] == pytest.approx(0.0, abs=1e-12) and r["specialisation"] == pytest.approx(0.0, abs=1e-12)
    uniform = routing_analysis(labels, torch.ones(60, 3) / 3, torch.full((60, 4), 0.25))
    assert uniform["gate_entropy_bits"] == pytest.approx(2.0)


def test_expert_accuracy_uses_expert_probs_when_present():
    labels = torch.tensor([0, 0, 1, 1])
    gates = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    mixture = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [1.0, 0]])  # 3 of 4 right
    experts = torch.zeros(2, 4, 2)
    experts[0, :, 0] = 1  # expert 0 always says class 0: right on its examples (0, 1)
    experts[1, :, 0] = 1  # expert 1 always says class 0: wrong on its examples (2, 3)
    r = routing_analysis(labels, mixture, gates)
    assert r["expert_accuracy"] == [1.0, 0.5]
    r = routing_analysis(labels, mixture, gates, experts)
    assert r["expert_accuracy"] == [1.0, 0.0] and r["expert_accuracy_of"] == "expert"


def test_idle_expert_has_nan_accuracy():
    labels = torch.tensor([0, 1])
    r = routing_analysis(labels, torch.eye(2), torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0]]))
    assert r["lead_count"] == [2, 0, 0] and math.isnan(r["expert_accuracy"][1])


def test_confusion_and_model_stats():
    labels = torch.tensor([0, 0, 1, 2])
    probs = torch.eye(3)[[0, 1, 1, 0]]
    assert confusion_matrix(labels, probs).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    st = analyse_eval({"labels": labels, "probs": probs})
    assert st["accuracy"] == 0.5 and st["per_class_accuracy"] == [0.5, 1.0, 0.0] and "routing" not in st


def test_entropy_and_mi_helpers():
    assert float(entropy_bits(torch.tensor([0.5, 0.5, 0.0]))) == pytest.approx(1.0)
    assert mutual_information(torch.zeros(2, 2)) == 0.0
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)
