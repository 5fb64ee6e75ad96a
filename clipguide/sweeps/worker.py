"""One run of a sweep, wherever it executes: this process (``local``) or a Ray worker.

:func:`run_group` makes a group's run folder with :func:`~clipguide.run.session.run_session`, or,
when the folder already holds a checkpoint (a sweep stopped, a worker killed), continues it with
:func:`~clipguide.run.resume.open_run` -- bit for bit the run it would have been.  Models load once
per process (:mod:`clipguide.models.loading` caches them), so a worker that takes many tasks loads
them once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..engine.state import differing
from ..errors import ConfigError
from ..records.checkpoints import FILENAME
from ..records.manifest import read_manifest
from ..run.resume import open_run
from ..run.session import run_session
from .groups import Group


def run_group(out, group: Group, every: int, score: str | None = None, callback=None,
              threads: int | None = None) -> list[dict]:
    """Run or continue ``group`` in ``out / group.run_dir``; its points' outcomes, in the group's order
    (each with ``interrupted`` when Ctrl-C stopped the run: its checkpoint is then on disk)."""
    if threads:
        torch.set_num_threads(threads)  # the thread count is part of what makes a run bit-identical
    folder = Path(out) / group.run_dir
    if (folder / FILENAME).is_file():
        opened, cfg = open_run(folder), group.config.resolved()
        changed = differing(opened.config, cfg) + (["steps"] if opened.config.steps != cfg.steps else [])
        if changed:
            raise ConfigError(f"{folder} holds a run with other settings ({', '.join(changed)} differ) than the "
                              "sweep's: move it away, or start the sweep in a new --out")
        if opened.differences():
            warnings.warn(f"continuing {folder} in another environment ({'; '.join(opened.differences())}): "
                          "it will not be bit-identical to an uninterrupted run", stacklevel=2)
        result = opened.run(callback)
    else:
        result = run_session(group.config.resolved(), folder, preset=group.preset, callback=callback, overwrite=True,
                             scorer=score or None, checkpoint_every=every)
    return outcomes(folder, group, result.steps_done, result.interrupted)


def outcomes(folder: Path, group: Group, step: int, interrupted: bool) -> list[dict]:
    """Per point: its final image (relative to the sweep folder), loss, CLIP similarity and CLIP score,
    read from the run's manifest (what a resumed run recorded before it stopped is there too)."""
    manifest = read_manifest(folder)
    final = {s["run"]: s for s in manifest["snapshots"] if s["step"] == step}
    scores = {(s["run"], s["step"]): s["clip_score"] for s in (manifest.get("scores") or {}).get("clip_score", [])}
    out = []
    for r, _ in enumerate(group.points):
        snap = final.get(r, {})
        out.append({"file": f"{group.run_dir}/{snap['file']}" if snap.get("file") else None,
                    "loss": snap.get("loss"), "clip_similarity": snap.get("clip_similarity"),
                    "clip_score": scores.get((r, step)), "steps_done": step, "interrupted": interrupted})
    return out
