"""Starting points that a token prior proposes and CLIP chooses.

DALL-E's transformer proposed 512 images per caption and CLIP reranked them (Ramesh et al. 2021);
FuseDream (Liu et al. 2021) likewise starts its optimisation from the best of many generator
samples scored by CLIP over augmented views.  Here each run draws ``prior_candidates`` code grids
from the prior with its own generator, scores each with the run's own prompt loss over ``cutn``
views (the same views for every candidate, so the scores compare), and starts from the best.
With ``prior_shortlist`` K the scoring has two stages: every candidate is first seen once, whole,
without augmentation (one CLIP pass instead of ``cutn``), and only the K best of that glance are
scored over the ``cutn`` views.

With ``prior_resample`` the best candidates are then improved inside the prior: each of the
``prior_resample_top`` best is kept down to some rows (``prior_keep``) and its lower rows drawn
again from the prior, ``prior_resample`` times per cut, and the run starts from the best of the
candidates and their completions.  A candidate that CLIP rates high usually has the prompt's
background and colours in its upper rows and a near miss of the shape below; completing it draws
that shape again where the rest is already right, which a fresh sample matches only by chance.  It
is the resampling step of sequential Monte Carlo with CLIP as the weight (cf. Lew et al. 2023,
"Sequential Monte Carlo steering of large language models"), applied to the finished candidates.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .cutouts import make_cutouts
from .losses import LOSSES


def proposal_seed(seed: int, k: int) -> int:
    """A seed for the proposals of a run (k = 0: the candidates, 1: the views scoring them), apart from
    the run's own generator: a run with a prior draws in its steps what it would draw without one."""
    return int(np.random.SeedSequence([seed, k, 0x9A1]).generate_state(1)[0])


def check_prior(cfg, prior, vocab: int, grid: tuple[int, int], ranker=None) -> None:
    """Raise ConfigError when ``cfg`` names a prior that is missing or models other grids than the run's, or a
    ``prior_clip`` whose CLIP (``ranker``) was not passed."""
    if not cfg.prior:
        return
    if cfg.prior_clip and ranker is None:
        raise ConfigError(f"--prior-clip {cfg.prior_clip}: pass the loaded CLIP to optimise(ranker=...) "
                          "(clipguide.load_clip), or run through generate / run_session, which load it")
    if prior is None:
        raise ConfigError(f"--prior {cfg.prior}: pass the loaded prior to optimise(prior=...) (clipguide.load_prior), "
                          "or run through generate / run_session, which load it")
    if prior.vocab_size != vocab or tuple(prior.grid) != tuple(grid):
        h, w = prior.grid
        raise ConfigError(f"--prior {cfg.prior} models {h}x{w} grids of {prior.vocab_size} codes, but this run has "
                          f"{grid[0]}x{grid[1]} of {vocab}: use the decoder it was trained for, and --size W,H to match "
                          "(or a preset without a prior, e.g. --preset shapes)")


def propose(cfg, prior, decoder, clip, targets, seeds) -> torch.Tensor:
    """Initial logits [B, V, h, w]: per run, ``init_scale`` times the one-hot codes of the candidate whose
    prompt loss is lowest (candidates and views from :func:`proposal_seed`)."""
    embeds, weights, stops = targets.at(0)
    starts = []
    for r, seed in enumerate(seeds):
        target, view_seed = (embeds[r], weights[r], stops[r]), proposal_seed(seed, 1)
        codes = prior.sample(cfg.prior_candidates, torch.Generator().manual_seed(proposal_seed(seed, 0)))
        order, losses = rank(cfg, decoder, clip, codes, target, view_seed)
        best = codes[order[0]]
        if cfg.prior_resample:
            best = resample(cfg, prior, decoder, clip, codes[order[:cfg.prior_resample_top]], losses[0], target, seed)
        starts.append(cfg.init_scale * F.one_hot(best, prior.vocab_size).permute(2, 0, 1).float())
    return torch.stack(starts)


