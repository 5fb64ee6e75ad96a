"""Every option has a test of its effect; the loss pulls toward the prompt in every preset.

A test here changes one :class:`clipguide.config.RunConfig` field and checks what it does (the
value it computes, the draws it makes, the direction it moves the run), not only that it parses.
Fields whose effect is checked elsewhere are listed in :data:`CHECKED_ELSEWHERE` with their test;
:func:`test_every_config_field_has_an_effect_test` keeps the list complete.

* **Loss direction per preset**: for every preset in ``clipguide.PRESETS``, a few steps of its own
  loss, latent, relaxation and schedules (a larger lr for speed) raise the CLIP similarity to the
  prompt on tiny random-weight models.
* **Options**: cutout noise, size laws, zoomed-out views and their offsets, augmentations, story
  mode, the softmax latent, the DALL-E blacklist bias, temperatures, learning-rate schedules,
  optimisers, regularisers, display modes, the moving average, pixel noise, precision.

Every random choice is seeded; the models are tiny (tests/conftest.py) and the whole file runs in
well under a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from clipguide import PRESETS, ConfigError, RunConfig, optimise
from clipguide.engine import cutouts as cutouts_module
from clipguide.engine.cutouts import draw_offsets, draw_sizes, make_cutouts, random_affine
from clipguide.engine.latents import Softmax, make_latent
from clipguide.engine.losses import cosine_loss, cosine_similarities
from clipguide.engine.ops import laplace_noise, resample, tv_loss
from clipguide.engine.loop import Step
from clipguide.engine.loop import code_bias, grid_of, lr_at, make_optimiser
from clipguide.engine.state import display_seed, make_generators
from clipguide.models.dalle import DalleDecoder, dalle_blacklist
from clipguide.models.vqgan import VQGANDecoder
from clipguide.engine.prompts import encode_targets, phrase_index
from clipguide.testing import random_dalle_decoder, random_vqgan

from conftest import TINY_DVAE

# tiny taming autoencoders (f=4), as in tests/test_vqgan.py and tests/test_faithful.py
TINY_DD = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
TINY_VQ = {"ddconfig": TINY_DD, "n_embed": 64, "embed_dim": 8}
TINY_GUMBEL = {"ddconfig": {**TINY_DD, "z_channels": 8}, "n_embed": 32, "embed_dim": 8, "quantizer": "gumbel"}

PROMPT = "a red circle"
SMALL = dict(prompts=(PROMPT,), size=32, cutn=4, steps=3, device="cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cfg_of(**kw) -> RunConfig:
    return RunConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def sharp_dvae():
    """The tiny dVAE with a trained decoder's contrast.  The random one's pixel means barely depend on
    the codes (std 0.03 in logit space, against a Laplace scale of ~1): with dvae-codebook's pixel noise
    the image is the noise's, and no step could raise its similarity.  Here the means spread ~30x wider
    and the Laplace scale is e^-2, as a trained dVAE's sharp outputs are."""
    decoder = random_dalle_decoder(**TINY_DVAE)
    with torch.no_grad():
        conv = decoder.module.blocks.output.conv
        conv.w[:3] *= 30.0
        conv.b[3:] = -2.0
    return decoder


@pytest.fixture(scope="module")
def vqgan():
    return random_vqgan(TINY_VQ, seed=1)


@pytest.fixture(scope="module")
def gumbel_vqgan():
    return random_vqgan(TINY_GUMBEL, seed=2)


