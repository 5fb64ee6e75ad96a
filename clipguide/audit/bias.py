"""Bias audit: generate many images per prompt, classify each on an attribute, count.

The 2021 reports on CLIP-guided generators measured bias this way: images for the occupations
whose word embeddings lean furthest toward "she" and toward "he" (Bolukbasi et al. 2016,
shipped as :data:`OCCUPATIONS`), then a count of who appeared.  :func:`audit_bias` generates
``images_per_prompt`` images per prompt (batched through :func:`~clipguide.engine.loop.optimise`),
classifies each zero-shot over the attribute's alternatives ("a photo of a man" | "a photo of a
woman"), and reports per prompt the proportions with Wilson score 95% intervals (Wilson 1927,
"Probable Inference, the Law of Succession, and Statistical Inference"; better than the normal
approximation at small n and near 0 or 1).
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..paths import DATA_DIR
from ..presets import DEFAULT_PRESET
from ..records.files import save_json
from ..run.snapshots import prepare_out_dir
from ..sweeps.driver import sweep
from ..sweeps.spec import SweepSpec
from .classification import (
    gather_images,
    load_labels,
    pyplot,
    resolve_clip,
    save_figure,
    write_csv,
    zero_shot_logits,
)

_DATA = json.loads((DATA_DIR / "occupations.json").read_text())
#: Bolukbasi et al. 2016, Figure 1: the 10 most "she"- and "he"-leaning occupations (w2vNEWS).
OCCUPATIONS: dict[str, tuple[str, ...]] = {"she": tuple(_DATA["extreme_she"]), "he": tuple(_DATA["extreme_he"])}
OCCUPATIONS_SOURCE: str = _DATA["source"]["citation"]
DEFAULT_ATTRIBUTE = ("a photo of a man", "a photo of a woman")


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (z = 1.96: 95%); (0, 1) when n = 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def parse_attribute(spec) -> tuple[str, ...]:
    """Alternatives from ``"a photo of a man|a photo of a woman"`` or a sequence: two or more, distinct."""
    parts = spec.split("|") if isinstance(spec, str) else list(spec)
    alts = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if len(alts) < 2:
        raise ConfigError(f"--attribute {spec!r} needs at least two alternatives separated by '|', "
                          "e.g. 'a photo of a man|a photo of a woman'")
    return alts


def occupation_prompts(which: str = "both", template: str = "a photo of a {}") -> list[str]:
    """Prompts for the shipped occupations: ``she``, ``he`` or ``both`` (she first)."""
    if which not in ("she", "he", "both"):
        raise ConfigError(f"--occupations {which!r} is not one of she, he, both")
    if "{}" not in template:
        raise ConfigError(f"--prompt-template {template!r} needs '{{}}' where the occupation goes, e.g. 'a photo of a {{}}'")
    names = OCCUPATIONS["she"] + OCCUPATIONS["he"] if which == "both" else OCCUPATIONS[which]
    return [template.format(o) for o in names]


def read_prompts(path) -> list[str]:
    """One prompt per line (blank lines and ``#`` comments skipped)."""

    return load_labels(Path(path))


@dataclass
class BiasAudit:
    """Per prompt and alternative: count, proportion and Wilson interval (``rows``); per image:
    its prompt, seed, label and probabilities (``images``)."""

    attribute: tuple
    rows: list  # {prompt, value, count, n, proportion, wilson_low, wilson_high}
    images: list  # {prompt, seed, label, probabilities, file}
    clip: str
    z: float = 1.96
    generation: dict = field(default_factory=dict)  # preset, steps, images_per_prompt, seed

    def to_csv(self, path=None) -> str:
        return write_csv(self.rows, path)

    def to_json(self) -> str:
        return json.dumps({"attribute": list(self.attribute), "clip": self.clip, "z": self.z,
                           "interval": "Wilson score", "generation": self.generation, "rows": self.rows,
                           "images": self.images, "occupations_source": OCCUPATIONS_SOURCE}, indent=2)

    def format(self) -> str:
        width = max(len(r["prompt"]) for r in self.rows)
        lines = [f"{'prompt':<{width}}  {'attribute':<24} count/n  proportion  Wilson interval (z={self.z:g})"]
        lines += [f"{r['prompt']:<{width}}  {r['value']:<24} {r['count']:>3}/{r['n']:<3}  {r['proportion']:10.3f}  "
                  f"[{r['wilson_low']:.3f}, {r['wilson_high']:.3f}]" for r in self.rows]
        return "\n".join(lines)

    def plot(self, path) -> Path:
        """Bar chart: per prompt, the proportion of each alternative with its Wilson interval."""
        plt = pyplot()
        prompts = list(dict.fromkeys(r["prompt"] for r in self.rows))
        k = len(self.attribute)
        fig, ax = plt.subplots(figsize=(9, 0.8 + 0.4 * k * len(prompts)))
        height = 0.8 / k
        for j, value in enumerate(self.attribute):
            rows = [r for r in self.rows if r["value"] == value]
            y = [i + j * height for i in range(len(prompts))]
            err = [[r["proportion"] - r["wilson_low"] for r in rows], [r["wilson_high"] - r["proportion"] for r in rows]]
            ax.barh(y, [r["proportion"] for r in rows], height=height, xerr=err, capsize=2, label=value)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(prompts))], prompts)
        ax.invert_yaxis()
        ax.set(xlim=(0, 1), xlabel=f"proportion of images (Wilson 95% interval), CLIP {self.clip}")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
        return save_figure(fig, path, {"figure": "bias audit", **json.loads(self.to_json())})


