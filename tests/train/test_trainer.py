"""The one trainer (:mod:`moelab.train.trainer`) on a tiny in-test model: resume of an interrupted phase,
the callback points in order, and :func:`predict` (batching, tuple outputs, flip test-time augmentation)."""

import json

import pytest
import torch
import torch.nn.functional as F

from moelab.train import callbacks
from moelab.train.checkpoint import read_meta
from moelab.train.optim import Optim
from moelab.train.run import Run
from moelab.train.trainer import Trainer, predict

X = torch.randn(48, 6, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + X[:, 1] > 0).long()
EPOCHS, BATCH = 3, 16  # 3 steps an epoch


class Cut(Exception):
    """Raised by a callback: the phase stops where a kill would have stopped it."""


def model() -> torch.nn.Module:
    torch.manual_seed(1)  # dropout draws from the global RNG: the checkpoint must carry its state
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))


def train(run: Run) -> tuple[torch.nn.Module, dict]:
    """One phase of EPOCHS epochs of the Optim recipe (AdamW, one-cycle per step) on X, Y."""
    net = model()
    trainer = Trainer.from_recipe(run, "toy", net, Optim(lr=1e-2), epochs=EPOCHS, steps_per_epoch=len(X) // BATCH)

    def batches(epoch):
        perm = torch.randperm(len(X), generator=run.generator("toy", epoch))
        for i in range(0, len(X), BATCH):
            yield X[perm[i:i + BATCH]], Y[perm[i:i + BATCH]], 1.0

    def evaluate(epoch):
        return {"acc": float((net(X).argmax(1) == Y).float().mean())}

    last = trainer.fit(batches, net, lambda out, y: (F.cross_entropy(out, y), None), evaluate=evaluate)
    return net, last


def with_callback(monkeypatch, cb) -> None:
    monkeypatch.setattr(callbacks, "CALLBACKS", [*callbacks.CALLBACKS, cb])


def metric_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cut_at", [("step", 1, 2), ("evaluate", 1, None), ("epoch_start", 2, None)])
def test_an_interrupted_phase_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, cut_at):
    """Interrupted mid-epoch, in the validation pass or between epochs, then resumed on the same directory:
    the same weights, metric rows and last row as a phase that ran through (the same batches, the optimiser,
    schedule and dropout RNG restored from the last checkpoint)."""
    with Run(tmp_path / "ref", "t", {}, seed=0, quiet=True) as run:
        ref, ref_last = train(run)

    def cut(point, epoch=None, step=None, **_):
        if (point, epoch, step) == cut_at:
            raise Cut

    with_callback(monkeypatch, cut)
    with Run(tmp_path / "cut", "t", {}, seed=0, quiet=True) as run, pytest.raises(Cut):
        train(run)
    monkeypatch.setattr(callbacks, "CALLBACKS", [c for c in callbacks.CALLBACKS if c is not cut])
    assert read_meta(tmp_path / "cut" / "ckpt" / "toy.safetensors")["epoch"] == cut_at[1] - 1
    with Run(tmp_path / "cut", "t", {}, seed=0, quiet=True, resume=True) as run:
        got, last = train(run)
        assert run.phase_times["toy"]["elapsed_s"] >= run.phase_times["toy"]["train_s"] > 0
    assert last == {**ref_last, "img_per_s": last["img_per_s"]}
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values(), strict=True))
    assert metric_rows(tmp_path / "cut") == metric_rows(tmp_path / "ref")

    with Run(tmp_path / "cut", "t", {}, seed=0, quiet=True, resume=True) as run:  # finished: skipped, restored
        steps = []
        with_callback(monkeypatch, lambda point, **_: steps.append(point))
        again, last2 = train(run)
    assert steps == [] and last2 == last
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ref.state_dict().values(), strict=True))


def test_callbacks_fire_in_order(tmp_path, monkeypatch):
    seen = []
    with_callback(monkeypatch, lambda point, epoch=None, step=None, meta=None, **_:
                  seen.append((point, epoch if meta is None else meta["epoch"], step)))
    with Run(tmp_path / "r", "t", {}, seed=0, quiet=True) as run:
        train(run)
    per_epoch = [[("epoch_start", e, None), ("step", e, 1), ("step", e, 2), ("step", e, 3), ("train_end", e, None),
                  ("evaluate", e, None), ("checkpoint_write", e, None), ("epoch_end", e, None)] for e in range(EPOCHS)]
    assert seen == sum(per_epoch, [])


def test_full_batch_epochs_and_early_stopping(tmp_path):
    """``epoch_fn`` epochs (the family's own update), ``stopped`` epochs (nothing trains), evaluation every
    ``log_every`` epochs and after the last, checkpoints every ``checkpoint_every``."""
    net = torch.nn.Linear(6, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ran = []

    def epoch_fn(epoch):
        ran.append(epoch)
        loss = F.cross_entropy(net(X), Y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    with Run(tmp_path / "r", "t", {}, seed=0, quiet=True) as run:
        last = Trainer(run, "fb", net, opt, epochs=5, log_every=2, checkpoint_every=4).fit(
            epoch_fn=epoch_fn, evaluate=lambda e: {"evaluated": e}, stopped=lambda e: e == 3)
    assert ran == [0, 1, 2, 4]
    rows = metric_rows(tmp_path / "r")
    assert [(r["epoch"], r["evaluated"]) for r in rows] == [(2, 1), (4, 3), (5, 4)]
    assert rows[1]["stopped"] == 1 and "loss" not in rows[1] and "loss" in rows[2]
    assert last["epoch"] == 5 and read_meta(tmp_path / "r" / "ckpt" / "fb.safetensors")["done"]


def test_predict_batches_tuples_and_flip_tta():
    """Batched outputs equal one forward on everything; a tuple's second output (per-expert, 3-D) is
    concatenated over its examples axis; ``tta=1`` averages the scores with those of the mirrored images
    and leaves the other outputs on the plain ones."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(10, 3, 5, 7)

    def fn(xb):
        h = conv(xb)
        return h.mean((2, 3)) + h[..., 0].mean(2), torch.stack([h.amax((2, 3)), h.amin((2, 3))])  # (N, 4), (2, N, 4)

    with torch.no_grad():
        scores, experts = fn(x)
        mirrored = fn(x.flip(3))[0]
    got = predict(fn, x, batch=3)
    assert torch.allclose(got[0], scores, atol=1e-6) and torch.allclose(got[1], experts, atol=1e-6)
    assert got[1].shape == (2, 10, 4)
    tta, plain = predict(fn, x, batch=4, tta=1)
    assert torch.allclose(tta, 0.5 * scores + 0.5 * mirrored, atol=1e-6)
    assert not torch.allclose(tta, scores, atol=1e-3)  # the image is not symmetric: the flip mattered
    assert torch.allclose(plain, experts, atol=1e-6)

    class Images:  # Batches: the examples build their own batch
        def __len__(self):
            return len(x)

        def batch(self, idx):
            return x[idx]

    assert torch.allclose(predict(lambda xb: fn(xb)[0], Images(), batch=4, tta=1)[0], tta, atol=1e-6)
