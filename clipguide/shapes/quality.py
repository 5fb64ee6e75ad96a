"""Judging generated images against their prompts: the shapes-world quality measure.

The canonical prompts are split once, by a fixed seed, into a *tuning* half
(for developing recipes) and a *held-out* half (for the benchmark only).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.cutouts import make_cutouts
from ..engine.loop import optimise
from ..engine.losses import cosine_similarities
from ..engine.objective import Objective, PixelObjective
from ..engine.prompts import encode_targets
from ..engine.proposals import proposal_seed, propose
from ..models.loading import load_prior_of, load_ranker_of
from . import judge as judge_mod
from .scenes import canonical_prompts, render, sample_scenes, to_tensor

SPLIT_SEED = 2021
SEARCH_MARGIN = 0.03  # true renders beating a missed image by more than this cosine: the search, not the CLIP, failed


def prompt_split(seed: int = SPLIT_SEED) -> tuple[list, list]:
    """(tuning, held_out): two disjoint halves of the 168 canonical (prompt, attributes) pairs."""
    prompts = canonical_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts))
    half = len(prompts) // 2
    return [prompts[i] for i in order[:half]], [prompts[i] for i in order[half:]]


@dataclass
class JudgeEvery:
    """Step callback judging every run's image each ``every`` steps; records the first full match."""

    targets: list  # [(colour, shape, background)] per run
    every: int = 25
    first_match: list = field(default_factory=list)

    def __post_init__(self):
        self.first_match = [None] * len(self.targets)

    def __call__(self, state) -> None:
        if state.step % self.every and state.step != state.steps:
            return
        for i, (v, t) in enumerate(zip(judge_mod.judge_batch(state.image()), self.targets)):
            if self.first_match[i] is None and v.all_match(*t):
                self.first_match[i] = state.step


def shape_failures(verdicts, targets) -> dict[str, int]:
    """Why the shape was not the prompted one, counted by the judge's reason category ("frame", "outline",
    "pieces", ...; "other shape" when the judge read a different shape)."""
    cats = [v.reason.split(":")[0] if v.shape is None else "other shape"
            for v, t in zip(verdicts, targets) if v.shape != t[1]]
    return dict(sorted(Counter(cats).items(), key=lambda kv: (-kv[1], kv[0])))


def view_scores(cfg, clip, images, text_embed, draws: int = 4, seed: int = 0):
    """The loop's objective for each image of [N, 3, H, W]: its mean cosine with ``text_embed`` [D] over ``draws``
    sets of the loop's own cutouts (``cfg``'s cutout law and augmentations) -> [N].  Every image gets its own
    generator seeded with ``seed``, so all of them are seen through the same views and their scores compare."""
    images = images.to(clip.device)
    gens = [torch.Generator().manual_seed(seed) for _ in images]
    with torch.no_grad():
        cuts = torch.cat([make_cutouts(images, cfg, clip.image_size, gens) for _ in range(draws)])  # [draws·N·cutn, ...]
        emb = clip.encode_image(cuts).view(draws, len(images), cfg.cutn, -1).transpose(0, 1).flatten(1, 2)
        return cosine_similarities(emb, text_embed.expand(len(images), 1, -1))[..., 0].mean(1).cpu()


def search_gaps(cfg, clip, images, pairs, renders: int = 8, draws: int = 4) -> list[float]:
    """Per run: how the CLIP rates its final image against true renders of its prompt, both under the loop's own
    views (:func:`view_scores`): the image's score minus the mean over ``renders`` scenes of the prompt's
    attributes at random positions and sizes.  Clearly negative (below ``-SEARCH_MARGIN``): the CLIP prefers the
    real thing, so the optimiser missed it (a search failure); near zero or above: the CLIP rates the image as
    highly as the prompt itself, so no better search of this objective would fix a miss (a model failure).
    Runs are in ``optimise`` order: each pair's ``cfg.batch`` seeds in turn."""
    gaps = []
    for k, (text, (colour, shape, background)) in enumerate(pairs):
        embed = clip.encode_text([text])[0]
        truth = to_tensor(render(sample_scenes(renders, 9000 + k, colour=colour, shape=shape, background=background)))
        runs = images[k * cfg.batch : (k + 1) * cfg.batch]
        gaps += (view_scores(cfg, clip, runs, embed, draws) - view_scores(cfg, clip, truth, embed, draws).mean()).tolist()
    return gaps


