"""The optimisation loop, latents, losses and presets on tiny random-weight models."""

import math

import pytest
import torch

from clipguide import RunConfig, get_preset, optimise
from clipguide.engine.latents import make_latent
from clipguide.engine.losses import spherical_loss
from clipguide.engine.state import make_generators
from clipguide.presets import PRESETS
from clipguide.models.dalle import dalle_blacklist

SMALL = dict(size=32, cutn=3, decoder="test", clip="test")


def cfg_of(preset="shapes", **kw):
    return get_preset(preset).replace(**{**SMALL, "prompts": ("a red circle",), "steps": 3, **kw})


def test_same_seed_same_image_bit_for_bit(tiny_dvae, tiny_clip):
    cfg = cfg_of(prompts=("a red circle", "blue:-0.5 | a square"), batch=2, steps=4)
    a, b = optimise(cfg, tiny_dvae, tiny_clip), optimise(cfg, tiny_dvae, tiny_clip)
    assert torch.equal(a.images, b.images) and torch.equal(a.latent, b.latent)
    assert torch.equal(a.losses, b.losses)
    c = optimise(cfg.replace(seed=1), tiny_dvae, tiny_clip)
    assert not torch.equal(a.latent, c.latent)


@pytest.mark.parametrize("preset", ["dvae-codebook", "aleph2image-delta", "aleph2image-gamma", "aleph2image", "shapes"])
def test_snapshot_k_equals_final_image_of_k_step_run(tiny_dvae, tiny_clip, preset):
    long = optimise(cfg_of(preset, steps=5, snapshots=(0, 3, 5)), tiny_dvae, tiny_clip)
    short = optimise(cfg_of(preset, steps=3), tiny_dvae, tiny_clip)
    assert set(long.snapshots) == {0, 3, 5}
    assert torch.equal(long.snapshots[3], short.images)
    assert torch.equal(long.snapshots[5], long.images)
    assert not torch.equal(long.snapshots[0], long.images), "the image should change while optimising"


def test_run_in_batch_starts_like_solo_run(tiny_dvae, tiny_clip):
    solo = optimise(cfg_of(prompts=("a red circle",), seed=7, steps=1), tiny_dvae, tiny_clip)
    both = optimise(cfg_of(prompts=("a blue square", "a red circle"), seed=7, steps=1), tiny_dvae, tiny_clip)
    # Same seed -> same initial logits and the same cutout draws, whatever shares the batch.
    assert torch.allclose(both.losses[0, 1], solo.losses[0, 0], atol=1e-5)
    assert not torch.allclose(both.losses[0, 0], both.losses[0, 1])


def test_loss_decreases_over_steps(tiny_dvae, tiny_clip):
    r = optimise(cfg_of(steps=25, cutn=4, lr=0.2), tiny_dvae, tiny_clip)
    assert r.losses[-5:].mean() < r.losses[:5].mean()
    assert r.similarities[-5:].mean() > r.similarities[:5].mean()


def test_callback_sees_every_step_and_interrupt_returns_partial(tiny_dvae, tiny_clip):
    seen = []

    def cb(state):
        seen.append(state.step)
        if state.step == 2:
            raise KeyboardInterrupt

    r = optimise(cfg_of(steps=10), tiny_dvae, tiny_clip, cb)
    assert seen == [0, 1, 2] and r.interrupted and r.steps_done == 2
    ref = optimise(cfg_of(steps=2), tiny_dvae, tiny_clip)
    assert torch.equal(r.images, ref.images)


def test_lr_growth_and_temperature_decay(tiny_dvae, tiny_clip):
    from clipguide.engine.loop import lr_at

    cfg = cfg_of("aleph2image-delta")
    assert math.isclose(lr_at(cfg, 1000), 0.05 * 1.005**1000)
    cfg = cfg_of("aleph2image-gamma")
    lat = make_latent(cfg, 512, (2, 2), make_generators([0]))
    for _ in range(400):
        lat.end_step()
    assert lat.beta == 1.5  # 16 / 1.01**400 < 1.5 -> floor


def test_parity_softmax_is_two_softmaxes_per_position():
    cfg = RunConfig(latent="parity-softmax", init="randn")
    lat = make_latent(cfg, 16, (3, 3), make_generators([0]))
    x = lat.relax(make_generators([0]))  # [1, 16, 3, 3]
    assert torch.allclose(x.sum(1), torch.full((1, 3, 3), 2.0))
    assert torch.allclose(x[:, 0::2].sum(1), torch.ones(1, 3, 3))
    sharp = lat.display("sharpie")
    assert torch.equal(sharp[:, 0::2].sum(1), torch.ones(1, 3, 3)) and torch.equal(sharp[:, 1::2].sum(1), torch.ones(1, 3, 3))


def test_spatial_gumbel_normalises_over_positions():
    lat = make_latent(RunConfig(latent="spatial-gumbel"), 8, (4, 4), make_generators([0]))
    x = lat.relax(make_generators([1]))
    assert torch.allclose(x.flatten(2).sum(-1), torch.ones(1, 8))