class Spy:
    """Records the crops ``make_cutouts`` asks ``crop_resize`` for (sizes, offsets, flips)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = cutouts_module.crop_resize

        def spy(image, sizes, offsets, flips, cut_size, method):
            self.calls.append((list(sizes), [list(o) for o in offsets], list(flips), method))
            return real(image, sizes, offsets, flips, cut_size, method)

        monkeypatch.setattr(cutouts_module, "crop_resize", spy)


# ============================================================================ loss direction, per preset


def preset_models(name, sharp_dvae, vqgan, gumbel_vqgan):
    decoder = PRESETS[name].config.decoder
    if decoder.startswith("vqgan-gumbel"):
        return gumbel_vqgan
    return vqgan if decoder.startswith("vqgan") else sharp_dvae


# A larger learning rate than the presets' (0.01-0.1) so that 20 steps suffice; spatial Gumbel noise is
# strong on a 4x4 grid (0.2), and shapes's coarse 4-token cell is the only level learning in 20 steps (1.0).
RISE_LR = {"aleph2image": 0.2, "shapes": 1.0}
# vqgan-nerdyrodent's Kornia augmentations (perspective 0.7, erasing up to 40% of a view) and per-cutout noise make
# one step's similarity over 4 cutouts too noisy to compare (seed 0 rose 0.027); with its own 32 cutouts it rises by
# 0.03 or more from step 0 over seeds 0-5 (0.076 at seed 0), and by 0.01 or more from the first five.
RISE_CUTN = {"vqgan-nerdyrodent": 32}
NO_PRIOR = dict(prior="", prior_candidates=0, prior_shortlist=0, prior_resample=0, prior_weight=0.0)  # shapes-rerank's refinement alone


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_raises_the_clip_similarity_to_its_prompt(name, sharp_dvae, vqgan, gumbel_vqgan, tiny_clip):
    """The preset's own loss (spherical or -cosine), latent, relaxation, pixel noise, cutouts and lr/temperature
    schedules, on 32-pixel images with 4 cutouts; only lr is raised.  The similarity of a step is that of its
    own sample and cutouts, so it is noisy: the mean of the last five steps is compared with step 0 and with the
    mean of the first five.  Over seeds 0-5 both rise by 0.057 or more in every preset but vqgan-nerdyrodent
    (RISE_CUTN: at seed 0, the one tested, it passes both bounds); with the loss's sign flipped (cosine_loss
    without its minus, say) both fall by 0.08 or more instead."""
    lr = RISE_LR.get(name, 0.5)
    cfg = PRESETS[name].config.replace(prompts=(PROMPT,), size=32, cutn=RISE_CUTN.get(name, 4), steps=20, lr=lr, device="cpu", seed=0,
                                       **NO_PRIOR)  # a prior models its own grid: its parts are tested in test_prior*.py
    r = optimise(cfg, preset_models(name, sharp_dvae, vqgan, gumbel_vqgan), tiny_clip)
    sims = r.similarities  # [steps + 1, batch]: each step's cutouts against the prompt
    assert r.steps_done == 20 and sims.shape == (21, cfg.batch)
    last = sims[-5:].mean(0)
    assert (last > sims[0] + 0.03).all(), f"{name}: similarity {sims[0].tolist()} -> last five {last.tolist()}"
    assert (last > sims[:5].mean(0) + 0.03).all(), f"{name}: first five {sims[:5].mean(0).tolist()} -> last five {last.tolist()}"


# ============================================================================ cutouts


def test_cut_noise_adds_gaussian_noise_of_std_cut_noise_times_one_uniform_draw():
    img = torch.rand(1, 3, 48, 48, generator=gen(0))
    cfg = RunConfig(cutn=6, cut="uniform", cut_range=(0.5, 0.9), cut_resample="bilinear", cut_noise=0.3)
    g = gen(4)
    clean = make_cutouts(img, cfg.replace(cut_noise=0.0), 32, [g])
    # the noise is drawn after the crops, from the same generator: one U(0, 1) strength, then N(0, 1) per value
    r = torch.rand((), generator=g).item()
    noise = torch.randn(clean.shape, generator=g)
    noisy = make_cutouts(img, cfg, 32, [gen(4)])
    assert 0.05 < r < 1
    torch.testing.assert_close(noisy - clean, 0.3 * r * noise, rtol=0, atol=1e-6)  # sign and scale
    std = float((noisy - clean).std())
    assert 0 < std < 0.3 and math.isclose(std, 0.3 * r, rel_tol=0.05)
    # the next step draws another strength
    g = gen(4)
    make_cutouts(img, cfg, 32, [g])
    again = make_cutouts(img, cfg, 32, [g])
    assert not torch.allclose(again, noisy)


def test_uniform_size_law_draws_sizes_between_lo_and_hi_of_the_side(monkeypatch):
    cfg = RunConfig(cutn=64, cut="uniform", cut_range=(0.5, 0.8))
    sizes = draw_sizes(cfg, 64, 32, gen(1))
    assert len(sizes) == 64 and all(32 <= s <= 51 for s in sizes)  # [0.5·64, 0.8·64]
    assert len(set(sizes)) > 10 and max(sizes) < 64  # spread out, never the whole image
    u = torch.rand(64, generator=gen(1), dtype=torch.float64)
    assert sizes == [int(64 * (0.5 + 0.3 * x)) for x in u.tolist()]
    # the cutouts are those crops (exclusive offsets, as Aleph2Image's randint), not views of the whole image
    spy = Spy(monkeypatch)
    img = torch.rand(1, 3, 64, 64, generator=gen(2))
    cuts = make_cutouts(img, cfg.replace(cutn=8, cut_resample="bilinear"), 32, [gen(1)])
    (got, offsets, _, method), = spy.calls
    assert got == sizes[:8] and method == "bilinear"
    assert all(0 <= o < 64 - s + 1 for s, off in zip(got, offsets) for o in off)
    whole = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    assert all((c - whole[0]).abs().max() > 0.05 for c in cuts)
    y, x = offsets[0]
    s = got[0]
    crop = F.interpolate(img[:, :, y : y + s, x : x + s], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cuts[:1], crop, rtol=0, atol=1e-5)


def test_normal_size_law_clips_to_lo_hi():
    cfg = RunConfig(cutn=200, cut="normal", cut_range=(0.7, 0.3, 0.5, 0.9))
    sizes = draw_sizes(cfg, 100, 32, gen(3))
    assert min(sizes) == 50 and max(sizes) == 90  # clipped at both ends (std 0.3 reaches past them)
    assert len(set(sizes)) > 20
    frac = (0.7 + 0.3 * torch.randn(200, generator=gen(3), dtype=torch.float64)).clamp(0.5, 0.9)
    assert sizes == [int(100 * f) for f in frac.tolist()]


def test_cut_pow_skews_crowson_sizes_toward_the_smallest():
    base = RunConfig(cutn=500, cut="crowson")
    u = torch.rand(500, generator=gen(5), dtype=torch.float64)
    for p in (1.0, 3.0):
        sizes = draw_sizes(base.replace(cut_pow=p), 96, 32, gen(5))
        assert sizes == [int(x**p * 64 + 32) for x in u.tolist()]
    flat, skewed = (draw_sizes(base.replace(cut_pow=p), 96, 32, gen(5)) for p in (1.0, 3.0))
    assert sum(skewed) / 500 < sum(flat) / 500 - 15  # means ~64 and ~48
    assert all(a <= b for a, b in zip(skewed, flat)) and min(skewed) >= 32 and max(flat) <= 96


def test_cut_whole_makes_that_fraction_of_the_cutouts_whole_image_views(monkeypatch):
    spy = Spy(monkeypatch)
    img = torch.rand(1, 3, 64, 64, generator=gen(0))
    for whole, n in ((0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)):
        cuts = make_cutouts(img, RunConfig(cutn=8, cut_whole=whole), 32, [gen(1)])
        assert cuts.shape == (8, 3, 32, 32)  # cutn cutouts
        sizes = spy.calls[-1][0]
        assert sizes[8 - n :] == [64] * n
        assert all(s < 64 for s in sizes[: 8 - n]), sizes  # crowson draws (u < 1): never the whole side here


def test_cut_mirror_zooms_out_up_to_m_times_the_side_with_y_and_x_jitter(monkeypatch):
    """The zoomed views are larger than the image (not smaller: zooming *in* would crop it), at most (1 + M)
    times its side, and each axis's offset lies in [side - size, 0] and varies on its own."""
    spy = Spy(monkeypatch)
    img = torch.rand(1, 3, 64, 64, generator=gen(0))
    cfg = RunConfig(cutn=40, cut_whole=0.5, cut_mirror=0.5, cut_affine=0.0)
    make_cutouts(img, cfg, 32, [gen(7)])
    (sizes, offsets, _, _), = spy.calls
    zoomed, offs = sizes[20:], offsets[20:]
    assert all(64 <= s <= 96 for s in zoomed), zoomed
    assert sum(s > 70 for s in zoomed) > 10 and len(set(zoomed)) > 8
    ys, xs = [o[0] for o in offs], [o[1] for o in offs]
    assert all(64 - s <= y <= 0 for s, y in zip(zoomed, ys)), (zoomed, ys)
    assert all(64 - s <= x <= 0 for s, x in zip(zoomed, xs)), (zoomed, xs)
    assert len(set(ys)) > 5 and len(set(xs)) > 5, (ys, xs)  # both axes jitter
    assert ys != xs
    # draw_offsets alone, each axis apart (a non-square image: the two spans differ)
    offs = draw_offsets((64, 96), [100] * 300, 1, gen(0))
    ys, xs = [o[0] for o in offs], [o[1] for o in offs]
    assert (min(ys), max(ys)) == (-36, 0) and (min(xs), max(xs)) == (-4, 0)
    offs = draw_offsets((64, 64), [90] * 300, 1, gen(1))
    for axis in (0, 1):
        values = [o[axis] for o in offs]
        assert (min(values), max(values)) == (-26, 0) and len(set(values)) == 27


