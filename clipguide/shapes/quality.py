"""Judging generated images against their prompts: the shapes-world quality measure.

The canonical prompts are split once, by a fixed seed, into a *tuning* half
(for developing recipes) and a *held-out* half (for the benchmark only).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import judge as judge_mod
from .scenes import canonical_prompts

SPLIT_SEED = 2021


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


def evaluate(cfg, decoder, clip, pairs, judge_every: int = 25) -> dict:
    """Run ``cfg`` on (prompt, attributes) pairs (x cfg.batch seeds) in one batch and judge the results."""
    from ..optimise import optimise

    cfg = cfg.replace(prompts=tuple(p for p, _ in pairs))
    targets = [t for _, t in pairs for _ in range(cfg.batch)]
    tracker = JudgeEvery(targets, judge_every)
    t0 = time.perf_counter()
    result = optimise(cfg, decoder, clip, tracker)
    seconds = time.perf_counter() - t0
    verdicts = judge_mod.judge_batch(result.images)
    acc = judge_mod.accuracy(verdicts, targets)
    firsts = [s for s in tracker.first_match if s is not None]
    return {
        **{f"match_{k}": v for k, v in acc.items()},
        "clip_similarity": float(result.similarities[-1].mean()),
        "median_steps_to_match": float(np.median(firsts)) if firsts else None,
        "matched_ever": len(firsts) / len(targets),
        "seconds_per_prompt": seconds / len(targets),
        "seconds": seconds,
        "runs": len(targets),
        "shape_failures": shape_failures(verdicts, targets),
        "verdicts": [v.attributes for v in verdicts],
        "result": result,
    }
