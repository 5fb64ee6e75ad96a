"""The Crowson presets against Crowson's notebooks, written out (docs/methods.md §1-§4).

The notebooks' own operations -- ClampWithGrad, ReplaceGrad, MakeCutouts (one crop and one
resample per cutout, with Crowson's Lanczos resample, then the clamp), vector_quantize, the Prompt
loss with its signed stop -- are spelled out once, in tests/reference.py, and one optimisation step
of each Crowson preset is compared with them on the same tensors: the same models, the same initial
latent, and the same random draws (the categorical sample, the Laplace noise and the crop boxes
come from a copy of the run's own generator, in the order the run draws them).  The same is done for
nerdyrodent's generate.py (docs/methods.md §6) and the vqgan-nerdyrodent preset: its pooled MakeCutouts with
Kornia's augmentations (seeded from the run's generator), its per-cutout noise and its decaying init_weight pull."""

import pytest
import torch
import torch.nn.functional as F

from clipguide.engine.cutouts import draw_offsets, draw_sizes, make_cutouts
from clipguide.engine.latents import make_latent
from clipguide.engine.losses import spherical_loss
from clipguide.engine.ops import laplace_noise
from clipguide.engine.loop import Step
from clipguide.engine.loop import code_bias, grid_of, make_optimiser
from clipguide.engine.state import make_generators
from clipguide.presets import get_preset
from clipguide.engine.prompts import encode_targets
from clipguide.testing import random_vqgan
from reference import ClampWithGrad, ReplaceGrad, notebook_cutouts, notebook_prompt, notebook_vector_quantize, resample

# tiny taming autoencoders (f=4), as in tests/test_vqgan.py
TINY_DD = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
TINY_VQ = {"ddconfig": TINY_DD, "n_embed": 64, "embed_dim": 8}
TINY_GUMBEL = {"ddconfig": {**TINY_DD, "z_channels": 8}, "n_embed": 32, "embed_dim": 8, "quantizer": "gumbel"}
PROMPT = "a rainbow cube | blurry:-0.5:-1"  # a negative target whose stop cuts its gradient (signed distance)


# ----------------------------------------------------------------------------- the notebooks' operations
# ReplaceGrad, ClampWithGrad, vector_quantize, MakeCutouts (with Crowson's resample) and the Prompt loss
# are written out once, in tests/reference.py.


def notebook_loss(img, clip, targets, boxes):
    """Normalise, encode the cutouts, sum the prompts' losses (the notebooks' training step)."""
    cuts = notebook_cutouts(img, boxes, clip.image_size)
    emb = clip.visual((cuts - clip.mean) / clip.std).float()
    return sum(notebook_prompt(emb, embed[None], weight, stop) for embed, weight, stop in targets)


# ----------------------------------------------------------------------------- clipguide's step and the reference


def draws(cfg, g, size, cut_size, sample=None, noise_shape=None):
    """The run's draws in its order: a categorical sample, Laplace noise, then the crop boxes."""
    idx = sample(g) if sample else None
    noise = cfg.noise_scale * laplace_noise(noise_shape, [g], "cpu")[0] if cfg.noise_scale else None
    sizes = draw_sizes(cfg, size, cut_size, g)
    return idx, noise, list(zip(sizes, draw_offsets((size, size), sizes, 1, g)))


def clipguide_step(cfg, decoder, clip):
    """One backward of clipguide's loop: (initial latent, its gradient, the generator state it drew from)."""
    gens = make_generators([cfg.seed])
    latent = make_latent(cfg, decoder.vocab_size, grid_of(cfg, decoder), gens, code_bias(cfg, decoder), decoder=decoder)
    start = latent.param.detach().clone()
    state = gens[0].get_state()
    step = Step.for_prompts(cfg, decoder, clip, latent, encode_targets(clip, list(cfg.prompts), cfg, [cfg.seed]), [cfg.seed])
    step.forward(gens, 0, backward=True)
    return start, latent.param.grad[0], state


