"""The seed experiments as data, and the helpers that scale and run them.

advadnoun's first Aleph2Image demonstrations (Jan 2021; docs/methods.md §5.2) followed a list of
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
from dataclasses import dataclass
from pathlib import Path

from ..catalogue import clip_cached, decoder_status
from ..errors import ClipguideError, ConfigError
from ..models.clip import parse_clip_spec
from ..models.decoders import DECODERS
from ..paths import DATA_DIR
from ..presets import DEFAULT_PRESET, get_preset
from ..sweeps.driver import sweep

DATA = DATA_DIR / "seed_experiments.json"
STEPS_ENV = "CLIPGUIDE_EXAMPLE_STEPS"
CUTN_ENV = "CLIPGUIDE_EXAMPLE_CUTN"
IMAGES_ENV = "CLIPGUIDE_EXAMPLE_IMAGES"
PRESET_ENV = "CLIPGUIDE_EXAMPLE_PRESET"


@dataclass(frozen=True)
class ExperimentSet:
    """Prompts run one at a time with one preset and seed, snapshots at fixed fractions of
    the run (rounded), and the labels their results are classified with."""

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


def snapshot_unit(steps: int) -> int:
    """What :func:`scaled_snapshots` rounds to: the largest power of ten at most ``steps / 25``
    (at least 1), e.g. 10 for 300 steps and 100 for 4000."""
    unit = 1
    while unit * 10 * 25 <= steps:
        unit *= 10
    return unit


def scaled_snapshots(steps: int, reference=REFERENCE_SNAPSHOTS, of: int = REFERENCE_STEPS) -> tuple[int, ...]:
    """The reference snapshots (100, 600 and 4000 of 4000 steps) at about the same fractions of
    a ``steps``-step run, as round numbers: each rounded (halves up) to a multiple of
    :func:`snapshot_unit`, at least step 1 and at most ``steps``, duplicates dropped; the
    reference's last step (``of``) stays the run's last, ``steps``, round or not.
    300 steps -> (10, 50, 300), 1000 -> (30, 150, 1000), 4000 -> (100, 600, 4000), 4 -> (1, 4)."""
    unit = snapshot_unit(steps)
    den = of * unit  # s * steps / of in units, rounded half up in integers: floor(x + 1/2)
    return tuple(sorted({steps if s >= of else min(steps, max(1, (2 * s * steps + den) // (2 * den) * unit))
                         for s in reference}))


def _env_int(name: str) -> int | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name}={text!r} is not a positive whole number: set it to e.g. 4, or unset it")
    return int(text)


def example_steps(default: int | None) -> int | None:
    """Run length of an example or notebook: ``$CLIPGUIDE_EXAMPLE_STEPS`` if set, else ``default``."""
    return _env_int(STEPS_ENV) or default


def example_preset(default: str = DEFAULT_PRESET) -> str:
    """The preset of an example or notebook: ``$CLIPGUIDE_EXAMPLE_PRESET`` if set (the tests run the fast
    ``shapes``, which has no prior to sample), else ``default``."""
    return os.environ.get(PRESET_ENV, "").strip() or default


def example_cutn(default: int | None = None) -> int | None:
    """Cutouts per step: ``$CLIPGUIDE_EXAMPLE_CUTN`` if set, else ``default`` (None: the preset's)."""
    return _env_int(CUTN_ENV) or default


def example_images(default: int) -> int:
    """Images per prompt of an audit: ``$CLIPGUIDE_EXAMPLE_IMAGES`` if set, else ``default``."""
    return _env_int(IMAGES_ENV) or default


def weights_present(preset: str) -> bool:
    """Whether the decoder and CLIP weights of a preset are on this machine (shipped or
    cached); looks only at the disk, never downloads."""

    cfg = get_preset(preset)
    if cfg.decoder in DECODERS:
        decoder_ok = decoder_status(cfg.decoder) in ("cached", "shipped")
    else:
        decoder_ok = Path(cfg.decoder).expanduser().is_file()
    try:
        spec = parse_clip_spec(cfg.clip)
    except ClipguideError:  # a local file that is missing
        return False
    return decoder_ok and (spec.tag is None or clip_cached(f"{spec.model_name}/{spec.tag}"))


def select_experiments(offline: bool | None = None) -> ExperimentSet:
    """The seed experiments, or their shapes-world stand-in when ``offline`` (None: when the
    real weights are not on this machine)."""
    if offline is None:
        offline = not weights_present(SEED_EXPERIMENTS.preset)
    return SHAPES_EXPERIMENTS if offline else SEED_EXPERIMENTS


def run_experiments(experiments: ExperimentSet, out_dir, steps: int | None = None, seed: int | None = None,
                    overwrite: bool = False, callback=None, executor="local", executor_options: dict | None = None,
                    **overrides) -> dict[str, Path]:
    """Run each prompt of ``experiments`` on its own (``max_batch`` 1: each image is the one ``clipguide
    generate`` makes for its prompt), as a sweep over the prompts (:func:`clipguide.sweep`, run by
    ``executor``) into ``out_dir/NN-prompt/`` with snapshots at :func:`scaled_snapshots`, a manifest and
    a contact sheet.  Running it again into the same folder continues it.  Returns prompt -> run directory."""
    steps = steps or experiments.steps
    spec = {"preset": experiments.preset, "steps": steps, "snapshots": list(scaled_snapshots(steps)),
            "seed": experiments.seed if seed is None else seed, "max_batch": 1,
            **{k: v for k, v in overrides.items() if v is not None}, "axes": {"prompt": list(experiments.prompts)}}
    result = sweep(spec, out_dir, executor, callback=callback, overwrite=overwrite, progress=False,
                   **(executor_options or {}))
    result.require_complete("of the experiments", "fix the cause and run again to continue")
    return {p["values"]["prompt"]: Path(out_dir) / p["run_dir"] for p in result.points}
