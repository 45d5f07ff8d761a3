"""Shared helpers for the MoE core tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    """Import into a test module to seed every test (``from tests.moe.moe_helpers import seeded``)."""
    torch.manual_seed(0)
    yield


def assert_close(a, b, tol=1e-5, msg=""):
    """max |a - b| <= tol * max(1, max |b|), with a shape check."""
    assert a.shape == b.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"{msg}: max abs err {err:.3e} > {tol:.1e} * {scale:.3g}"
