"""Top-1 accuracy and error from scores."""

import pytest
import torch

from moelab.train.evaluation import accuracy, error_pct


def test_accuracy_and_error_agree_with_a_hand_count():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = torch.tensor([1, 0, 0, 1])  # right, right, wrong, wrong
    assert accuracy(scores, labels) == pytest.approx(0.5)
    assert error_pct(scores, labels) == 50.0
    assert error_pct(scores[:3], labels[:3], 2) == 33.33