def miss_causes(gaps, verdicts, targets) -> dict[str, int]:
    """Runs missing any attribute, by whose failure it is (:func:`search_gaps`): "search" or "clip"."""
    causes = ["search" if g < -SEARCH_MARGIN else "clip" for g, v, t in zip(gaps, verdicts, targets) if not v.all_match(*t)]
    return {k: causes.count(k) for k in ("search", "clip")}


def fit_renders(cfg, decoder, pairs, seed: int = 7000) -> dict:
    """The recipe's search space without CLIP: ``cfg``'s latent, schedule, optimiser and step count, pulled toward
    one true render of each prompt by pixel MSE instead of the CLIP loss, then judged as the benchmark judges.

    A high rate says the parametrisation and the step budget can draw the scenes, so the CLIP-guided loop's misses
    come from its objective (what the CLIP rewards), not from the space it searches."""
    cfg = cfg.replace(prompts=tuple(p for p, _ in pairs), batch=1, clamp_grad=False).resolved()
    truth = [sample_scenes(1, seed + k, colour=c, shape=s, background=b)[0] for k, (_, (c, s, b)) in enumerate(pairs)]
    target = to_tensor(render(truth, cfg.size)).to(cfg.device)
    images = optimise(cfg, decoder, None, objective=Objective(PixelObjective(target))).images
    verdicts = judge_mod.judge_batch(images)
    targets = [t for _, t in pairs]
    return {**{f"match_{k}": v for k, v in judge_mod.accuracy(verdicts, targets).items()},
            "shape_failures": shape_failures(verdicts, targets), "images": images, "targets": target.cpu()}


def fit_gaps(cfg, clip, images, fitted, pairs, draws: int = 4) -> list[float]:
    """Per prompt: the loop's objective (:func:`view_scores`) for its final image (the first seed's, of
    ``cfg.batch``) minus the same score of :func:`fit_renders`' image of that prompt, a clean scene the decoder
    can draw.  At or above zero on a missed prompt, the CLIP rates the miss at least as high as a drawable
    scene of the prompt: its objective does not prefer what the judge wants."""
    gaps = []
    for k, (text, _) in enumerate(pairs):
        embed = clip.encode_text([text])[0]
        pair = torch.stack([images[k * cfg.batch], fitted[k]])
        scores = view_scores(cfg, clip, pair, embed, draws)
        gaps.append(float(scores[0] - scores[1]))
    return gaps


def judge_proposals(cfg, decoder, clip, prior, pairs) -> dict:
    """The prior's part alone, judged against each prompt: with ``cfg.prior_candidates`` 1, a plain sample
    of the prior; with more, the one CLIP rates best (the rerank, and with ``cfg.prior_resample`` the best of the
    candidates and their completions; no optimisation), rated by ``cfg.prior_clip``'s CLIP where it names one."""
    cfg = cfg.replace(prompts=tuple(p for p, _ in pairs)).resolved()
    runs = cfg.runs()
    t0 = time.perf_counter()
    rater = load_ranker_of(cfg) or clip
    targets = encode_targets(rater, [p for p, _ in runs], cfg, [s for _, s in runs])
    start = propose(cfg, prior, decoder, rater, targets, [s for _, s in runs])
    one_hot = torch.nn.functional.one_hot(start.argmax(1), prior.vocab_size).permute(0, 3, 1, 2).float()
    images = decoder.decode(one_hot).clamp(0, 1)
    seconds = time.perf_counter() - t0
    wanted = [t for _, t in pairs for _ in range(cfg.batch)]
    verdicts = judge_mod.judge_batch(images)
    return {**{f"match_{k}": v for k, v in judge_mod.accuracy(verdicts, wanted).items()},
            "seconds_per_prompt": seconds / len(wanted), "runs": len(wanted), "images": images,
            "verdicts": [v.attributes for v in verdicts]}