def test_cut_flip_mirrors_some_cutouts_horizontally_and_keeps_the_crops():
    img = torch.rand(1, 3, 64, 64, generator=gen(0))
    cfg = RunConfig(cutn=16, cut_affine=0.0)
    plain = make_cutouts(img, cfg, 32, [gen(3)])
    flipped = make_cutouts(img, cfg.replace(cut_flip=True), 32, [gen(3)])
    same = [torch.allclose(f, p, atol=1e-6) for f, p in zip(flipped, plain)]
    mirrored = [torch.allclose(f, p.flip(-1), atol=1e-5) for f, p in zip(flipped, plain)]
    assert all(a or b for a, b in zip(same, mirrored))
    assert 3 <= sum(mirrored) <= 13 and 3 <= sum(same) <= 13  # about half of them


def test_cut_affine_rotates_each_cutout_by_a_seeded_angle_within_the_bound():
    # with the option, the cutouts are the plain ones passed through random_affine, drawing next from the run's generator
    img = torch.rand(1, 3, 64, 64, generator=gen(0))
    cfg = RunConfig(cutn=6, cut_affine=20.0)
    g = gen(9)
    expected = random_affine(make_cutouts(img, cfg.replace(cut_affine=0.0), 32, [g]), 20.0, g)
    torch.testing.assert_close(make_cutouts(img, cfg, 32, [gen(9)]), expected, rtol=0, atol=1e-6)
    # random_affine rotates: a vertical ramp (value = row) gets a horizontal slope of tan(angle) per row
    n, size = 12, 64
    ramp = torch.linspace(-1, 1, size).view(1, 1, size, 1).expand(n, 3, size, size).contiguous()
    angle = (torch.rand(n, generator=gen(11)) * 2 - 1) * math.radians(30.0)  # the draw random_affine makes first
    out = random_affine(ramp, 30.0, gen(11))
    centre = out[:, 0, 16:48, 16:48]  # away from the border padding
    dx = (centre[:, :, 1:] - centre[:, :, :-1]).mean((1, 2))
    dy = (centre[:, 1:] - centre[:, :-1]).mean((1, 2))
    slope = dx / dy
    assert angle.abs().max() <= math.radians(30.0) and angle.abs().max() > math.radians(10.0)
    torch.testing.assert_close(slope, angle.tan(), rtol=0.02, atol=0.005)
    torch.testing.assert_close(random_affine(ramp, 0.0, gen(11)), ramp, rtol=0, atol=1e-5)  # 0 degrees: unchanged