def text_targets(clip):
    return [(clip.encode_text(["a rainbow cube"])[0], 1.0, -float("inf")), (clip.encode_text(["blurry"])[0], -0.5, -1.0)]


def reference_categorical(cfg, decoder, clip, start, state, to_pixels):
    """The codebook-sampling notebooks (§2, §3): straight-through categorical one-hot, then ``to_pixels``."""
    logits = start[0].clone().requires_grad_()  # [h·w, V]
    g = torch.Generator().set_state(state)
    probs = logits.softmax(1)
    h, w = grid_of(cfg, decoder)
    idx, noise, boxes = draws(cfg, g, cfg.size, clip.image_size,
                              sample=lambda g: torch.multinomial(probs.detach(), 1, generator=g)[:, 0],
                              noise_shape=(3, cfg.size, cfg.size))
    one_hot = F.one_hot(idx, decoder.vocab_size).to(probs.dtype)
    z = ReplaceGrad.apply(one_hot, probs).view(1, h, w, -1)
    img = ClampWithGrad.apply(to_pixels(z, noise), 0, 1)
    notebook_loss(img, clip, text_targets(clip), boxes).backward()
    return logits.grad


def dvae_pixels(decoder):
    """synth() of the dVAE notebook (§2): decoder, Laplace sample of loc, sigmoid, unmap."""
    def to_pixels(z, noise):
        out = decoder.module(z.permute(0, 3, 1, 2).contiguous()).float()
        loc = out[:, :3] + out[:, 3:6].exp() * noise[None]
        return (torch.sigmoid(loc) - 0.1) / 0.8
    return to_pixels


def vqgan_pixels(decoder):
    """synth() of the VQGAN codebook notebook (§3): one-hot @ codebook, decode, to [0, 1]."""
    def to_pixels(z, noise):
        z = (z @ decoder.codebook).permute(0, 3, 1, 2)
        return (decoder.decoder(decoder.post_quant_conv(z)) + 1) / 2
    return to_pixels


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def vqgan():
    return random_vqgan(TINY_VQ, seed=1)


def crowson(name, **kw):
    return get_preset(name).replace(**{"prompts": (PROMPT,), "size": 64, "cutn": 6, "steps": 1, "device": "cpu", **kw})


@pytest.mark.parametrize("name", ["dvae-codebook", "vqgan-codebook", "vqgan-gumbel"])
def test_codebook_presets_step_as_the_notebook(name, tiny_dvae, tiny_clip, vqgan):
    decoder = tiny_dvae if name == "dvae-codebook" else random_vqgan(TINY_GUMBEL, seed=2) if name == "vqgan-gumbel" else vqgan
    cfg = crowson(name)
    start, grad, state = clipguide_step(cfg, decoder, tiny_clip)
    to_pixels = dvae_pixels(decoder) if name == "dvae-codebook" else vqgan_pixels(decoder)
    want = reference_categorical(cfg, decoder, tiny_clip, start, state, to_pixels)
    assert relative(grad, want) < 1e-4, relative(grad, want)


def test_zquantize_preset_steps_as_the_notebook(tiny_clip, vqgan):
    cfg = crowson("vqgan-zquantize")
    start, grad, state = clipguide_step(cfg, vqgan, tiny_clip)
    z = start.clone().requires_grad_()  # [1, e_dim, h, w]
    _, _, boxes = draws(cfg, torch.Generator().set_state(state), cfg.size, tiny_clip.image_size)
    z_q = notebook_vector_quantize(z.movedim(1, 3), vqgan.codebook).movedim(3, 1)
    img = ClampWithGrad.apply((vqgan.decoder(vqgan.post_quant_conv(z_q)) + 1) / 2, 0, 1)
    notebook_loss(img, tiny_clip, text_targets(tiny_clip), boxes).backward()
    assert relative(grad, z.grad[0]) < 1e-4, relative(grad, z.grad[0])


