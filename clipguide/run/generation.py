"""One-call generation: a preset's config, its models, and the run (into a folder when asked)."""

from __future__ import annotations

import warnings
from pathlib import Path

from ..config import RunConfig
from ..engine.prompts import parse_prompt
from ..engine.state import Result
from ..presets import DEFAULT_PRESET, fit_to_preset, get_preset
from ..shapes.scenes import COLOUR_NAMES, SHAPES, unknown_words
from .checkpoints import DEFAULT_EVERY
from .session import run_session


def make_config(prompts, preset: str = DEFAULT_PRESET, **overrides) -> RunConfig:
    """A preset's config with the given fields replaced (``None`` values keep the preset's) and
    its device resolved (``auto`` -> the device the run will use); :func:`fit_to_preset` says how a given start
    or candidate count adjusts the preset's prior fields."""
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    changes = {k: v for k, v in overrides.items() if v is not None}
    base = get_preset(preset)
    return base.replace(prompts=prompts, **fit_to_preset(base, changes)).resolved()


def vocabulary_note(cfg: RunConfig) -> str | None:
    """A one-line warning when a prompt has words the shapes CLIP never saw (it then guides toward
    nothing in particular), or None.  Only the shipped ``shapes`` CLIP has a known vocabulary."""

    if "shapes" not in (part.strip() for part in cfg.clip.split("+")):
        return None
    for prompt in cfg.prompts:
        words = [w for t in parse_prompt(prompt).targets if t.kind == "text" for w in unknown_words(t.value)]
        if words:
            return (f"the shapes CLIP does not know {', '.join(map(repr, dict.fromkeys(words)))} (prompt {prompt!r:.80}): "
                    f"it knows {len(COLOUR_NAMES)} colours ({', '.join(COLOUR_NAMES)}), the shapes {', '.join(SHAPES)} and "
                    "captions like 'a red circle on a blue background'; other prompts need real weights "
                    "(--preset dvae-codebook, see Models and weights in the README)")
    return None


def generate(prompt, preset: str = DEFAULT_PRESET, steps: int | None = None, snapshots=None, seed: int | None = None,
             out_dir: str | Path | None = None, callback=None, overwrite: bool = False, output_filter=None,
             scorer=None, checkpoint_every: int = DEFAULT_EVERY, **overrides) -> Result:
    """Generate images for ``prompt`` (a string, or a list for a batch) with a preset.

    ``snapshots`` are steps to keep (e.g. ``(100, 600, 4000)``); with ``out_dir``
    they are also written as PNGs with a manifest and a contact sheet, screened by
    ``output_filter`` and scored by ``scorer`` when given (see :class:`Snapshotter`; the
    returned images are never filtered), and a checkpoint every ``checkpoint_every`` steps and
    at every snapshot, from which :func:`clipguide.resume` continues the run after a crash.
    Other keyword arguments override :class:`RunConfig` fields.
    """
    cfg = make_config(prompt, preset, steps=steps, snapshots=snapshots, seed=seed, **overrides)
    note = vocabulary_note(cfg)
    if note:
        warnings.warn(note, stacklevel=2)
    return run_session(cfg, out_dir, preset=preset, callback=callback, overwrite=overwrite,
                       output_filter=output_filter, scorer=scorer, checkpoint_every=checkpoint_every)