def describe_proposals(cfg, prior) -> str:
    """What a run draws before its steps, for the CLI's banner (the progress bar waits meanwhile)."""
    if not cfg.prior_candidates:
        return ""
    said = f"{cfg.prior_candidates} candidates from {cfg.prior}"
    if cfg.prior_resample:
        said += f" and {cfg.prior_resample_top * cfg.prior_resample * len(kept_rows(cfg, prior.grid[0]))} completions"
    return said + (f" rated by {cfg.prior_clip}" if cfg.prior_clip else "") + " then "


def kept_rows(cfg, height: int) -> list[int]:
    """The rows that ``prior_keep``'s fractions keep of a grid ``height`` rows high (at least 1, fewer than all)."""
    return sorted({min(height - 1, max(1, round(f * height))) for f in cfg.prior_keep})


def resample(cfg, prior, decoder, clip, tops: torch.Tensor, top_loss, target, seed: int) -> torch.Tensor:
    """The best of ``tops`` [M, h, w] (best first, its loss ``top_loss``) and their completions (see the module
    docstring): every candidate kept down to each of :func:`kept_rows` and completed ``prior_resample`` times,
    all draws from one generator of the run's seed, all scored over the views that rated ``tops``."""
    generator = torch.Generator().manual_seed(proposal_seed(seed, 2))
    best, best_loss, width = tops[0], float(top_loss), prior.grid[1]
    for rows in kept_rows(cfg, prior.grid[0]):
        prefix = tops.flatten(1)[:, :rows * width].repeat_interleave(cfg.prior_resample, 0)
        drawn = prior.sample(len(prefix), generator, prefix=prefix)
        losses = candidate_losses(cfg, decoder, clip, drawn, target, proposal_seed(seed, 1))
        if float(losses.min()) < best_loss:  # ties keep the earlier grid, as argmin does
            best, best_loss = drawn[int(losses.argmin())], float(losses.min())
    return best


def glance(cfg):
    """The cheap first stage's views: one plain view of the whole image per candidate (no flips, turns,
    noise, shifts or augmentations), so a candidate costs one CLIP pass instead of ``cutn``."""
    return cfg.replace(cutn=1, cut="crowson", cut_whole=1.0, cut_flip=False, cut_affine=0.0, cut_noise=0.0,
                       cut_noise_each=False, cut_roll=0, cut_mirror=0.0, augments=())


def rank(cfg, decoder, clip, codes: torch.Tensor, target, view_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidates (of code grids [N, h, w]) that the ``cfg.cutn`` views scored, best first, and their
    prompt losses: all N, or with ``cfg.prior_shortlist`` K < N the K that :func:`glance` rates best."""
    k = cfg.prior_shortlist
    short = torch.arange(len(codes))
    if k and k < len(codes):
        cheap = candidate_losses(glance(cfg), decoder, clip, codes, target, view_seed)
        short = cheap.argsort(stable=True)[:k]  # stable: ties keep the sampling order, as argmin does
    # The shortlisted grids are decoded again rather than kept: N images would hold N x 200 kB.
    full = candidate_losses(cfg, decoder, clip, codes[short], target, view_seed)
    order = full.argsort(stable=True)
    return short[order], full[order]


@torch.no_grad()
def candidate_losses(cfg, decoder, clip, codes: torch.Tensor, target, view_seed: int, batch: int = 32) -> torch.Tensor:
    """The prompt loss [N] of code grids [N, h, w] toward one run's ``target`` (embeds [T, D], weights [T],
    stops [T]), each seen through the same ``cutn`` views (generators seeded with ``view_seed``)."""
    loss_fn, out = LOSSES[cfg.loss], []
    for chunk in codes.split(batch):
        one_hot = F.one_hot(chunk.to(cfg.device), decoder.vocab_size).permute(0, 3, 1, 2).float()
        images = decoder.decode(one_hot).clamp(0, 1)
        cuts = make_cutouts(images, cfg, clip.image_size, [torch.Generator().manual_seed(view_seed) for _ in chunk])
        emb = clip.encode_image(cuts).view(len(chunk), cfg.cutn, -1)
        out.append(loss_fn(emb, *(t.expand(len(chunk), *t.shape) for t in target)))
    return torch.cat(out).float().cpu()