@pytest.mark.parametrize("method", ["lanczos", "bilinear"])
def test_cut_resample_is_lanczos_or_bilinear(method):
    img = torch.rand(1, 3, 64, 64, generator=gen(0))
    cuts = make_cutouts(img, RunConfig(cutn=2, cut_whole=1.0, cut_resample=method), 32, [gen(1)])  # two whole views
    lanczos = resample(img, 32)
    bilinear = F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False)
    want, other = (lanczos, bilinear) if method == "lanczos" else (bilinear, lanczos)
    torch.testing.assert_close(cuts, want.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
    assert (cuts[0] - other[0]).abs().max() > 0.05


# ============================================================================ prompts


def test_story_every_1_switches_the_phrase_every_step(tiny_dvae, tiny_clip):
    assert [phrase_index(k, 1, 2) for k in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [phrase_index(k, 1, 3) for k in range(6)] == [0, 1, 2, 0, 1, 2]
    cfg = cfg_of(prompts=("a red circle ^ a blue square",), story_every=1)
    targets = encode_targets(tiny_clip, cfg.prompts, cfg, [0])
    red, blue = tiny_clip.encode_text(["a red circle", "a blue square"])
    for k in range(6):
        torch.testing.assert_close(targets.at(k)[0][0, 0], (red, blue)[k % 2])
    # in the loop: step k of the story is pulled toward phrase k % 2, as a run of that phrase alone
    story = cfg

    def loss_at(c, k):
        gens = make_generators([0])
        latent = make_latent(c, tiny_dvae.vocab_size, grid_of(c, tiny_dvae), gens)
        step = Step.for_prompts(c, tiny_dvae, tiny_clip, latent, encode_targets(tiny_clip, c.prompts, c, [0]), [0])
        with torch.no_grad():
            return step.forward(gens, k)[0]

    for k in (1, 2, 3):
        alone = cfg_of(prompts=(("a red circle", "a blue square")[k % 2],))
        assert torch.equal(loss_at(story, k), loss_at(alone, k)), k
    assert not torch.equal(loss_at(story, 1), loss_at(cfg_of(prompts=("a red circle",)), 1))


# ============================================================================ latents


def test_softmax_latent_relaxes_to_its_probabilities_and_raises_the_similarity(sharp_dvae, tiny_clip):
    cfg = cfg_of(latent="softmax", init="randn", steps=15, lr=0.5)
    latent = make_latent(cfg, 512, (4, 4), make_generators([0]))
    assert type(latent) is Softmax
    g = gen(5)
    before = g.get_state()
    x = latent.relax([g])
    assert torch.equal(g.get_state(), before)  # deterministic: nothing sampled
    assert torch.equal(x, latent.display("soft"))
    torch.testing.assert_close(x, latent.logits().softmax(1))
    assert torch.allclose(x.sum(1), torch.ones(1, 4, 4)) and x.max() < 0.5  # a soft mix, not a one-hot
    (x[:, 7].sum()).backward()
    assert latent.param.grad.abs().sum() > 0
    r = optimise(cfg, sharp_dvae, tiny_clip)
    assert r.similarities[-3:, 0].mean() > r.similarities[0, 0] + 0.05
    # snapshots decode the display (argmax by default) of the softmax latent
    end = make_latent(cfg, 512, (4, 4), make_generators([0]))
    with torch.no_grad():
        end.param.copy_(r.latent)
    codes = end.display("argmax")
    assert torch.equal(codes.sum(1), torch.ones(1, 4, 4)) and torch.equal(codes.argmax(1), end.display("soft").argmax(1))
    torch.testing.assert_close(r.images, sharp_dvae.decode(codes).clamp(0, 1))


class Vocab8192:
    """The part of OpenAI's dVAE that code_bias reads: an 8192-code vocabulary and the adapter's own
    list of blacklisted codes (nothing is decoded)."""

    vocab_size = 8192
    blacklisted_codes = DalleDecoder.blacklisted_codes


@pytest.mark.parametrize("latent", ["categorical", "parity-softmax"])
def test_blacklist_gives_the_dalle_blacklisted_codes_no_probability(latent):
    codes = dalle_blacklist(8192)
    assert len(codes) == 363
    bias = code_bias(RunConfig(blacklist=True), Vocab8192())
    assert bias.shape == (8192,) and torch.all(bias[codes] == -100.0)
    keep = torch.ones(8192, dtype=torch.bool)
    keep[codes] = False
    assert torch.all(bias[keep] == 0)
    assert code_bias(RunConfig(blacklist=False), Vocab8192()) is None
    dvae_512 = type("V", (), {"vocab_size": 512, "blacklisted_codes": DalleDecoder.blacklisted_codes})()
    assert code_bias(RunConfig(blacklist=True), dvae_512) is None  # other vocabularies: none
    gumbel_f8 = type("G", (), {"vocab_size": 8192, "blacklisted_codes": VQGANDecoder.blacklisted_codes})()
    assert code_bias(RunConfig(blacklist=True), gumbel_f8) is None  # a VQGAN's 8192 codes are not the dVAE's

    cfg = RunConfig(latent=latent, init="randn")
    biased = make_latent(cfg, 8192, (3, 3), make_generators([0]), bias)
    free = make_latent(cfg, 8192, (3, 3), make_generators([0]))
    torch.testing.assert_close(biased.logits()[:, codes], free.logits()[:, codes] - 100.0)
    for lat in (biased, free):
        lat.requires_grad_(False)
    if latent == "categorical":
        p = biased.probs()  # [1, 9, 8192]
        assert p[..., codes].max() < 1e-30 and torch.allclose(p.sum(-1), torch.ones(1, 9))
        hits = {}
        for name, lat in (("biased", biased), ("free", free)):
            gens = make_generators([1])
            drawn = torch.cat([lat.relax(gens).argmax(1).flatten() for _ in range(40)])  # 360 samples
            hits[name] = int(torch.isin(drawn, torch.tensor(codes)).sum())
        assert hits["biased"] == 0 and hits["free"] > 3, hits  # without the bias ~16 would be blacklisted
    else:
        x = biased.relax(make_generators([1]))
        assert x[:, codes].max() < 1e-30
        assert free.relax(make_generators([1]))[:, codes].max() > 1e-6


class PaletteDecoder:
    """A stand-in decoder with OpenAI's 8192 codes: each code is a colour, blown up 8x; it records the codes it decodes."""

    vocab_size, downsample, name = 8192, 8, "palette-8192"

    def __init__(self):
        self.palette = torch.rand(8192, 3, generator=gen(0))
        self.decoded = []

    def decode(self, codes, noise=None):
        self.decoded.append(codes.detach().argmax(1).flatten())
        x = torch.einsum("bvhw,vc->bchw", codes, self.palette)
        return x.repeat_interleave(8, -2).repeat_interleave(8, -1)

    def cast(self, dtype):
        return self

    def describe(self, encoder=False):
        return {"name": self.name}

    def blacklisted_codes(self):
        return dalle_blacklist(self.vocab_size)  # it stands in for OpenAI's dVAE


def test_blacklist_in_the_loop_never_decodes_a_blacklisted_code(tiny_clip):
    cfg = cfg_of(latent="categorical", init="randn", blacklist=True, steps=6, cutn=2)
    decoder = PaletteDecoder()
    optimise(cfg, decoder, tiny_clip)
    drawn = torch.cat(decoder.decoded)
    assert len(drawn) >= 7 * 16 and not torch.isin(drawn, torch.tensor(dalle_blacklist(8192))).any()
    decoder = PaletteDecoder()
    optimise(cfg.replace(blacklist=False), decoder, tiny_clip)
    assert torch.isin(torch.cat(decoder.decoded), torch.tensor(dalle_blacklist(8192))).any()  # the check could fail


def test_init_scale_scales_the_randn_and_one_hot_starts_and_uniform_is_flat():
    one = make_latent(RunConfig(init="randn"), 16, (3, 3), make_generators([2])).logits().detach()
    three = make_latent(RunConfig(init="randn", init_scale=3.0), 16, (3, 3), make_generators([2])).logits().detach()
    torch.testing.assert_close(three, 3.0 * one)
    assert 0.7 < float(one.std()) < 1.3
    hot = make_latent(RunConfig(latent="parity-softmax", init="onehot", init_scale=5.0), 16, (3, 3), make_generators([2])).param
    assert set(hot.unique().tolist()) == {0.0, 5.0} and torch.equal((hot == 5.0).sum(1), torch.ones(1, 3, 3, dtype=torch.long))
    flat = make_latent(RunConfig(init="uniform", init_scale=3.0), 16, (3, 3), make_generators([2])).logits()
    assert torch.equal(flat, torch.zeros_like(flat))


def test_temperature_multiplies_the_logits_and_decays_to_its_floor(tiny_dvae, tiny_clip):
    cfg = RunConfig(temperature=4.0)
    lat = make_latent(cfg, 16, (2, 2), make_generators([0]))
    plain = make_latent(RunConfig(), 16, (2, 2), make_generators([0]))
    torch.testing.assert_close(lat.probs(), (4.0 * plain.combined()).softmax(-1))
    assert not torch.allclose(lat.probs(), plain.probs())
    parity = make_latent(RunConfig(latent="parity-softmax", temperature=4.0), 16, (2, 2), make_generators([0]))
    torch.testing.assert_close(parity.grouped(), 4.0 * parity.param.reshape(1, 8, -1))
    # the schedule: beta_k = max(T / decay^k, floor)
    lat = make_latent(RunConfig(temperature=8.0, temperature_decay=2.0, temperature_floor=1.5), 16, (2, 2), make_generators([0]))
    betas = []
    for _ in range(5):
        betas.append(lat.beta)
        lat.end_step()
    assert betas == [8.0, 4.0, 2.0, 1.5, 1.5]
    lat = make_latent(RunConfig(temperature=8.0, temperature_decay=1.25), 16, (2, 2), make_generators([0]))  # floor 0
    for _ in range(10):
        lat.end_step()
    assert math.isclose(lat.beta, 8.0 / 1.25**10)
    # in the loop: one decay per update (the checkpoint keeps the annealed value)
    run = cfg_of(latent="parity-gumbel", init="randn", temperature=16.0, temperature_decay=1.01, temperature_floor=1.5)
    r = optimise(run, tiny_dvae, tiny_clip)
    assert math.isclose(float(r.checkpoint.latent["_extra_state"]), 16.0 / 1.01**3)


def test_ema_snapshots_decode_the_moving_average_of_the_latent(tiny_dvae, tiny_clip):
    lat = make_latent(RunConfig(ema=0.75), 16, (2, 2), make_generators([0]))
    start = lat.param.detach().clone()
    with torch.no_grad():
        lat.param.add_(4.0)
    lat.end_step()
    torch.testing.assert_close(lat.param_ema, start + 1.0)  # 0.75·start + 0.25·(start + 4)
    with lat.averaged():
        torch.testing.assert_close(lat.param.detach(), start + 1.0)
    torch.testing.assert_close(lat.param.detach(), start + 4.0)  # restored
    # in the loop: the images decode the average, not the last latent
    cfg = cfg_of(ema=0.8, display="soft", lr=0.3)
    r = optimise(cfg, tiny_dvae, tiny_clip)
    end = make_latent(cfg, tiny_dvae.vocab_size, (4, 4), make_generators([0]))
    with torch.no_grad():
        end.param.copy_(r.checkpoint.latent["param_ema"])
    torch.testing.assert_close(r.images, tiny_dvae.decode(end.display("soft")).clamp(0, 1))
    assert not torch.allclose(r.checkpoint.latent["param_ema"], r.latent)
    plain = optimise(cfg.replace(ema=0.0), tiny_dvae, tiny_clip)
    assert torch.equal(plain.latent, r.latent) and not torch.allclose(plain.images, r.images)


@pytest.mark.parametrize("mode", ["argmax", "soft"])
def test_display_mode_chooses_how_the_images_decode(mode, tiny_dvae, tiny_clip):
    cfg = cfg_of(display=mode, lr=0.3)
    r = optimise(cfg, tiny_dvae, tiny_clip)
    end = make_latent(cfg, tiny_dvae.vocab_size, (4, 4), make_generators([0]))
    with torch.no_grad():
        end.param.copy_(r.latent)
    codes = end.display(mode)
    assert torch.allclose(codes.sum(1), torch.ones(1, 4, 4))
    if mode == "argmax":  # one code per position: the most probable
        assert set(codes.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(codes.argmax(1), end.probs().argmax(-1).view(1, 4, 4))
    else:  # the probabilities themselves
        assert codes.max() < 1
        torch.testing.assert_close(codes, end.probs().transpose(1, 2).reshape(1, -1, 4, 4))
    torch.testing.assert_close(r.images, tiny_dvae.decode(codes).clamp(0, 1))


# ============================================================================ the step: loss, regularisers, pixels


def step_of(cfg, decoder, clip, seed=0):
    gens = make_generators([seed])
    latent = make_latent(cfg, decoder.vocab_size, grid_of(cfg, decoder), gens, decoder=decoder)
    return Step.for_prompts(cfg, decoder, clip, latent, encode_targets(clip, cfg.prompts, cfg, [seed]), [seed]), gens


def test_loss_scale_multiplies_the_prompt_loss_and_its_gradient(tiny_dvae, tiny_clip):
    out = {}
    for scale in (1.0, 10.0):
        step, gens = step_of(cfg_of(latent="softmax", loss_scale=scale), tiny_dvae, tiny_clip)
        loss, _ = step.forward(gens, 0, backward=True)
        out[scale] = (loss, step.latent.param.grad.clone())
    torch.testing.assert_close(out[10.0][0], 10 * out[1.0][0])
    torch.testing.assert_close(out[10.0][1], 10 * out[1.0][1], rtol=1e-4, atol=1e-9)


def test_cosine_loss_is_minus_the_similarity_and_spherical_is_not(tiny_dvae, tiny_clip):
    emb, target = torch.randn(1, 5, 8, generator=gen(0)), torch.randn(1, 2, 8, generator=gen(1))
    w = torch.tensor([[2.0, -0.5]])
    want = -(w * cosine_similarities(emb, target).mean(1)).sum(-1)
    torch.testing.assert_close(cosine_loss(emb, target, w, torch.zeros(1, 2)), want)
    for loss in ("cosine", "spherical"):
        step, gens = step_of(cfg_of(loss=loss), tiny_dvae, tiny_clip)
        with torch.no_grad():
            value, sim = step.forward(gens, 0)
        if loss == "cosine":  # one target of weight 1: the loss is minus the reported similarity
            torch.testing.assert_close(value, -sim)
        else:  # half the squared angle, positive
            assert value.item() > 0 and not torch.allclose(value, -sim)


def test_tv_weight_adds_a_quarter_of_the_total_variation(sharp_dvae, tiny_clip):
    losses = {}
    for w in (0.0, 2.0):
        step, gens = step_of(cfg_of(latent="softmax", init_scale=10.0, tv_weight=w), sharp_dvae, tiny_clip)
        with torch.no_grad():
            losses[w] = step.forward(gens, 0)[0]
            img = sharp_dvae.decode(step.latent.relax(None)).clamp(0, 1)  # softmax: no draw, the same image
    tv = tv_loss(img)
    assert tv.item() > 1e-3, tv  # large enough to tell /4 from /2 (in float32 the loss is exact to ~1e-7)
    torch.testing.assert_close(losses[2.0] - losses[0.0], 2.0 / 4 * tv, rtol=1e-4, atol=1e-6)
    # and it is a gradient on the latent, not only a reported number
    grads = {}
    for w in (0.0, 2.0):
        step, gens = step_of(cfg_of(latent="softmax", init_scale=10.0, tv_weight=w), sharp_dvae, tiny_clip)
        step.forward(gens, 0, backward=True)
        grads[w] = step.latent.param.grad
    assert not torch.allclose(grads[0.0], grads[2.0])


class RampDecoder:
    """Decodes to pixels of 1.5 times the code weights summed: above the [0, 1] range wherever the codes say so."""

    vocab_size, downsample, name = 4, 8, "ramp"

    def decode(self, codes, noise=None):
        x = 1.5 * codes.sum(1, keepdim=True).repeat_interleave(8, -2).repeat_interleave(8, -1).expand(-1, 3, -1, -1)
        return x if noise is None else x + noise

    def cast(self, dtype):
        return self

    def describe(self, encoder=False):
        return {"name": self.name}

    def blacklisted_codes(self):
        return []


def test_clamp_grad_lets_the_gradient_bring_out_of_range_pixels_back(tiny_clip):
    codes = torch.ones(1, 4, 2, 2) / 4  # decodes to 1.5 everywhere: above the range
    grads = {}
    for clamp in (True, False):
        step, _ = step_of(cfg_of(size=16, clamp_grad=clamp), RampDecoder(), tiny_clip)
        x = codes.clone().requires_grad_()
        pixels = step.renderer.decode(x)
        assert pixels.max() == 1.0
        pixels.sum().backward()  # descent lowers the pixels: back toward the range
        grads[clamp] = x.grad
    assert torch.all(grads[True] > 0) and torch.all(grads[False] == 0)
    # and it does not push further out: the gradient of -sum (descent raises the pixels) is cut either way
    step, _ = step_of(cfg_of(size=16, clamp_grad=True), RampDecoder(), tiny_clip)
    x = codes.clone().requires_grad_()
    (-step.renderer.decode(x).sum()).backward()
    assert torch.all(x.grad == 0)


def test_noise_scale_scales_laplace_pixel_noise_from_the_runs_generator(tiny_clip):
    shape = (3, 16, 16)
    step, _ = step_of(cfg_of(size=16, noise_scale=2.5), RampDecoder(), tiny_clip)
    noise = step.renderer.noise([gen(3)], shape)
    torch.testing.assert_close(noise, 2.5 * laplace_noise(shape, [gen(3)], "cpu"))
    assert 2.0 < float(noise.abs().mean()) < 3.0  # Laplace(0, 2.5): mean |x| = 2.5
    off, _ = step_of(cfg_of(size=16), RampDecoder(), tiny_clip)
    assert off.renderer.noise([gen(3)], shape) is None
    codes = torch.full((1, 4, 2, 2), 0.1)  # pixels 0.6, inside the range
    assert not torch.equal(step.renderer.decode(codes, noise), off.renderer.decode(codes))


def test_display_noise_samples_pixel_noise_in_snapshots_seeded_by_seed_and_step(tiny_dvae, tiny_clip):
    cfg = cfg_of(noise_scale=1.0, display_noise=True)
    step, _ = step_of(cfg, tiny_dvae, tiny_clip, seed=4)
    quiet, _ = step_of(cfg.replace(display_noise=False), tiny_dvae, tiny_clip, seed=4)
    codes = step.latent.display("argmax")
    want = tiny_dvae.decode(codes, laplace_noise((3, 32, 32), [gen(display_seed(4, 7))], "cpu")).clamp(0, 1)
    torch.testing.assert_close(step.display(7), want)
    torch.testing.assert_close(quiet.display(7), tiny_dvae.decode(codes).clamp(0, 1))
    assert not torch.allclose(step.display(7), quiet.display(7))
    assert torch.equal(step.display(7), step.display(7)) and not torch.equal(step.display(7), step.display(8))
    no_noise, _ = step_of(cfg.replace(noise_scale=0.0), tiny_dvae, tiny_clip, seed=4)  # nothing to sample
    torch.testing.assert_close(no_noise.display(7), quiet.display(7))


def test_bf16_precision_casts_decoder_and_clip_and_keeps_the_latent_fp32(tiny_dvae, tiny_clip):
    fp32, gens32 = step_of(cfg_of(latent="softmax"), tiny_dvae, tiny_clip)
    bf16, gens16 = step_of(cfg_of(latent="softmax", precision="bf16"), tiny_dvae, tiny_clip)
    assert fp32.renderer.decoder.dtype == torch.float32 and fp32.objective.guide.clip.dtype == torch.float32
    assert bf16.renderer.decoder.dtype == torch.bfloat16 and bf16.objective.guide.clip.dtype == torch.bfloat16
    a, _ = fp32.forward(gens32, 0, backward=True)
    b, _ = bf16.forward(gens16, 0, backward=True)
    assert a.dtype == b.dtype == torch.float32 and bf16.latent.param.grad.dtype == torch.float32
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05)  # bf16 rounding only
    cos = F.cosine_similarity(fp32.latent.param.grad.flatten(), bf16.latent.param.grad.flatten(), dim=0)
    assert cos > 0.8


def test_cut_batch_chunks_clips_backward_with_the_same_result(tiny_dvae, tiny_clip):
    cfg = cfg_of(cutn=5, tv_weight=0.5, batch=2)
    whole = optimise(cfg, tiny_dvae, tiny_clip)
    for k in (1, 2):
        chunked = optimise(cfg.replace(cut_batch=k), tiny_dvae, tiny_clip)
        torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.latent, whole.latent, rtol=1e-4, atol=2e-4)


# ============================================================================ optimiser and learning rate


def test_lr_warmup_ramps_the_learning_rate_in_the_loop(tiny_dvae, tiny_clip):
    cfg = cfg_of(lr=0.2, lr_warmup=4)
    assert [lr_at(cfg, k) for k in range(6)] == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    start = make_latent(cfg, tiny_dvae.vocab_size, (4, 4), make_generators([0])).param.detach()
    for c, first in ((cfg, 0.05), (cfg.replace(lr_warmup=0), 0.2)):
        r = optimise(c.replace(steps=1), tiny_dvae, tiny_clip)
        # Adam's first update moves every coordinate with a gradient by lr·g/|g| = ±lr
        assert float((r.latent - start).abs().max()) == pytest.approx(first, rel=1e-3)
    r = optimise(cfg.replace(steps=3), tiny_dvae, tiny_clip)
    assert r.checkpoint.optimiser["param_groups"][0]["lr"] == pytest.approx(0.15)  # the last update's


def test_lr_growth_multiplies_the_loops_learning_rate_every_step(tiny_dvae, tiny_clip):
    cfg = cfg_of(lr=0.1, lr_growth=1.5, steps=4)
    seen = []
    r = optimise(cfg, tiny_dvae, tiny_clip, lambda s: seen.append(s.lr))
    assert seen == pytest.approx([0.1 * 1.5**k for k in range(5)])
    assert r.checkpoint.optimiser["param_groups"][0]["lr"] == pytest.approx(0.1 * 1.5**3)


def test_optimiser_and_weight_decay(tiny_dvae):
    p = torch.nn.Parameter(torch.ones(5))
    opt = make_optimiser(RunConfig(optimiser="adamw", lr=0.1, weight_decay=0.5), [p])
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["weight_decay"] == 0.5
    p.grad = torch.zeros(5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((5,), 1 - 0.1 * 0.5))  # decoupled decay, no gradient
    q = torch.nn.Parameter(torch.ones(5))
    opt = make_optimiser(RunConfig(optimiser="adam", lr=0.1), [q])
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["weight_decay"] == 0
    q.grad = torch.zeros(5)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(5))  # Adam takes no weight decay
    with pytest.raises(ConfigError, match="--weight-decay 0.5: --optimiser adam"):
        RunConfig(optimiser="adam", lr=0.1, weight_decay=0.5)