def test_crowson_cutouts_are_clamped_as_makecutouts():
    cfg = crowson("dvae-codebook", cutn=16, noise_scale=0.0)  # the cutouts alone: no pixel noise drawn
    # Hard edges between levels inside (0, 1): the Lanczos resize overshoots [0, 1] around them, and no
    # pixel sits exactly on a bound, where float rounding alone would decide ClampWithGrad's gradient.
    img = torch.full((1, 3, 64, 64), 0.02)
    img[..., 16:48, 16:48] = 0.98
    img.requires_grad_()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    cuts = make_cutouts(img, cfg, 24, [g])
    assert cuts.min() >= 0 and cuts.max() <= 1
    _, _, boxes = draws(cfg, torch.Generator().set_state(state), 64, 24)
    ref_img = img.detach().clone().requires_grad_()
    want = notebook_cutouts(ref_img, boxes, 24)
    unclamped = torch.cat([resample(img.detach()[:, :, y : y + s, x : x + s], 24) for s, (y, x) in boxes])
    assert unclamped.min() < -0.01 and unclamped.max() > 1.01  # so the clamp matters here
    assert torch.allclose(cuts, want, atol=1e-5)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(4))
    (cuts * weights).sum().backward()
    (want * weights).sum().backward()
    assert relative(img.grad, ref_img.grad) < 1e-5


@pytest.mark.parametrize("weight,stop", [(1.0, -float("inf")), (0.7, 1.0), (0.7, 1.5), (-0.5, 0.2), (-1.0, -1.2),
                                         (-1.0, -0.5), (-2.0, -float("inf")), (1.0, 0.0)])
def test_prompt_loss_and_its_stop_as_crowson(weight, stop):
    g = torch.Generator().manual_seed(5)
    embeds = torch.randn(1, 12, 16, generator=g)  # one run, 12 cutouts
    embed = torch.randn(16, generator=g)
    mine_in, ref_in = embeds.clone().requires_grad_(), embeds[0].clone().requires_grad_()
    mine = spherical_loss(mine_in, embed[None, None], torch.tensor([[weight]]), torch.tensor([[stop]]))
    want = notebook_prompt(ref_in, embed[None], weight, stop)
    mine.sum().backward()
    want.backward()
    assert torch.allclose(mine[0], want, atol=1e-6)
    assert torch.allclose(mine_in.grad[0], ref_in.grad, atol=1e-7, rtol=1e-5)


def test_a_negative_prompt_past_its_stop_stops_pushing():
    """'blue:-0.5:0.2' (the README's example before): the signed distance -d is below 0.2 everywhere, so
    nothing pushes (the unsigned stop pushed wherever d > 0.2)."""
    embeds = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(6), requires_grad=True)
    loss = spherical_loss(embeds, torch.randn(1, 1, 16, generator=torch.Generator().manual_seed(179)), torch.tensor([[-0.5]]), torch.tensor([[0.2]]))
    loss.sum().backward()
    assert torch.count_nonzero(embeds.grad) == 0


# ----------------------------------------------------------------------------- nerdyrodent's generate.py (§6)


def nerdyrodent_augments():
    """generate.py's default -aug Af Pe Ji Er with its parameters, built here (not from clipguide's table).
    Kornia 0.5.4's ColorJitter, which generate.py pins, is today's ColorJiggle."""
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomAffine(degrees=15, translate=0.1, shear=5, p=0.7, padding_mode="zeros", keepdim=True),
        K.RandomPerspective(distortion_scale=0.7, p=0.7),
        K.ColorJiggle(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, p=0.7),
        K.RandomErasing(scale=(0.1, 0.4), ratio=(0.3, 1 / 0.3), same_on_batch=True, p=0.7))