def test_categorical_forward_is_one_hot_backward_reaches_logits():
    lat = make_latent(RunConfig(latent="categorical"), 8, (2, 2), make_generators([0]))
    x = lat.relax(make_generators([1]))
    assert torch.equal(x.sum(1), torch.ones(1, 2, 2)) and set(x.unique().tolist()) == {0.0, 1.0}
    (x * torch.arange(8.0)[None, :, None, None]).sum().backward()
    assert lat.param.grad is not None and lat.param.grad.abs().sum() > 0


def test_onehot_init_and_codes_init():
    lat = make_latent(RunConfig(latent="parity-softmax", init="onehot"), 16, (4, 4), make_generators([0]))
    p = lat.param.detach()
    assert torch.equal(p.sum(1), torch.ones(1, 4, 4)) and p[:, -1].sum() == 0  # code V-1 is never drawn
    cfg = RunConfig(latent="parity-gumbel", init="onehot-codes", init_codes=(3, 5, 7))
    p = make_latent(cfg, 16, (4, 4), make_generators([0])).param.detach()
    assert set(p.argmax(1).unique().tolist()) <= {3, 5, 7}


def test_spherical_loss_stop_cuts_the_gradient():
    emb = torch.randn(1, 4, 8, requires_grad=True, generator=torch.Generator().manual_seed(114))
    target = emb.detach()[:, :1] + 0.01 * torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(115))
    w = torch.ones(1, 1)
    spherical_loss(emb, target, w, torch.full((1, 1), 10.0)).sum().backward()
    assert emb.grad.abs().sum() == 0
    emb.grad = None
    spherical_loss(emb, target, w, torch.full((1, 1), -math.inf)).sum().backward()
    assert emb.grad.abs().sum() > 0


def test_negative_weight_pushes_away():
    emb = torch.randn(1, 4, 8, requires_grad=True, generator=torch.Generator().manual_seed(125))
    target = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(126))
    stops = torch.full((1, 1), -math.inf)
    pos = torch.autograd.grad(spherical_loss(emb, target, torch.ones(1, 1), stops).sum(), emb)[0]
    neg = torch.autograd.grad(spherical_loss(emb, target, -torch.ones(1, 1), stops).sum(), emb)[0]
    assert torch.allclose(pos, -neg)


def test_blacklist_bias_applies_only_to_openai_vocab():
    assert len(dalle_blacklist(8192)) == 363 and dalle_blacklist(512) == []


def test_presets_are_faithful_configs():
    d = PRESETS["aleph2image-delta"].config
    assert (d.latent, d.init, d.cutn, d.cut_range, d.cut_noise, d.loss, d.loss_scale, d.lr, d.lr_growth, d.optimiser) == (
        "parity-softmax", "onehot", 64, (0.8, 0.99), 0.2, "cosine", 10.0, 0.05, 1.005, "adam")
    c = PRESETS["dvae-codebook"].config
    assert (c.latent, c.blacklist, c.noise_scale, c.optimiser, c.lr, c.cutn, c.loss, c.size) == (
        "categorical", True, 1.0, "adamw", 0.05, 64, "spherical", 480)
    g = PRESETS["aleph2image-gamma"].config
    assert (g.temperature, g.temperature_decay, g.temperature_floor, g.batch, g.lr, g.lr_growth) == (16.0, 1.01, 1.5, 2, 0.01, 1.015)


def test_cutout_augmentations_are_seeded_and_whole_views_see_everything():
    from clipguide.engine.cutouts import make_cutouts
    from reference import resample  # Crowson's resample written out, not clipguide's

    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    cfg = RunConfig(cutn=4, cut_whole=0.5, cut_affine=0.0)
    cuts = make_cutouts(img, cfg, 32, make_generators([0]))
    whole = resample(img, 32)
    assert torch.allclose(cuts[2:], whole.expand(2, -1, -1, -1))
    aug = RunConfig(cutn=4, cut_affine=25.0, cut_flip=True)
    a = make_cutouts(img, aug, 32, make_generators([3]))
    assert torch.equal(a, make_cutouts(img, aug, 32, make_generators([3])))
    assert not torch.equal(a, make_cutouts(img, aug.replace(cut_affine=0.0), 32, make_generators([3])))