def test_batch_runs_consecutive_seeds_each_as_alone(tiny_dvae, tiny_clip):
    cfg = cfg_of(batch=2, seed=5, steps=2, size=48)
    r = optimise(cfg, tiny_dvae, tiny_clip)
    assert r.runs == [(PROMPT, 5), (PROMPT, 6)] and r.images.shape == (2, 3, 48, 48)
    alone = optimise(cfg.replace(batch=1, seed=6), tiny_dvae, tiny_clip)
    torch.testing.assert_close(r.latent[1:], alone.latent, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(r.latent[0], r.latent[1])


def test_device_runs_the_loop_there_from_the_same_draws(tiny_dvae, tiny_clip, test_device):
    """On the test device (pytest --device cuda, or CLIPGUIDE_TEST_DEVICE; the CPU by default) the
    loop starts from the CPU's draws: the same first loss, to float tolerance."""
    import copy

    cpu = optimise(cfg_of(steps=1), tiny_dvae, tiny_clip)
    decoder, clip = copy.deepcopy(tiny_dvae).to(test_device), copy.deepcopy(tiny_clip).to(test_device)
    there = optimise(cfg_of(steps=1, device=test_device), decoder, clip)
    assert there.config.device == test_device and there.images.device.type == "cpu"
    torch.testing.assert_close(there.losses[0], cpu.losses[0], rtol=1e-3, atol=1e-4)


# ============================================================================ every field is covered

# fields whose effect is checked in another file: field -> the test that checks it
CHECKED_ELSEWHERE = {
    "snapshot_every": "test_snapshot_every.py::test_files_manifest_and_result_hold_every_multiple",
    "optimiser_options": "test_optimisers.py::test_options_reach_the_optimiser_and_change_its_steps",
    "init_noise": "test_init_noise.py::test_the_run_starts_from_the_encoding_of_its_seeds_image",
    "augments": "test_augments.py::test_each_augment_changes_the_cutouts_and_the_gradient_reaches_the_image",
    "cut_noise_each": "test_augments.py::test_cut_noise_each_draws_one_strength_per_cutout",
    "init_pull": "test_augments.py::test_init_pull_zero_decay_pulls_toward_zero_with_weight_over_2_step_plus_1",
    "compile": "test_gpu_path.py::test_compile_compiles_the_decoder_and_clip_and_keeps_the_arithmetic",
    "prompts": "test_loop.py::test_run_in_batch_starts_like_solo_run",
    "seed": "test_loop.py::test_same_seed_same_image_bit_for_bit",
    "steps": "test_loop.py::test_snapshot_k_equals_final_image_of_k_step_run",
    "snapshots": "test_loop.py::test_snapshot_k_equals_final_image_of_k_step_run",
    "decoder": "test_cli.py::test_generate_end_to_end",
    "clip": "test_cli.py::test_generate_end_to_end",
    "device": "test_newcomer.py::test_device_auto_resolves_and_the_manifest_records_the_device_used",
    "latent": "test_loop.py::test_parity_softmax_is_two_softmaxes_per_position",
    "init": "test_loop.py::test_onehot_init_and_codes_init",
    "init_codes": "test_loop.py::test_onehot_init_and_codes_init",
    "pyramid": "test_pyramid.py::test_coarse_grids_are_upsampled_nearest_and_added",
    "pyramid_every": "test_pyramid.py::test_coarse_to_fine_levels_learn_from_their_steps",
    "init_image": "test_prompts.py::test_dvae_init_image_starts_from_the_encoders_logits_and_pull_is_toward_it",
    "zoom_every": "test_zoom.py::test_the_image_after_a_zoom_step_is_the_encoding_of_the_zoomed_image_before_it",
    "zoom_scale": "test_zoom.py::test_the_image_after_a_zoom_step_is_the_encoding_of_the_zoomed_image_before_it",
    "zoom_shift": "test_zoom.py::test_the_image_after_a_zoom_step_is_the_encoding_of_the_zoomed_image_before_it",
    "init_weight": "test_vqgan.py::test_init_weight_pulls_toward_the_initial_z_not_zero",
    "cutn": "test_loop.py::test_cutout_augmentations_are_seeded_and_whole_views_see_everything",
    "cut_clamp": "test_faithful.py::test_crowson_cutouts_are_clamped_as_makecutouts",
    "cut_roll": "test_loop.py::test_cut_roll_cuts_the_image_shifted_round_by_a_seeded_amount",
    "lr": "test_loop.py::test_lr_growth_and_temperature_decay",
    "prior": "test_prior.py::test_a_run_with_a_prior_is_reproducible_records_it_and_resumes_bit_for_bit",
    "prior_candidates": "test_prior.py::test_the_run_starts_from_the_candidate_clip_rates_best",
    "prior_weight": "test_prior.py::test_the_prior_term_adds_its_nll_to_the_loss",
    "prior_shortlist": "test_prior.py::test_a_shortlist_starts_from_the_full_score_best_of_the_candidates_the_glance_rates_best",
    "prior_resample": "test_prior.py::test_resampling_starts_from_the_best_of_the_candidates_and_their_completions",
    "prior_clip": "test_prior.py::test_another_clip_rates_the_proposals_when_the_config_names_one",
    "prior_resample_top": "test_prior.py::test_resampling_starts_from_the_best_of_the_candidates_and_their_completions",
    "prior_keep": "test_prior.py::test_resampling_starts_from_the_best_of_the_candidates_and_their_completions",
    "height": "test_sizes.py::test_a_non_square_run_writes_its_size_everywhere_and_resumes_bit_for_bit",
}

# fields whose effect a test in this file checks: field -> test
CHECKED_HERE = {
    "batch": test_batch_runs_consecutive_seeds_each_as_alone,
    "story_every": test_story_every_1_switches_the_phrase_every_step,
    "size": test_batch_runs_consecutive_seeds_each_as_alone,
    "precision": test_bf16_precision_casts_decoder_and_clip_and_keeps_the_latent_fp32,
    "latent": test_softmax_latent_relaxes_to_its_probabilities_and_raises_the_similarity,
    "init_scale": test_init_scale_scales_the_randn_and_one_hot_starts_and_uniform_is_flat,
    "temperature": test_temperature_multiplies_the_logits_and_decays_to_its_floor,
    "temperature_decay": test_temperature_multiplies_the_logits_and_decays_to_its_floor,
    "temperature_floor": test_temperature_multiplies_the_logits_and_decays_to_its_floor,
    "blacklist": test_blacklist_gives_the_dalle_blacklisted_codes_no_probability,
    "noise_scale": test_noise_scale_scales_laplace_pixel_noise_from_the_runs_generator,
    "display_noise": test_display_noise_samples_pixel_noise_in_snapshots_seeded_by_seed_and_step,
    "clamp_grad": test_clamp_grad_lets_the_gradient_bring_out_of_range_pixels_back,
    "display": test_display_mode_chooses_how_the_images_decode,
    "ema": test_ema_snapshots_decode_the_moving_average_of_the_latent,
    "cutn": test_cut_whole_makes_that_fraction_of_the_cutouts_whole_image_views,
    "cut_batch": test_cut_batch_chunks_clips_backward_with_the_same_result,
    "cut": test_normal_size_law_clips_to_lo_hi,
    "cut_pow": test_cut_pow_skews_crowson_sizes_toward_the_smallest,
    "cut_range": test_uniform_size_law_draws_sizes_between_lo_and_hi_of_the_side,
    "cut_resample": test_cut_resample_is_lanczos_or_bilinear,
    "cut_noise": test_cut_noise_adds_gaussian_noise_of_std_cut_noise_times_one_uniform_draw,
    "cut_flip": test_cut_flip_mirrors_some_cutouts_horizontally_and_keeps_the_crops,
    "cut_affine": test_cut_affine_rotates_each_cutout_by_a_seeded_angle_within_the_bound,
    "cut_whole": test_cut_whole_makes_that_fraction_of_the_cutouts_whole_image_views,
    "cut_mirror": test_cut_mirror_zooms_out_up_to_m_times_the_side_with_y_and_x_jitter,
    "loss": test_cosine_loss_is_minus_the_similarity_and_spherical_is_not,
    "loss_scale": test_loss_scale_multiplies_the_prompt_loss_and_its_gradient,
    "tv_weight": test_tv_weight_adds_a_quarter_of_the_total_variation,
    "optimiser": test_optimiser_and_weight_decay,
    "lr": test_lr_warmup_ramps_the_learning_rate_in_the_loop,
    "lr_growth": test_lr_growth_multiplies_the_loops_learning_rate_every_step,
    "lr_warmup": test_lr_warmup_ramps_the_learning_rate_in_the_loop,
    "weight_decay": test_optimiser_and_weight_decay,
}


def test_every_config_field_has_an_effect_test():
    """A new RunConfig field needs a test of its effect, here or named in CHECKED_ELSEWHERE."""
    from pathlib import Path

    fields = {f.name for f in dataclasses.fields(RunConfig)}
    missing = sorted(fields - set(CHECKED_HERE) - set(CHECKED_ELSEWHERE))
    assert not missing, f"RunConfig fields without a test of their effect: {missing}"
    assert not (set(CHECKED_HERE) | set(CHECKED_ELSEWHERE)) - fields, "a listed field no longer exists"
    here = Path(__file__).parent
    for field, where in CHECKED_ELSEWHERE.items():  # the named tests exist
        path, name = where.split("::")
        assert f"def {name}(" in (here / path).read_text(), (field, where)
