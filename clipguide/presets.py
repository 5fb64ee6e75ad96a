"""Presets: named :class:`RunConfig` values reproducing the 2021 recipes.

Every preset is faithful to its notebook as docs/methods.md describes it unless its
``deviations`` say otherwise; :data:`COMMON_DEVIATIONS` are those of all the notebook
presets (``clipguide presets`` prints both).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .config import RunConfig, rated_candidates
from .errors import ConfigError

REAL = dict(decoder="dalle", clip="ViT-B-32/openai")


ALEPH = dict(**REAL, size=512, loss="cosine", loss_scale=10.0, optimiser="adam", clamp_grad=False, cutn=64, cut_resample="bilinear", steps=10000)


# Deviations of every notebook preset from its notebook (tests/test_faithful.py compares one step of
# each Crowson preset with the notebook's operations on the same draws).
COMMON_DEVIATIONS = (
    "randomness comes from per-run torch.Generators instead of the global RNG, so the numbers drawn differ from "
    "the notebooks' (the distributions do not)",
    "CLIP is open_clip's port of OpenAI's ViT-B/32 (QuickGELU), not clip.load with jit=True (which only ran on "
    "torch 1.7.1)",
    "the notebooks ran until interrupted or for 10 000 steps; steps bounds the run",
    "the cutouts are cropped and resized by two batched matrix products per run instead of one resample call per "
    "cutout: the same arithmetic up to float rounding (a pixel that rounding puts just outside [0, 1] can flip "
    "ClampWithGrad's gradient there, as any change of summation order would)",
)


@dataclass(frozen=True)
class Preset:
    name: str
    config: RunConfig
    summary: str
    deviations: str = ""


PRESETS: dict[str, Preset] = {}


def _add(name: str, summary: str, deviations: str = "", **fields) -> None:
    PRESETS[name] = Preset(name, RunConfig(**fields), summary, deviations)


_add(
    "dvae-codebook",
    "Crowson's 'OpenAI dVAE+CLIP' (2021): straight-through categorical sampling over the DALL-E "
    "codebook, AdamW 0.05, spherical-distance loss, Laplace output sampling, code blacklist (docs/methods.md §2).",
    "The notebook loops until interrupted; here 1000 steps by default. Snapshots decode the argmax "
    "tokens with a Laplace pixel sample seeded by (seed, step), as the notebook's checkin samples.",
    **REAL, size=480, steps=1000, latent="categorical", init="randn", blacklist=True, noise_scale=1.0,
    display_noise=True, display="argmax", cutn=64, cut="crowson", cut_pow=1.0, cut_resample="lanczos", cut_clamp=True,
    loss="spherical", optimiser="adamw", lr=0.05,
)


_add(
    "aleph2image-delta",
    "advadnoun's Aleph2Image (Delta): exact one-hot init, parity-split softmax, 64 cutouts of 0.8-0.99 "
    "bilinear + shared noise, -10·cosine loss, Adam 0.05 with lr ×1.005 per step, 'sharpie' decode (docs/methods.md §5.1).",
    "The notebook displays the soft mix at its checkins and the 'sharpie' (per-parity-group argmax) decode "
    "once at the end; here every snapshot is the sharpie decode, so a snapshot at step k is the image a "
    "k-step run ends on (pass --display soft for the checkin view).",
    **ALEPH, latent="parity-softmax", init="onehot", display="sharpie", cut="uniform",
    cut_range=(0.8, 0.99), cut_noise=0.2, lr=0.05, lr_growth=1.005,
)


_add(
    "aleph2image",
    "advadnoun's first Aleph2Image (Jan 2021): randn logits, Gumbel-softmax (τ=1) over the spatial "
    "positions of each code, 64 cutouts of N(0.8, 0.3) clipped to 0.5-0.98, -10·cosine loss, Adam 0.1 (docs/methods.md §5.2).",
    "The notebook's checkin decodes a fresh Gumbel sample; snapshots here decode the noise-free softmax, "
    "so they are deterministic.",
    **ALEPH, latent="spatial-gumbel", init="randn", display="soft", cut="normal",
    cut_range=(0.8, 0.3, 0.5, 0.98), lr=0.1,
)


_add(
    "aleph2image-gamma",
    "Aleph2Image (Gamma): one-hot init on codes 4846/4368/7675, parity-split Gumbel-softmax with inverse "
    "temperature 16 ÷1.01 per step (floor 1.5), batch 2, Adam 0.01 with lr ×1.015 per step (docs/methods.md §5.3).",
    "Known only from a script port ('originally' values; medium confidence); its run length is unknown: "
    "1000 steps here. Snapshots use the sharpie decode (see aleph2image-delta). Codes beyond a smaller "
    "decoder's vocabulary are taken modulo its size. The port optimises its two images as one batch: one loss "
    "averaged over both and one crop set shared by both; here they are two independent runs (seeds s and s+1), "
    "each with its own crops and its whole gradient, so that a run's image never depends on what else is in its "
    "batch (clipguide's reproducibility rule). Each run's gradient is thus twice the port's; Adam's update does "
    "not change with the gradient's scale except where gradients are near its eps (1e-8).",
    **{**ALEPH, "steps": 1000}, latent="parity-gumbel", init="onehot-codes", init_codes=(4846, 4368, 7675),
    temperature=16.0, temperature_decay=1.01, temperature_floor=1.5, batch=2, display="sharpie",
    cut="normal", cut_range=(0.8, 0.3, 0.5, 0.98), lr=0.01, lr_growth=1.015,
)


SHAPES = dict(decoder="shapes-dvae", clip="shapes", size=128, steps=300, latent="categorical", init="uniform",
              pyramid=(2, 4), pyramid_every=75, cutn=16, cut="crowson", cut_flip=True, cut_affine=15.0,
              cut_whole=0.25, ema=0.9, loss="spherical", optimiser="adamw", lr=0.1)

_add(
    "shapes",
    "clipguide's recipe without a prior, developed on the offline shapes world: straight-through categorical "
    "sampling from flat initial logits plus a coarse-to-fine logit pyramid (4- and 2-token cells, the 4-grid "
    "alone for 75 steps, then one more level every 75), 16 cutouts with flips, ±15° rotations and a quarter "
    "of whole-image views, AdamW 0.1, snapshots of an EMA (0.9) of the logits; shapes-world CLIP and dVAE.",
    **SHAPES,
)


_add(
    "shapes-rerank",
    "clipguide's default, developed on the offline shapes world: the token prior shapes-prior proposes 512 code "
    "grids, CLIP rates them (all through one whole-image view, then the best 32 over the run's 16 views) and the "
    "run starts from the best, as DALL-E reranked its transformer's samples (Ramesh et al. 2021) and FuseDream "
    "starts from the best of a generator's (Liu et al. 2021); the 4 best are kept down to 4, 6, 8, 10 and 12 of "
    "their 16 rows and each completed 4 times by the prior, and the run starts from the best of them all; then 100 "
    "steps of refinement at AdamW 0.02 without the pyramid, with the prior's term (0.1 per code) keeping the codes "
    "likely. Otherwise as 'shapes'; 128 px only.",
    **{**SHAPES, "steps": 100, "lr": 0.02, "pyramid": (), "pyramid_every": 0}, prior="shapes-prior",
    prior_candidates=512, prior_shortlist=32, prior_resample=4, prior_resample_top=4, init_scale=8.0, prior_weight=0.1,
)


# Crowson's VQGAN notebooks (docs/methods.md §1, §3, §4): shared settings, no dVAE code blacklist or pixel noise.
VQGAN_CROWSON = dict(clip="ViT-B-32/openai", size=480, steps=1000, cutn=64, cut="crowson", cut_pow=1.0,
                     cut_resample="lanczos", cut_clamp=True, loss="spherical", lr=0.05, display="argmax", blacklist=False, noise_scale=0.0)


_add(
    "vqgan-codebook",
    "Crowson's VQGAN codebook sampling (2021): straight-through categorical sampling over the VQGAN codebook "
    "(one-hot @ codebook, then the decoder), AdamW 0.05, spherical-distance loss, 64 cutouts, ImageNet f16 1024 (docs/methods.md §3).",
    "The notebook loops until interrupted; here 1000 steps by default. Snapshots decode the argmax tokens, as its checkin does.",
    **VQGAN_CROWSON, decoder="vqgan-imagenet-f16-1024", latent="categorical", init="randn", optimiser="adamw",
)


_add(
    "vqgan-zquantize",
    "Crowson's 'VQGAN+CLIP' z+quantize (2021): z starts on random codebook vectors and decodes its nearest codes "
    "(straight-through), clamped per channel to the codebook's range after each step; Adam 0.05, spherical loss, "
    "64 cutouts; --init-weight adds init_weight/2·MSE(z, z_init) (docs/methods.md §4).",
    "1000 steps instead of an endless loop. The checkpoint is ImageNet f16 1024, as in the codebook notebook "
    "(docs/methods.md does not record this notebook's). --init-weight pulls toward the initial z as the notebook does, "
    "not toward zero with a decaying weight as nerdyrodent's generate.py does (docs/methods.md §6).",
    **VQGAN_CROWSON, decoder="vqgan-imagenet-f16-1024", latent="zquantize", init="onehot", optimiser="adam", init_weight=0.0,
)


_add(
    "vqgan-gumbel",
    "The codebook-sampling method (vqgan-codebook) on taming's Gumbel-quantized f8 VQGAN (OpenImages, 8192 codes), "
    "whose codebook is quantize.embed (docs/methods.md §3, §6).",
    "No notebook paired the two: nerdyrodent runs GumbelVQ checkpoints with z+quantize (add --latent zquantize "
    "--init onehot --optimiser adam for that) and hard-codes e_dim 256; here e_dim is read from the config (256 for this checkpoint).",
    **VQGAN_CROWSON, decoder="vqgan-gumbel-f8-8192", latent="categorical", init="randn", optimiser="adamw",
)


# nerdyrodent's VQGAN-CLIP generate.py (docs/methods.md §6): its defaults, with its "latest" cutouts.
_add(
    "vqgan-nerdyrodent",
    "nerdyrodent's VQGAN-CLIP generate.py (2021-2022): Crowson's z+quantize on ImageNet f16 16384, Adam 0.1, 32 "
    "cutouts that are each the whole image (average+max pooled) through Kornia's Af,Pe,Ji,Er augmentations and "
    "U(0, 0.1)-scaled noise per cutout, spherical loss, 500 steps; --init-weight pulls toward zero with a weight "
    "decaying as 1/(2·step + 1) (docs/methods.md §6). Needs pip install 'clipguide[kornia]'.",
    "Square images: generate.py's -s W H takes any size and defaults to 512x512 on a GPU with more than 8 GB, 304x304 "
    "below and 256x256 without a GPU; here 512 whatever the device (pass --size). generate.py seeds the global RNG "
    "(-sd, random by default) only after drawing the initial codes, so its start is not controlled by the seed; here "
    "the run's seed (0 by default) draws the codes, the augmentations and the noise. Kornia is today's, not the 0.5.4 "
    "generate.py pins: 'Ji' is ColorJiggle, 0.5.4's ColorJitter under its later name, and the augmentations draw "
    "their parameters by today's samplers. generate.py's loop makes 501 updates for -i 500 but saves the image "
    "after 500 (its last check-in); here 500 updates. It rewrites output.png every 50 iterations (-se); here "
    "--snapshots keeps the steps asked for (--snapshots every:50 keeps each of those as its own PNG). Its other cut methods (-cutm original, updated, nrupdated, "
    "updatedpooling) are not presets: 'original' is --cut crowson --cut-clamp.",
    decoder="vqgan-imagenet-f16-16384", clip="ViT-B-32/openai", size=512, steps=500, latent="zquantize", init="onehot",
    display="argmax", cutn=32, cut="pooled", cut_pow=1.0, augments=("Af", "Pe", "Ji", "Er"), cut_noise=0.1,
    cut_noise_each=True, cut_clamp=False, loss="spherical", optimiser="adam", lr=0.1, init_weight=0.0,
    init_pull="zero-decay", blacklist=False, noise_scale=0.0,
)


DEFAULT_PRESET = "shapes-rerank"


def fit_to_preset(base: RunConfig, changes: dict) -> dict:
    """``changes`` to a preset's config, with the preset's prior fields adjusted to them (every caller that
    overrides a preset uses this: generate, the CLI, sweeps).  A start given (``init_image``, ``init_noise``)
    replaces the preset's proposals unless ``prior_candidates`` is given too; fewer ``prior_candidates`` given
    without a ``prior_shortlist`` shrink the preset's shortlist to them, and fewer rated candidates than the
    preset's ``prior_resample_top`` shrink that."""
    changes = dict(changes)
    if (changes.get("init_image") or changes.get("init_noise")) and "prior_candidates" not in changes:
        changes.update(prior_candidates=0, prior_shortlist=0)  # e.g. --from RUN_DIR on the default, shapes-rerank
        if not changes.get("prior_weight", base.prior_weight):
            changes.setdefault("prior", "")  # the prior had nothing else to do
    elif "prior_candidates" in changes and "prior_shortlist" not in changes:
        changes["prior_shortlist"] = min(base.prior_shortlist, changes["prior_candidates"])
    if base.prior_resample and not changes.get("prior_candidates", base.prior_candidates):
        changes.setdefault("prior_resample", 0)  # no candidates left to complete
    if "prior_resample_top" not in changes and changes.get("prior_resample", base.prior_resample):
        rated = rated_candidates(changes.get("prior_candidates", base.prior_candidates),
                                 changes.get("prior_shortlist", base.prior_shortlist))
        changes["prior_resample_top"] = max(1, min(base.prior_resample_top, rated))
    return changes


def get_preset(name: str) -> RunConfig:
    """The config of a preset, or a ConfigError naming the closest ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3) or list(PRESETS)
        raise ConfigError(f"unknown preset {name!r}: did you mean {', '.join(close)}? (clipguide presets lists them)")
    return PRESETS[name].config