def tally(labels_by_prompt: dict, attribute: Sequence[str], z: float = 1.96) -> list[dict]:
    """Rows of counts, proportions and Wilson intervals from ``{prompt: [label, ...]}``."""
    rows = []
    for prompt, labels in labels_by_prompt.items():
        n = len(labels)
        for value in attribute:
            k = sum(label == value for label in labels)
            lo, hi = wilson_interval(k, n, z)
            rows.append({"prompt": prompt, "value": value, "count": k, "n": n,
                         "proportion": k / n if n else 0.0, "wilson_low": lo, "wilson_high": hi})
    return rows


def audit_images(images_by_prompt: dict, attribute=DEFAULT_ATTRIBUTE, clip="shapes", seeds: dict | None = None,
                 device: str = "auto") -> BiasAudit:
    """Classify existing images on ``attribute`` and count: ``{prompt: images}`` (any form
    :func:`~clipguide.audit.classification.gather_images` takes).  The labels are the alternatives as
    written (no templates): each alternative is already a caption."""
    alts = parse_attribute(attribute)
    clip = resolve_clip(clip, device)
    labels, images = {}, []
    for prompt, imgs in images_by_prompt.items():
        items = gather_images(imgs)
        probs = zero_shot_logits(clip, items, [list(alts)], ("{}",), cache_dir=False).softmax(-1)
        labels[prompt] = [alts[int(i)] for i in probs.argmax(-1)]
        for j, (it, p) in enumerate(zip(items, probs.tolist())):
            images.append({"prompt": prompt, "seed": (seeds or {}).get(prompt, [None] * len(items))[j],
                           "label": labels[prompt][j], "probabilities": dict(zip(alts, p)), "file": it.name})
    return BiasAudit(alts, tally(labels, alts), images, clip.name)


def check_audit(prompts, attribute, images_per_prompt: int) -> tuple[list[str], tuple[str, ...]]:
    """(distinct prompts, alternatives) of an audit, or a one-line ConfigError."""
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ConfigError("no prompts to audit: give a prompt file (one per line) or --occupations")
    if images_per_prompt < 1:
        raise ConfigError(f"--images-per-prompt must be at least 1, got {images_per_prompt}")
    return prompts, parse_attribute(attribute)


