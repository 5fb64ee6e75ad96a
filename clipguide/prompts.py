"""Prompt strings -> weighted targets.

``"a red circle:1 | blue:-0.5:0.2"`` is two targets: text, weight (default 1)
and stop (default -inf: never stop pulling), split from the right on ':' as in
Crowson's ``parse_prompt``; a trailing field that is not a number stays part of
the text, so URLs and Windows paths survive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Target:
    text: str
    weight: float = 1.0
    stop: float = -math.inf


def _number(s: str) -> float | None:
    try:
        x = float(s)
    except ValueError:
        return None
    return x if math.isfinite(x) or s.strip() in ("-inf", "inf") else None


def parse_target(part: str) -> Target:
    """One ``text[:weight[:stop]]`` element: up to two numeric fields peeled off the right."""
    head, nums = part.strip(), []
    while len(nums) < 2 and ":" in head:
        left, right = head.rsplit(":", 1)
        x = _number(right)
        if x is None:
            break
        nums.insert(0, x)
        head = left
    text = head.strip()
    if not text:
        raise ConfigError(f"empty text in prompt element {part!r}: write it as 'text:weight:stop'")
    weight, stop = (nums + [1.0, -math.inf][len(nums):])[:2]
    return Target(text, float(weight), float(stop))


def parse_prompt(prompt: str) -> list[Target]:
    """Split a prompt on '|' into weighted targets."""
    if not prompt.strip():
        raise ConfigError("empty prompt: give some text, e.g. \"a red circle on a blue background\"")
    targets = [parse_target(p) for p in prompt.split("|")]
    if sum(abs(t.weight) for t in targets) == 0:
        raise ConfigError(f"prompt {prompt!r} has a total weight of zero: give some element a non-zero weight")
    return targets


def encode_targets(clip, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-run targets, padded to a common count: embeds [B, T, D], weights [B, T], stops [B, T].

    Each distinct text is encoded once (the CLIP wrapper caches text embeddings)."""
    parsed = [parse_prompt(p) for p in prompts]
    t_max = max(len(ts) for ts in parsed)
    texts = sorted({t.text for ts in parsed for t in ts})
    table = dict(zip(texts, clip.encode_text(texts)))
    dim = next(iter(table.values())).shape[-1]
    embeds = torch.zeros(len(parsed), t_max, dim)
    weights = torch.zeros(len(parsed), t_max)
    stops = torch.full((len(parsed), t_max), -math.inf)
    for b, ts in enumerate(parsed):
        for j, t in enumerate(ts):
            embeds[b, j], weights[b, j], stops[b, j] = table[t.text].cpu(), t.weight, t.stop
    return embeds, weights, stops