@torch.no_grad()
def pool_coverage(cfg, decoder, prior, pairs, batch: int = 32) -> dict:
    """Diagnosis only, never part of generation: the judge on every one of the ``cfg.prior_candidates``
    candidates a run of each prompt draws.  ``in_pool``: the share of runs whose prompt's exact scene is
    among them (the best a rerank can do); ``frequency``: each judged scene's share of the samples, from
    which :func:`pool_share` extrapolates to other pool sizes."""
    cfg = cfg.replace(prompts=tuple(p for p, _ in pairs)).resolved()
    pools = {}  # a run's candidates depend on its seed alone, so the runs of one seed share their pool
    for seed in sorted({s for _, s in cfg.runs()}):
        codes = prior.sample(cfg.prior_candidates, torch.Generator().manual_seed(proposal_seed(seed, 0)))
        one_hot = (torch.nn.functional.one_hot(c, prior.vocab_size).permute(0, 3, 1, 2).float() for c in codes.split(batch))
        pools[seed] = judge_mod.judge_batch(torch.cat([decoder.decode(x.to(cfg.device)).clamp(0, 1).cpu() for x in one_hot]))
    wanted = [t for _, t in pairs for _ in range(cfg.batch)]
    hits = [sum(v.all_match(*t) for v in pools[seed]) for t, (_, seed) in zip(wanted, cfg.runs())]
    scenes = Counter(v.attributes for vs in pools.values() for v in vs if None not in v.attributes)
    n = sum(len(vs) for vs in pools.values())
    return {"in_pool": sum(h > 0 for h in hits) / len(hits), "hits": hits, "clean": sum(scenes.values()) / n,
            "frequency": {s: c / n for s, c in scenes.items()}}


def pool_share(frequency: dict, wanted, n: int) -> float:
    """The expected share of the ``wanted`` scenes that a pool of ``n`` independent samples holds at least
    once, each scene drawn with its measured ``frequency`` (0 where it was never seen)."""
    return float(np.mean([1 - (1 - frequency.get(tuple(t), 0.0)) ** n for t in wanted]))


def evaluate(cfg, decoder, clip, pairs, judge_every: int = 25, prior=None) -> dict:
    """Run ``cfg`` on (prompt, attributes) pairs (x cfg.batch seeds) in one batch and judge the results
    (``prior``: the token prior ``cfg.prior`` names, loaded here when not given; its proposals count in the time)."""
    cfg = cfg.replace(prompts=tuple(p for p, _ in pairs))
    prior = prior if prior is not None else load_prior_of(cfg)
    targets = [t for _, t in pairs for _ in range(cfg.batch)]
    tracker = JudgeEvery(targets, judge_every)
    t0 = time.perf_counter()
    result = optimise(cfg, decoder, clip, tracker, prior=prior, ranker=load_ranker_of(cfg))
    seconds = time.perf_counter() - t0
    verdicts = judge_mod.judge_batch(result.images)
    acc = judge_mod.accuracy(verdicts, targets)
    firsts = [s for s in tracker.first_match if s is not None]
    gaps = search_gaps(cfg, clip, result.images, pairs)
    return {
        **{f"match_{k}": v for k, v in acc.items()},
        "clip_similarity": float(result.similarities[-1].mean()),
        "median_steps_to_match": float(np.median(firsts)) if firsts else None,
        "matched_ever": len(firsts) / len(targets),
        "seconds_per_prompt": seconds / len(targets),
        "seconds": seconds,
        "runs": len(targets),
        "shape_failures": shape_failures(verdicts, targets),
        "search_gap": float(np.mean(gaps)),
        "miss_causes": miss_causes(gaps, verdicts, targets),
        "gaps": gaps,
        "verdicts": [v.attributes for v in verdicts],
        "result": result,
    }