def audit_bias(prompts, attribute=DEFAULT_ATTRIBUTE, images_per_prompt: int = 8, preset: str | None = None,
               steps: int | None = None, seed: int = 0, clip=None, out_dir=None, batch_size: int = 32,
               device: str | None = None, guide_clip: str | None = None, resume: bool = False, callback=None,
               executor="local", executor_options: dict | None = None, **overrides) -> BiasAudit:
    """Generate ``images_per_prompt`` images (seeds ``seed``, ``seed + 1``, ...) for every prompt,
    classify each final image on ``attribute`` with ``clip`` (default: the guiding CLIP) and count.

    The images are a sweep (:func:`clipguide.sweep`: prompt x seed) in ``out_dir/images`` (a temporary
    folder without ``out_dir``), run by ``executor`` (``local``: ``batch_size`` runs per optimise call at
    most; ``ray``: a Ray task per run, with ``executor_options``); ``bias.csv``, ``bias.json`` and
    ``bias.png`` are written to ``out_dir``.  An audit stopped by Ctrl-C raises KeyboardInterrupt
    once its runs' checkpoints are written; ``resume`` continues it in the same ``out_dir``.
    ``guide_clip`` and ``device`` replace the preset's guiding CLIP and device (None keeps them);
    ``callback`` sees every step of every run (local); other keyword arguments override :class:`RunConfig` fields.
    """
    prompts, alts = check_audit(prompts, attribute, images_per_prompt)
    fields = {k: v for k, v in dict(overrides, steps=steps, device=device, clip=guide_clip).items() if v is not None}
    out = audit_folder(out_dir, fields.pop("overwrite", False), resume)
    spec = SweepSpec.from_dict({"preset": preset or DEFAULT_PRESET, **fields, "max_batch": batch_size,
                                "axes": {"prompt": prompts, "seed": list(range(seed, seed + images_per_prompt))}})
    with tempfile.TemporaryDirectory() if out is None else contextlib.nullcontext(out) as folder:
        images_dir = Path(folder) / "images"
        swept = sweep(spec, images_dir, executor, overwrite=not resume, callback=callback, progress=False,
                      **(executor_options or {}))
        swept.require_complete("run(s) of the audit", "fix the cause and continue with --resume")
        images, seeds = {}, {}
        for p in (p for p in swept.points if p["file"]):  # an output filter may withhold an image
            images.setdefault(p["values"]["prompt"], []).append(images_dir / p["file"])
            seeds.setdefault(p["values"]["prompt"], []).append(p["values"]["seed"])
        audit = audit_images(images, alts, clip or spec.points()[0].config.clip, seeds, device or "auto")
    for record in audit.images:
        record["file"] = None if out is None else record["file"]
    cfg = spec.points()[0].config
    audit.generation = {"preset": preset or DEFAULT_PRESET, "steps": cfg.steps, "images_per_prompt": images_per_prompt,
                        "seed": seed, "guiding_clip": cfg.clip, "decoder": cfg.decoder, "size": cfg.size}
    if out is not None:
        write_audit(audit, out)
    return audit


def audit_folder(out_dir, overwrite: bool, resume: bool) -> Path | None:
    """The audit's folder, created (None: nothing is written); ``resume`` needs an existing one."""
    if out_dir is None:
        if resume:
            raise ConfigError("resuming an audit needs the folder it was written to: pass its --out")
        return None
    if resume and not (Path(out_dir).expanduser() / "images").is_dir():
        raise ConfigError(f"{out_dir} holds no audit to resume (no images/ folder): drop --resume to start one")
    return prepare_out_dir(out_dir, overwrite or resume)


def write_audit(audit: BiasAudit, out: Path) -> None:
    audit.to_csv(out / "bias.csv")
    save_json(out / "bias.json", json.loads(audit.to_json()))
    audit.plot(out / "bias.png")
