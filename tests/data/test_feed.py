"""Feeding batches to the device (:mod:`moelab.data.feed`) and the families' batch builders on top of it.

The device-resident path (data on the device, batches gathered and augmented there) is the same code on any
device, so running it with ``device="cpu"`` and ``resident=True`` checks its logic here: it must give the
host path's batches bit for bit, with the same random draws, and the host path must give what the families
computed before the feed existed (written out below as the reference). The CUDA tests skip without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.data import feed as F
from moelab.data.augment import Augment
from moelab.data.transforms import random_translate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _same_state(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(a.get_state(), b.get_state())


# ----------------------------------------------------------------------------- send / Rows


def test_send_on_the_cpu_is_the_identity():
    idx, flip = torch.arange(5), torch.tensor([True, False, True, True, False])
    out = F.send([idx, None, flip], "cpu")
    assert out[0] is idx and out[1] is None and out[2] is flip


def test_send_packs_bit_for_bit():
    """The packed form (one int64 tensor, one copy) gives back every dtype exactly, floats included."""
    g = _gen()
    parts = [torch.randperm(7, generator=g), torch.rand(7, generator=g) < 0.5,
             torch.randint(-3, 4, (7,), generator=g, dtype=torch.int32),
             torch.rand(7, generator=g, dtype=torch.float64) * 1e-3, None]
    out = F.send(parts, "cpu", pack=True)
    assert out[-1] is None
    for a, b in zip(parts[:-1], out[:-1]):
        assert b.dtype == a.dtype and torch.equal(a, b)
    with pytest.raises(TypeError, match="float64"):
        F.send([torch.ones(3)], "cpu", pack=True)
    with pytest.raises(ValueError, match="one length"):
        F.send([torch.ones(3, dtype=torch.long), torch.ones(4, dtype=torch.long)], "cpu", pack=True)


@pytest.mark.parametrize("dim", [0, 1])
def test_rows_resident_and_host_take_the_same(dim):
    t = torch.randint(0, 255, (6, 40, 3), dtype=torch.uint8)
    idx = torch.randperm(t.shape[dim], generator=_gen())[:9 if dim else 4]
    host, res = F.Rows(t, "cpu", resident=False, dim=dim), F.Rows(t, "cpu", resident=True, dim=dim)
    assert not host.resident and res.resident and len(res) == t.shape[dim]
    assert torch.equal(host.take(idx), t.index_select(dim, idx)) and torch.equal(res.take(idx), host.take(idx))


def test_residency_is_decided_by_size(monkeypatch):
    t = torch.zeros(1 << 20, dtype=torch.uint8)  # 1 MiB
    assert not F.fits_on_device(t, "cpu") and F.device_data_budget("cpu") == 0
    assert F.Rows(t, "cpu").resident is False

    class Props:
        total_memory = 80 << 30

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    monkeypatch.delenv(F.DEVICE_DATA_ENV, raising=False)
    assert F.device_data_budget("cuda:0") == 4 << 30  # an eighth of 80 GiB, capped at 4 GiB
    assert F.fits_on_device(t, "cuda")
    Props.total_memory = 8 << 20
    assert F.device_data_budget("cuda") == 1 << 20 and F.fits_on_device(t, "cuda")
    assert not F.fits_on_device(torch.zeros((1 << 20) + 1, dtype=torch.uint8), "cuda")
    monkeypatch.setenv(F.DEVICE_DATA_ENV, "0")
    assert not F.fits_on_device(t, "cuda")
    monkeypatch.setenv(F.DEVICE_DATA_ENV, "2")
    assert F.device_data_budget("cuda") == 2 << 20 and F.fits_on_device(t, "cuda")


# ----------------------------------------------------------------------------- CIFAR images


def _images(resident, n=50, device="cpu", channels_last=True):
    from moelab.experiments.cifar import Images

    rng = np.random.default_rng(0)
    return Images(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), channels_last,
                  device, resident=resident)


def _reference_batch(images, idx, flip, shift, gen):
    """What ``Images.batch`` computed before the feed (host gather, then the same transforms)."""
    from moelab.experiments.cifar import MEAN, STD

    x = images.x[idx].permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    if flip is not None:
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if shift > 0:
        x = random_translate(x, shift, gen, fill="edge")
    return x.contiguous(memory_format=torch.channels_last if images.channels_last else torch.contiguous_format)


def _epoch(images, hflip=True, shift=2, seed=3, max_steps=None):
    from moelab.experiments.cifar import image_batches

    g = _gen(seed)
    out = [(x.clone(), y.clone(), w) for x, y, w in image_batches(images, 16, g, hflip, shift, max_steps)]
    return out, g


@pytest.mark.parametrize("hflip,shift", [(True, 2), (False, 0), (True, 0), (False, 3)])
def test_cifar_batches_resident_equal_host_equal_before(hflip, shift):
    host, res = _images(False), _images(True)
    assert not host.resident and res.resident
    got_h, g_h = _epoch(host, hflip, shift)
    got_r, g_r = _epoch(res, hflip, shift)
    # the reference: the loop as it was, on the host path's images
    from moelab.experiments.cifar import index_batches

    g = _gen(3)
    want = [(_reference_batch(host, idx, flip, shift, g), host.y[idx]) for idx, flip in
            index_batches(len(host), 16, g, hflip)]
    assert len(got_h) == len(got_r) == len(want) == 4
    for (xh, yh, wh), (xr, yr, wr), (xw, yw) in zip(got_h, got_r, want):
        assert torch.equal(xh, xw) and torch.equal(yh, yw) and wh == wr == 1.0
        assert torch.equal(xr, xw) and torch.equal(yr, yw)
        assert xh.is_contiguous(memory_format=torch.channels_last) and yr.dtype == torch.long
    assert _same_state(g_h, g) and _same_state(g_r, g), "the batches must draw exactly what they drew before"


def test_cifar_batch_without_generator_and_eval_batches():
    host, res = _images(False, channels_last=False), _images(True, channels_last=False)
    idx = torch.arange(10, 30)
    assert torch.equal(host.batch(idx), res.batch(idx))
    assert torch.equal(host.batch(idx), _reference_batch(host, idx, None, 0, None))
    torch.manual_seed(5)
    a = host.batch(idx, shift=2)  # no generator: torch's global one, as before
    torch.manual_seed(5)
    b = res.batch(idx, shift=2)
    assert torch.equal(a, b)


def test_images_of_keeps_the_path():
    from moelab.experiments.cifar import images_of

    for resident in (False, True):
        imgs = _images(resident)
        sub = images_of(imgs, [1, 3])
        keep = torch.isin(imgs.y, torch.tensor([1, 3]))
        assert sub.resident is resident and torch.equal(sub.y, imgs.y[keep]) and torch.equal(sub.x, imgs.x[keep])
        idx = torch.arange(len(sub))
        assert torch.equal(sub.batch(idx), imgs.batch(torch.nonzero(keep).squeeze(1)))


# ----------------------------------------------------------------------------- digits


def _digit_data(n=40, h0=28):
    g = _gen(1)
    raw = torch.randint(0, 256, (n, h0, h0), generator=g, dtype=torch.uint8)
    return {"resize": "seed_half", "pixel_affine": (0.0, 255.0), "train_raw": raw}


@pytest.mark.parametrize("shift,rotate,scale", [(1, 0.0, 0.0), (2, 10.0, 0.1), (0, 0.0, 0.2)])
def test_device_augment_is_augment(shift, rotate, scale):
    data = _digit_data()
    aug = Augment(data, shift, rotate, scale)
    dev = F.DeviceAugment(aug, "cpu")
    raw = data["train_raw"][:17]
    g1, g2 = _gen(7), _gen(7)
    want = aug(raw, g1)
    draws = F.send(dev.draw(len(raw), g2), "cpu", pack=True)  # through the packed copy, as on a GPU
    got = dev(raw, draws)
    assert torch.equal(got, want) and _same_state(g1, g2)


class _Run:
    def __init__(self, device="cpu"):
        from moelab.train.run import seeded_generator

        self.device, self.seed = torch.device(device), 0
        self.generator = lambda *salt: seeded_generator(0, *salt)


@pytest.mark.parametrize("augmented", [False, True])
def test_digit_batches_resident_equal_host(augmented):
    from moelab.experiments.digits import DigitFeed, Splits, minibatches

    data = _digit_data(60)
    raw = data["train_raw"]
    x = raw.reshape(60, -1).double() / 255
    data.update(train_x=x, train_y=torch.arange(60) % 10, test_x=x[:5], test_y=torch.arange(5), classes=list(range(10)))
    aug = Augment(data, 1, 5.0, 0.05) if augmented else None
    sp = Splits(data, 10, 0, True, aug)
    assert sp.feed("cpu") is None  # the CPU keeps the host path
    run = _Run()
    host = [(a.clone(), b.clone(), w) for a, b, w in sp.batches(run, "moe", 2, 16)]
    feed = DigitFeed(sp.train_x, sp.train_y, "cpu", sp.raw, sp.augment, resident=True)
    res = list(minibatches(run, "moe", 2, sp.train_x, sp.train_y, 16, sp.norm, sp.raw, sp.augment, feed=feed))
    assert len(host) == len(res) == 4
    for (xh, yh, wh), (xr, yr, wr) in zip(host, res):
        assert torch.equal(xh, xr) and torch.equal(yh, yr) and wh == wr


# ----------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "pinned-host"])
def test_cifar_batches_on_cuda_match_the_cpu_without_syncs(resident):
    cpu, gpu = _images(False), _images(resident, device="cuda")
    assert gpu.resident is resident
    want, _ = _epoch(cpu)
    _epoch(gpu, max_steps=1)  # first use: the one-off copy of a resident set (a blocking copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation in the feed raises
    try:
        got, _ = _epoch(gpu)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for (xc, yc, _), (xg, yg, _) in zip(want, got):
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        torch.testing.assert_close(xg.cpu(), xc, rtol=1e-6, atol=1e-6)
        assert torch.equal(yg.cpu(), yc)


@needs_cuda
@pytest.mark.parametrize("augmented", [False, True])
def test_digit_batches_on_cuda_match_the_cpu(augmented):
    from moelab.experiments.digits import Splits

    data = _digit_data(60)
    raw = data["train_raw"]
    x = raw.reshape(60, -1).double() / 255
    data.update(train_x=x, train_y=torch.arange(60) % 10, test_x=x[:5], test_y=torch.arange(5), classes=list(range(10)))
    sp = Splits(data, 10, 0, True, Augment(data, 1, 5.0, 0.05) if augmented else None)
    cpu = list(sp.batches(_Run("cpu"), "moe", 0, 16))
    gpu = list(sp.batches(_Run("cuda"), "moe", 0, 16))
    assert sp.feed("cuda").rows.resident
    unit = 1 / 255 / sp.norm[1]  # one grey level after standardising
    for (xc, yc, _), (xg, yg, _) in zip(cpu, gpu):
        assert xg.device.type == "cuda" and xg.dtype == xc.dtype
        diff = (xg.cpu() - xc).abs()
        # the same draws: equal up to float rounding, and a rare pixel one grey level off (a rounding tie)
        assert diff.max() <= unit * 1.01 + 1e-5 and (diff > 1e-4).float().mean() < 1e-3, diff.max()
        assert torch.equal(yg.cpu(), yc)
