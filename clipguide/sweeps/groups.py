"""Points grouped into runs: the points that one :func:`~clipguide.run.session.run_session` call makes.

A run's config holds prompts x seeds ``seed .. seed + batch - 1`` (:meth:`RunConfig.runs`), so points
that differ only in prompt and seed share one optimise batch when their seeds are consecutive and
the same for every prompt of the group.  Each run in a batch draws from its own generators, so its
image is the one it would have alone (tests/test_sweeps.py checks it against runs of one point).
A group with one point is that point's own run folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..config import RunConfig
from ..records.files import slug
from .spec import Point


@dataclass(frozen=True)
class Group:
    """One run folder of a sweep: its points, in the order of its config's runs."""

    index: int
    run_dir: str  # relative to the sweep folder
    preset: str
    config: RunConfig
    points: tuple[int, ...]


def point_name(point: Point, width: int) -> str:
    """``NN-prompt-axis-value...``: the folder of a point run alone."""
    words = [str(v) if k == "prompt" else f"{k} {v}" for k, v in point.values.items()]
    return f"{point.index:0{width}d}-{slug(' '.join(words))}"


def batch_key(point: Point) -> tuple:
    """What points must share to run in one batch: everything but prompt and seed."""
    fields = {k: v for k, v in point.config.to_dict().items() if k not in ("prompts", "seed")}
    return point.preset, json.dumps(fields, sort_keys=True)


def seed_runs(points: list[Point], max_batch: int) -> list[list[Point]]:
    """``points`` (one prompt) sorted by seed, cut into consecutive runs of at most ``max_batch``."""
    runs: list[list[Point]] = []
    for p in sorted(points, key=lambda q: q.config.seed):
        last = runs[-1] if runs else None
        if last and p.config.seed == last[-1].config.seed + 1 and len(last) < max_batch:
            last.append(p)
        else:
            runs.append([p])
    return runs


def group_points(points: list[Point], max_batch: int) -> list[Group]:
    """The runs of a sweep, in the order of their first points; ``max_batch`` runs per batch at most."""
    by_key: dict[tuple, dict[str, list[Point]]] = {}
    for p in points:
        by_key.setdefault(batch_key(p), {}).setdefault(p.prompt, []).append(p)
    batches: list[list[list[Point]]] = []  # each: per prompt, the same seeds
    for prompts in by_key.values():
        same_seeds: dict[tuple, list[list[Point]]] = {}
        for members in prompts.values():
            for run in seed_runs(members, max_batch):
                same_seeds.setdefault((run[0].config.seed, len(run)), []).append(run)
        for (_, n), rows in same_seeds.items():
            per = max(1, max_batch // n)
            batches += [rows[i:i + per] for i in range(0, len(rows), per)]
    batches.sort(key=lambda rows: min(p.index for row in rows for p in row))
    width = max(2, len(str(len(points) - 1)), len(str(len(batches) - 1)))
    return [make_group(g, rows, width) for g, rows in enumerate(batches)]


def make_group(index: int, rows: list[list[Point]], width: int) -> Group:
    first = rows[0][0]
    members = tuple(p.index for row in rows for p in row)
    cfg = first.config.replace(prompts=tuple(row[0].prompt for row in rows), batch=len(rows[0]))
    name = point_name(first, width) if len(members) == 1 else f"batch_{index:0{width}d}"
    return Group(index, name, first.preset, cfg, members)