def nerdyrodent_cutouts(img, cutn, cut_size, g):
    """generate.py's MakeCutouts ("latest"): cutn copies of (adaptive avg pool + adaptive max pool)/2 of the whole
    image, the augmentations on the batch, then noise U(0, 0.1) per cutout times N(0, 1); no clamp.  Its global
    RNG draws come from ``g`` in the run's order: a seed for Kornia's draws, the noise strengths, the noise."""
    cutouts = [(F.adaptive_avg_pool2d(img, cut_size) + F.adaptive_max_pool2d(img, cut_size)) / 2 for _ in range(cutn)]
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = nerdyrodent_augments()(torch.cat(cutouts, dim=0))
    facs = batch.new_empty([cutn, 1, 1, 1]).uniform_(0, 0.1, generator=g)
    return batch + facs * torch.randn(batch.shape, generator=g)


def nerdyrodent_step(cfg, vqgan, clip, start, state, i):
    """ascend_txt() of generate.py at iteration ``i``: synth (vector_quantize, decode, ClampWithGrad), the cutouts
    normalised and encoded, the init_weight term MSE(z, 0) · (1/(2i + 1) · init_weight)/2, the prompts' losses."""
    z = start.clone().requires_grad_()
    z_q = notebook_vector_quantize(z.movedim(1, 3), vqgan.codebook).movedim(3, 1)
    out = ClampWithGrad.apply((vqgan.decoder(vqgan.post_quant_conv(z_q)) + 1) / 2, 0, 1)
    cuts = nerdyrodent_cutouts(out, cfg.cutn, clip.image_size, torch.Generator().set_state(state))
    iii = clip.visual((cuts - clip.mean) / clip.std).float()
    result = [F.mse_loss(z, torch.zeros_like(z)) * ((1 / torch.tensor(i * 2 + 1)) * cfg.init_weight) / 2]
    result += [notebook_prompt(iii, embed[None], weight, stop) for embed, weight, stop in text_targets(clip)]
    loss = sum(result)
    loss.backward()
    return loss.detach(), z.grad[0]


@pytest.mark.parametrize("init_weight", [0.0, 40.0])
def test_nerdyrodent_preset_steps_as_generate_py(tiny_clip, vqgan, init_weight):
    pytest.importorskip("kornia")
    cfg = crowson("vqgan-nerdyrodent", init_weight=init_weight)
    gens = make_generators([cfg.seed])
    latent = make_latent(cfg, vqgan.vocab_size, grid_of(cfg, vqgan), gens, decoder=vqgan)
    start, state, i = latent.param.detach().clone(), gens[0].get_state(), 2  # at iteration 2 the pull weighs 1/5
    step = Step.for_prompts(cfg, vqgan, tiny_clip, latent, encode_targets(tiny_clip, list(cfg.prompts), cfg, [cfg.seed]), [cfg.seed])
    loss, _ = step.forward(gens, i, backward=True)
    want_loss, want_grad = nerdyrodent_step(cfg, vqgan, tiny_clip, start, state, i)
    assert abs(float(loss[0]) - float(want_loss)) < 1e-5 * abs(float(want_loss)), (loss, want_loss)
    assert relative(latent.param.grad[0], want_grad) < 1e-4, relative(latent.param.grad[0], want_grad)
    if init_weight:  # the pull matters here, and it is toward zero
        _, free = nerdyrodent_step(cfg.replace(init_weight=0.0), vqgan, tiny_clip, start, state, i)
        assert relative(want_grad, free) > 0.05
    # the update: Adam 0.1 on that gradient, then z clamped per channel to the codebook's range (train())
    z = start.clone().requires_grad_()
    z.grad = latent.param.grad.clone()
    torch.optim.Adam([z], lr=0.1).step()
    box = vqgan.codebook
    z_min, z_max = box.min(dim=0).values[None, :, None, None], box.max(dim=0).values[None, :, None, None]
    with torch.no_grad():
        z.copy_(z.maximum(z_min).minimum(z_max))
    step.latent.param.grad = latent.param.grad
    make_optimiser(cfg, [latent.param]).step()
    latent.end_step()
    assert torch.allclose(latent.param, z, atol=1e-6)
