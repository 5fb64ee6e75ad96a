"""The seed experiments as data, and the helpers that scale and run them.

advadnoun's first Aleph2Image demonstrations (Jan 2021; methods.md §5.2) followed a list of
prompts -- "an armchair in the shape of an avocado", "a rainbow cube", cartoon shows,
"pokemon", "serenity", ... -- to 100, 600 and 4000 iterations and then classified the
results zero-shot.  The list lives once, in ``data/seed_experiments.json``, together with
an offline stand-in on the shapes world (same workflow, shapes prompts) for machines
without the DALL-E and ViT-B/32 weights.  Notebooks and examples import it from here.

Examples and notebooks take their run length from ``CLIPGUIDE_EXAMPLE_STEPS``, the cutouts
per step from ``CLIPGUIDE_EXAMPLE_CUTN`` and the images per prompt of audits from
``CLIPGUIDE_EXAMPLE_IMAGES`` when set, so CI runs them in seconds.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .decoders import DECODERS, PACKAGE_DIR
from .errors import ClipguideError, ConfigError
from .presets import get_preset

DATA = PACKAGE_DIR / "data" / "seed_experiments.json"
STEPS_ENV = "CLIPGUIDE_EXAMPLE_STEPS"
CUTN_ENV = "CLIPGUIDE_EXAMPLE_CUTN"
IMAGES_ENV = "CLIPGUIDE_EXAMPLE_IMAGES"


@dataclass(frozen=True)
class ExperimentSet:
    """Prompts run one at a time with one preset and seed, snapshots at fixed fractions of
    the run, and the labels their results are classified with."""

    name: str
    preset: str
    seed: int
    steps: int  # the published run length
    groups: dict  # group name -> tuple of prompts
    labels: str | tuple  # "imagenet" or the labels themselves
    extra_labels: tuple
    offline: bool  # the shapes-world stand-in, not the published experiments

    @property
    def prompts(self) -> tuple[str, ...]:
        return tuple(p for group in self.groups.values() for p in group)


def load_experiments(path=DATA) -> tuple[ExperimentSet, ExperimentSet, tuple[int, ...], int]:
    """(real set, offline set, reference snapshot steps, reference run length) from the JSON file."""
    data = json.loads(Path(path).read_text())

    def one(key: str) -> ExperimentSet:
        d = data[key]
        labels = d["labels"] if isinstance(d["labels"], str) else tuple(d["labels"])
        return ExperimentSet(d["name"], d["preset"], int(d["seed"]), int(d["steps"]),
                             {g: tuple(ps) for g, ps in d["groups"].items()}, labels, tuple(d["extra_labels"]),
                             offline=key == "offline")

    return one("real"), one("offline"), tuple(data["snapshots"]), int(data["of_steps"])


SEED_EXPERIMENTS, SHAPES_EXPERIMENTS, REFERENCE_SNAPSHOTS, REFERENCE_STEPS = load_experiments()


def scaled_snapshots(steps: int, reference=REFERENCE_SNAPSHOTS, of: int = REFERENCE_STEPS) -> tuple[int, ...]:
    """The reference snapshots (100, 600 and 4000 of 4000 steps) at the same fractions of a
    ``steps``-step run: rounded, at least step 1, duplicates dropped."""
    return tuple(sorted({min(steps, max(1, round(s * steps / of))) for s in reference}))


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name}={text!r} is not a positive whole number: set it to e.g. 4, or unset it")
    return int(text)


def example_steps(default: int) -> int:
    """Run length of an example or notebook: ``$CLIPGUIDE_EXAMPLE_STEPS`` if set, else ``default``."""
    return _env_int(STEPS_ENV) or default


def example_cutn(default: int | None = None) -> int | None:
    """Cutouts per step: ``$CLIPGUIDE_EXAMPLE_CUTN`` if set, else ``default`` (None: the preset's)."""
    return _env_int(CUTN_ENV) or default


def example_images(default: int) -> int:
    """Images per prompt of an audit: ``$CLIPGUIDE_EXAMPLE_IMAGES`` if set, else ``default``."""
    return _env_int(IMAGES_ENV) or default


def weights_present(preset: str) -> bool:
    """Whether the decoder and CLIP weights of a preset are on this machine (shipped or
    cached); looks only at the disk, never downloads."""
    from .cli import cached_note
    from .clip import _cached_pretrained, parse_clip_spec
    from .weights import cache_dir

    cfg = get_preset(preset)
    if cfg.decoder in DECODERS:
        decoder_ok = cached_note(cfg.decoder).strip() in ("[cached]", "[shipped]")
    else:
        decoder_ok = Path(cfg.decoder).expanduser().is_file()
    try:
        spec = parse_clip_spec(cfg.clip)
    except ClipguideError:  # a local file that is missing
        return False
    if spec.tag is None:
        return decoder_ok
    import open_clip

    pretrained = open_clip.get_pretrained_cfg(spec.model_name, spec.tag)
    return decoder_ok and _cached_pretrained(pretrained, cache_dir() / "open_clip") is not None


def select_experiments(offline: bool | None = None) -> ExperimentSet:
    """The seed experiments, or their shapes-world stand-in when ``offline`` (None: when the
    real weights are not on this machine)."""
    if offline is None:
        offline = not weights_present(SEED_EXPERIMENTS.preset)
    return SHAPES_EXPERIMENTS if offline else SEED_EXPERIMENTS


def run_dir_name(index: int, prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "run"
    return f"{index:02d}-{slug}"


def run_experiments(experiments: ExperimentSet, out_dir, steps: int | None = None, seed: int | None = None,
                    overwrite: bool = False, callback=None, **overrides) -> dict[str, Path]:
    """Run each prompt of ``experiments`` on its own (an image is bit-reproducible only with
    the same batch around it), into ``out_dir/NN-prompt/`` with snapshots at
    :func:`scaled_snapshots`, a manifest and a contact sheet.  Returns prompt -> run directory."""
    from .generation import generate

    steps = steps or experiments.steps
    seed = experiments.seed if seed is None else seed
    dirs = {}
    for i, prompt in enumerate(experiments.prompts):
        run_dir = Path(out_dir) / run_dir_name(i, prompt)
        generate(prompt, preset=experiments.preset, steps=steps, snapshots=scaled_snapshots(steps), seed=seed,
                 out_dir=run_dir, callback=callback, overwrite=overwrite, **overrides)
        dirs[prompt] = run_dir
    return dirs
