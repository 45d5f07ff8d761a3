"""The MLP families' optimiser and schedule factories (moelab.train.optim)."""

import dataclasses
import math

import pytest
import torch

from moelab.train.optim import Optim, lr_multiplier, make_optimizer, make_schedule


def test_onecycle_warms_up_linearly_then_cosine_to_zero():
    total, frac = 100, 0.1  # 10 warm-up steps
    assert [lr_multiplier("onecycle", s, total, frac) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_multiplier("onecycle", 10, total, frac) == pytest.approx(1.0)
    assert lr_multiplier("onecycle", 55, total, frac) == pytest.approx(0.5)
    assert lr_multiplier("onecycle", 100, total, frac) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier("cosine", 50, total, frac) == pytest.approx(0.5)
    assert lr_multiplier("constant", 99, total, frac) == 1.0


def test_factories_build_the_configured_optimiser_and_a_resumable_schedule():
    p = [torch.nn.Parameter(torch.zeros(3))]
    t = Optim(optimizer="sgd", weight_decay=0.01, momentum=0.9, schedule="onecycle", warmup_frac=0.5)
    opt = make_optimizer(t, p, 0.2)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    sched = make_schedule(t, opt, 4)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.2, 0.2 * 0.5 * (1 + math.cos(math.pi / 2))])
    assert isinstance(make_optimizer(dataclasses.replace(t, optimizer="adamw"), p, 0.1), torch.optim.AdamW)


def test_onecycle_or_plateau_are_torchs_schedulers():
    from moelab.train.optim import onecycle_or_plateau

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = onecycle_or_plateau("onecycle", opt, 0.1, 2, 5)
    assert isinstance(sched, torch.optim.lr_scheduler.OneCycleLR) and sched.total_steps == 10
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # starts at lr / div_factor
    plateau = onecycle_or_plateau("plateau", opt, 0.1, 2, 5, patience=2, factor=0.25)
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert plateau.mode == "max" and plateau.patience == 2 and plateau.factor == 0.25
