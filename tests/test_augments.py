"""Kornia augmentations of the cutouts (--augments, nerdyrodent's -aug), the pooled cutouts, per-cutout
noise and the decaying pull toward zero: what each does, and that runs stay seeded (docs/methods.md §6).

Kornia draws from torch's global RNG; clipguide seeds a fork of it from each run's generator, so the
tests check that the same seed gives the same cutouts bit for bit whatever the global RNG holds, that
the global RNG is left as it was, and that runs in a batch do not see each other's draws."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from clipguide import RunConfig
from clipguide.engine import augments as augments_module
from clipguide.engine.cutouts import make_cutouts
from clipguide.engine.latents import make_latent
from clipguide.engine.loop import grid_of
from clipguide.engine.objective import View, latent_penalty
from clipguide.engine.state import make_generators
from clipguide.errors import ConfigError
from clipguide.testing import random_vqgan

needs_kornia = pytest.mark.skipif(importlib.util.find_spec("kornia") is None, reason="pip install 'clipguide[kornia]'")

CUT = 24
BASE = dict(prompts=("x",), cutn=8, device="cpu")


def image(seed=0, n=1):
    return torch.rand(n, 3, 48, 48, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def cuts_of(img, seeds=(0,), **kw):
    return make_cutouts(img, RunConfig(**{**BASE, **kw}), CUT, [torch.Generator().manual_seed(s) for s in seeds])


@needs_kornia
@pytest.mark.parametrize("name", sorted(augments_module.AUGMENTS))
def test_each_augment_changes_the_cutouts_and_the_gradient_reaches_the_image(name):
    img = image()
    plain = cuts_of(img, cutn=16)
    cuts = cuts_of(img, cutn=16, augments=(name,))
    weights = torch.randn(cuts.shape, generator=torch.Generator().manual_seed(1))
    (cuts * weights).sum().backward()
    assert torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    if name == "Cr":  # generate.py's RandomCrop to CLIP's size of a cutout already at CLIP's size: the whole cutout
        assert torch.equal(cuts, plain)
        return
    changed = (cuts - plain).flatten(1).abs().amax(1) > 1e-4
    assert 0 < int(changed.sum()), f"{name} changed no cutout"
    # Ts and Er draw once for the batch (same_on_batch), Re's p gates the whole batch (Kornia's crops), the
    # others draw per cutout with p < 1
    if name not in ("Ts", "Er", "Re"):
        assert int(changed.sum()) < 16, f"{name} is applied with p < 1: some cutouts stay as they were"


@needs_kornia
def test_augments_apply_in_order_and_after_the_crops():
    img = image()
    ab, ba = cuts_of(img, augments=("Ro", "Ji")), cuts_of(img, augments=("Ji", "Ro"))
    assert not torch.equal(ab, ba)


@needs_kornia
def test_same_seed_same_cutouts_bit_for_bit_whatever_the_global_rng_and_it_is_left_alone():
    img = image()
    kw = dict(augments=("Af", "Pe", "Ji", "Er", "Gn", "Et"), cut="pooled", cut_noise=0.1, cut_noise_each=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = cuts_of(img, **kw)
    assert torch.equal(torch.get_rng_state(), before), "the global RNG must be as the caller left it"
    torch.manual_seed(456)
    assert torch.equal(cuts_of(img, **kw), first)
    assert not torch.equal(cuts_of(img, seeds=(1,), **kw), first)


@needs_kornia
def test_runs_in_a_batch_do_not_affect_each_others_augmentations():
    kw = dict(augments=("Af", "Pe", "Ji", "Er"), cut="pooled", cut_noise=0.1, cut_noise_each=True)
    pair = image(0, 2)
    both = cuts_of(pair, seeds=(5, 6), **kw)
    alone = cuts_of(pair[:1], seeds=(5,), **kw)
    assert torch.equal(both[:8], alone)
    other = torch.cat([pair[:1], image(9)])  # another image in run 1 changes nothing of run 0
    assert torch.equal(cuts_of(other, seeds=(5, 6), **kw)[:8], alone)
    assert torch.equal(both[8:], cuts_of(pair[1:], seeds=(6,), **kw))


def test_pooled_cutouts_are_the_whole_image_average_and_max_pooled_and_draw_nothing():
    img = image()
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    cuts = make_cutouts(img, RunConfig(**BASE, cut="pooled"), CUT, [g])
    want = (F.adaptive_avg_pool2d(img, CUT) + F.adaptive_max_pool2d(img, CUT)) / 2
    assert cuts.shape == (8, 3, CUT, CUT) and torch.equal(cuts, want.expand(8, -1, -1, -1))
    assert torch.equal(g.get_state(), state)
    with pytest.raises(ConfigError, match="--cut pooled views the whole image"):
        RunConfig(**BASE, cut="pooled", cut_flip=True)


def test_cut_noise_each_draws_one_strength_per_cutout():
    img = image()
    plain = cuts_of(img, cut="pooled")
    g = torch.Generator().manual_seed(0)
    r = torch.rand(8, 1, 1, 1, generator=g)
    want = plain + 0.1 * r * torch.randn(plain.shape, generator=g)
    each = cuts_of(img, cut="pooled", cut_noise=0.1, cut_noise_each=True)
    assert torch.allclose(each, want, atol=1e-6)
    std = (each - plain).flatten(1).std(1)
    assert std.max() > 2 * std.min()  # strengths differ between cutouts
    shared = cuts_of(img, cut="pooled", cut_noise=0.1)
    ratio = (shared - plain).flatten(1).std(1)
    assert ratio.max() < 1.2 * ratio.min()  # one strength shared by the run's cutouts


def test_init_pull_zero_decay_pulls_toward_zero_with_weight_over_2_step_plus_1():
    vqgan = random_vqgan({"ddconfig": {"double_z": False, "z_channels": 8, "resolution": 16, "in_channels": 3, "out_ch": 3,
                                       "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                                       "dropout": 0.0}, "n_embed": 16, "embed_dim": 8}, seed=0)
    cfg = RunConfig(prompts=("x",), size=16, latent="zquantize", init="onehot", init_weight=3.0, init_pull="zero-decay")
    lat = make_latent(cfg, vqgan.vocab_size, grid_of(cfg, vqgan), make_generators([0]), decoder=vqgan)
    z = lat.param.detach()
    for step in (0, 4):
        pull = latent_penalty(View(torch.zeros(1, 3, 16, 16), lat, step, []))
        assert torch.allclose(pull, 3.0 / (2 * step + 1) / 2 * z.pow(2).mean()[None])
    lat.param.grad = None
    latent_penalty(View(torch.zeros(1, 3, 16, 16), lat, 4, [])).sum().backward()
    assert torch.allclose(lat.param.grad, 3.0 / 9 * z / z.numel())  # toward zero, not toward the start
    initial = make_latent(cfg.replace(init_pull="initial"), vqgan.vocab_size, grid_of(cfg, vqgan), make_generators([0]), decoder=vqgan)
    assert float(initial.penalty(4).detach()) == 0.0  # Crowson's pull: nothing at the start, whatever the step


def test_missing_kornia_is_one_line_naming_the_extra(monkeypatch, tiny_model_files, tmp_path, capsys):
    from clipguide.cli import main

    monkeypatch.setitem(sys.modules, "kornia", None)
    monkeypatch.setitem(sys.modules, "kornia.augmentation", None)
    augments_module.chain.cache_clear()
    try:
        with pytest.raises(ConfigError) as e:
            cuts_of(image(), augments=("Af",))
        assert "\n" not in str(e.value) and "pip install 'clipguide[kornia]'" in str(e.value)
        dec, clip = tiny_model_files
        out = tmp_path / "run"
        rc = main(["generate", "x", "--decoder", str(dec), "--clip", str(clip), "--size", "32", "--cutn", "2",
                   "--steps", "1", "--augments", "Af,Pe", "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "clipguide[kornia]" in err, err
        assert not out.exists()
    finally:
        augments_module.chain.cache_clear()


def test_a_bad_augment_name_is_one_line_with_exit_2(capsys):
    from clipguide.cli import main

    with pytest.raises(ConfigError, match="'Zz' is not one of Ji, Sh, Gn"):
        RunConfig(**BASE, augments=("Af", "Zz"))
    assert main(["generate", "x", "--augments", "Af,Zz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--augments 'Zz'" in err, err
