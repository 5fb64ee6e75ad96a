"""Stage ``clipprior``: the shapes CLIP fine-tuned to rank the token prior's own samples.

The default preset's proposals are the prior's samples, and the CLIP chooses among them.  A CLIP trained on
rendered scenes barely tells a clean shape from the prior's lumpy, notched or frame-cut near misses in the
decoder's look, so it often picked one of those over a clean scene of the prompt (docs/shapes-world.md).  This
stage draws ``samples`` grids from shapes-prior, decodes them with shapes-dvae and has the pixel judge rate them,
as ImageReward (Xu et al. 2023) and PickScore (Kirstain et al. 2023) fit a CLIP to rated generations, with the
judge as the rater: a sample judged a clean scene joins each step's scenes under a caption of what it shows (a
positive in the decoder's look), any other joins the neutral-caption negatives beside a fresh scene of its judged
colour and background (a hard negative pair, as in NegCLIP, Yuksekgonul et al. 2023).  The samples are drawn
from their own seed, never from a run's proposal seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...models.priors import load_json_prior
from .. import judge as J
from .. import scenes as S
from .clip import finish_clip, load_clip_from, step_with_negatives
from .clip_stages import finetune_optimiser
from .common import COMMAND, Progress, log, save, seeded, set_lr
from .dvae import load_dvae_from
from .prior import decode_samples


def rated_samples(out_dir: Path, n: int, seed: int, batch: int = 64) -> tuple[torch.Tensor, list]:
    """``n`` samples of the prior in ``out_dir`` decoded by its dVAE: (uint8 pixels [n, 3, 128, 128], the
    judge's (colour, shape, background) of each, None where it could not tell)."""
    prior = load_json_prior(Path(out_dir) / "shapes-prior.json")
    _, dec, _ = load_dvae_from(out_dir)
    dec.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0xC1]).generate_state(1)[0]))
    images, rated = [], []
    for k in range(0, n, batch):
        x = decode_samples(dec, prior.sample(min(batch, n - k), gen), prior.vocab_size)
        rated += [v.attributes for v in J.judge_batch(x)]
        images.append((x * 255).round().to(torch.uint8))
    return torch.cat(images), rated


class _RatedBatches:
    """Per step, ``n_pos`` clean samples (positives under their captions) and ``n_spoilt`` others (neutral-caption
    negatives, each beside a fresh scene of its judged colours) for :func:`step_with_negatives`."""

    def __init__(self, images, rated, n_pos: int, n_spoilt: int):
        self.images, self.rated = images, rated
        self.clean = [i for i, a in enumerate(rated) if None not in a and a[0] != a[2]]
        self.spoilt = [i for i, a in enumerate(rated) if None in a]
        self.n_pos, self.n_spoilt = (n_pos if self.clean else 0), (n_spoilt if self.spoilt else 0)

    def draw(self, rng) -> dict:
        """Keyword arguments of ``step_with_negatives``: ``extra_negatives``, ``paired`` and ``positives``."""
        pos = [self.clean[int(i)] for i in rng.integers(len(self.clean), size=self.n_pos)]
        spoilt = [self.spoilt[int(i)] for i in rng.integers(len(self.spoilt), size=self.n_spoilt)]
        paired = [S.sample_scenes(1, rng=rng, colour=c, background=b)[0]
                  for c, _, b in (self.rated[i] for i in spoilt) if None not in (c, b) and c != b]
        return {"extra_negatives": self.images[spoilt].float() / 255, "paired": paired,
                "positives": ([S.Scene(*self.rated[i]) for i in pos], self.images[pos].float() / 255)}


def finetune_clip_prior(out_dir: Path, seed: int = 0, steps: int = 600, samples: int = 3072, batch: int = 48,
                        n_neg: int = 16, n_pos: int = 32, n_spoilt: int = 32, lr: float = 3e-4, log_every: int = 25,
                        trained_by: str = COMMAND) -> dict:
    """Stage ``clipprior`` (the module docstring).  Needs shapes-clip, shapes-dvae and shapes-prior in ``out_dir``;
    rewrites shapes-clip and records the run under ``finetune_prior``."""
    gen, rng = seeded(seed, 29)
    log(f"clipprior: drawing, decoding and judging {samples} samples of the prior")
    images, rated = rated_samples(out_dir, samples, seed)
    batches = _RatedBatches(images, rated, n_pos, n_spoilt)
    model, meta = load_clip_from(out_dir)
    opt = finetune_optimiser(model, lr)
    progress = Progress("clip-prior", steps, log_every)
    model.train()
    for step in range(steps):
        set_lr(opt, step, steps, lr, warmup=10)
        drawn = batches.draw(rng)
        loss = step_with_negatives(model, opt, batch=batch + len(drawn["paired"]), n_neg=n_neg, rng=rng, gen=gen,
                                   **drawn)
        progress.hist.append(loss.item())
        if progress.due(step):
            progress.log(step, f"loss {progress.recent():.4f}")
    train_s = progress.seconds()
    zs, sd = finish_clip(model, "clip-prior")
    meta["metrics"] = dict(meta.get("metrics", {}), zero_shot_300=zs,
                           before_prior_finetune=meta.get("metrics", {}).get("zero_shot_300"))
    meta["finetune_prior"] = {"steps": steps, "batch_real": batch, "batch_distractors": n_neg, "samples": samples,
                              "samples_clean": len(batches.clean), "positives": n_pos, "spoilt": n_spoilt, "lr": lr,
                              "seed": seed, "threads": torch.get_num_threads(), "seconds": round(train_s, 1),
                              "trained_by": trained_by}
    save(out_dir, "shapes-clip", sd, meta, trained_by)
    return meta