def test_cut_mirror_zooms_the_whole_views_out_over_a_reflect_padded_image():
    import torch.nn.functional as F
    from clipguide.engine.cutouts import crop_resize, draw_offsets, draw_sizes
    from clipguide.errors import ConfigError
    from reference import resample  # Crowson's resample written out, not clipguide's

    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(12))
    pad = 63  # reflect padding as wide as it goes: every zoomed view lies inside it
    padded = F.pad(img[None], (pad,) * 4, mode="reflect")
    for size, off in ((100, (-20, -36)), (64, (0, 0)), (127, (-63, 0)), (80, (-1, -16))):
        mirrored = crop_resize(img, [size], [off], [False], 32, "lanczos")
        y, x = off[0] + pad, off[1] + pad
        expected = resample(padded[:, :, y : y + size, x : x + size], 32)  # slice the padded image, resample it
        assert torch.allclose(mirrored, expected, atol=1e-6), (size, off)
    # a zoomed-out view contains the whole image: its offsets lie between side - size and 0
    g = torch.Generator().manual_seed(0)
    offs = draw_offsets((64, 64), [90] * 200, 1, g)
    for axis in (0, 1):  # each axis jitters over the whole range, the vertical as the horizontal
        assert {o[axis] for o in offs} == set(range(-26, 1)), axis
    # cutouts inside the image keep Crowson's offsets: floor(u * (side - size + 1)) per axis
    sizes = [40, 64, 50, 33]
    u = torch.rand(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    legacy = (u * torch.tensor([[64 - s + 1, 96 - s + 1] for s in sizes], dtype=torch.float64)).long().tolist()
    assert draw_offsets((64, 96), sizes, 1, torch.Generator().manual_seed(3)) == legacy
    # the default size law draws the same sizes with the option on
    cfg = RunConfig(cutn=8, cut_whole=0.25)
    assert draw_sizes(cfg, 64, 32, torch.Generator().manual_seed(1)) == draw_sizes(
        cfg.replace(cut_mirror=0.5), 64, 32, torch.Generator().manual_seed(1))
    for bad in (dict(cut_mirror=1.0, cut_whole=0.25), dict(cut_mirror=-0.1, cut_whole=0.25), dict(cut_mirror=0.3)):
        with pytest.raises(ConfigError, match="--cut-mirror needs --cut-whole"):
            RunConfig(**bad)


def test_cut_mirror_views_are_seeded_and_differ_from_plain_whole_views():
    from clipguide.engine.cutouts import make_cutouts

    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(199))
    cfg = RunConfig(cutn=8, cut_whole=0.5, cut_mirror=0.8, cut_affine=0.0)
    cuts = make_cutouts(img, cfg, 32, make_generators([2]))
    assert torch.equal(cuts, make_cutouts(img, cfg, 32, make_generators([2])))
    plain = make_cutouts(img, cfg.replace(cut_mirror=0.0), 32, make_generators([2]))
    assert torch.allclose(plain[4:], plain[4:5].expand(4, -1, -1, -1))  # whole views, all the same
    assert all(not torch.allclose(c, plain[4], atol=1e-3) for c in cuts[4:])  # zoomed: each its own view


def test_cut_roll_cuts_the_image_shifted_round_by_a_seeded_amount():
    from clipguide.engine.cutouts import make_cutouts
    from clipguide.errors import ConfigError

    img = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(212))
    cfg = RunConfig(cutn=4, cut_whole=0.5, cut_roll=9)
    g = make_generators([5])[0]
    shift = torch.randint(-9, 10, (2,), generator=torch.Generator().manual_seed(5)).tolist()
    assert shift != [0, 0]
    rolled = torch.roll(img, shift, (-2, -1))
    # the shift is drawn first from the run's generator, then the cutouts as without it
    g_after = torch.Generator().manual_seed(5)
    torch.randint(-9, 10, (2,), generator=g_after)
    expected = make_cutouts(rolled, cfg.replace(cut_roll=0), 32, [g_after])
    assert torch.equal(make_cutouts(img, cfg, 32, [g]), expected)
    with pytest.raises(ConfigError, match="--cut-roll must be 0"):
        RunConfig(cut_roll=-1)


def test_the_loop_and_latents_refuse_what_they_cannot_do_in_one_line(tiny_dvae, tiny_clip):
    from clipguide.errors import ConfigError
    from clipguide.engine.loop import check_fits

    with pytest.raises(ConfigError, match="no prompt given"):
        optimise(RunConfig(size=32, cutn=2, device="cpu"), tiny_dvae, tiny_clip)
    with pytest.raises(ConfigError, match="needs an even vocabulary, got 511"):
        make_latent(RunConfig(latent="parity-softmax", init="onehot"), 511, (2, 2), make_generators([0]))
    no_encoder = type("D", (), {"name": "stub", "vocab_size": 16, "downsample": 8, "encode": None})()
    with pytest.raises(ConfigError, match=r"needs a decoder that encodes images \(encode_logits\), which 'stub' lacks"):
        check_fits(RunConfig(prompts=("x",), size=32, init_image="x.png"), no_encoder)


def test_parity_softmax_display_soft_is_what_training_decodes():
    """Delta's checkin view (--display soft) is the noise-free relaxation the loop trains on, and differs from sharpie."""
    lat = make_latent(RunConfig(latent="parity-softmax", init="randn"), 8, (2, 2), make_generators([3]))
    with torch.no_grad():
        assert torch.equal(lat.display("soft"), lat.relax(make_generators([0])))
        assert not torch.equal(lat.display("soft"), lat.display("sharpie"))
