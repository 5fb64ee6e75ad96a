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

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..engine.state import differing
from ..errors import ConfigError
from ..paths import DATA_DIR
from ..presets import DEFAULT_PRESET
from ..records.checkpoints import FILENAME
from ..records.files import save_json
from ..records.manifest import run_subdir
from ..run.generation import make_config
from ..run.resume import open_run
from ..run.session import run_session
from ..run.snapshots import prepare_out_dir
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
               **overrides) -> BiasAudit:
    """Generate ``images_per_prompt`` images (seeds ``seed``, ``seed + 1``, ...) for every prompt,
    classify each on ``attribute`` with ``clip`` (default: the guiding CLIP) and count.

    Runs are batched, ``batch_size`` runs per :func:`optimise` call at most (whole prompts).
    With ``out_dir`` each batch is a run folder (images, manifest, checkpoint) under ``images/`` and
    ``bias.csv``, ``bias.json``, ``bias.png`` are written there.  An audit stopped by Ctrl-C raises
    KeyboardInterrupt once its batch's checkpoint is written; ``resume`` continues it in the same
    ``out_dir`` (finished batches are read back from their checkpoints, bit for bit).
    ``guide_clip`` and ``device`` replace the preset's guiding CLIP and device (None keeps them);
    ``callback`` sees every step of every batch; other keyword arguments override :class:`RunConfig` fields.
    """
    prompts, alts = check_audit(prompts, attribute, images_per_prompt)
    preset = preset or DEFAULT_PRESET
    out = audit_folder(out_dir, overrides.pop("overwrite", False), resume)
    per_call = max(1, batch_size // images_per_prompt)
    images, seeds, files = {}, {}, []
    for c in range(0, len(prompts), per_call):
        cfg = make_config(prompts[c:c + per_call], preset, steps=steps, seed=seed, batch=images_per_prompt,
                          device=device, clip=guide_clip, **overrides)
        folder = None if out is None else out / "images" / f"batch_{c // per_call:02d}"
        result = run_batch(cfg, folder, preset, resume, callback)
        for r, (prompt, s) in enumerate(result.runs):
            images.setdefault(prompt, []).append(result.images[r])
            seeds.setdefault(prompt, []).append(s)
            if folder is not None:
                files.append(str(folder / run_subdir(len(result.runs), r) / f"step_{result.steps_done:06d}.png"))
    audit = audit_images({p: torch.stack(v) for p, v in images.items()}, alts, clip or cfg.clip, seeds, cfg.device)
    for record, path in zip(audit.images, files):
        record["file"] = path
    audit.generation = {"preset": preset, "steps": cfg.steps, "images_per_prompt": images_per_prompt, "seed": seed,
                        "guiding_clip": cfg.clip, "decoder": cfg.decoder, "size": cfg.size}
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


def run_batch(cfg, folder: Path | None, preset: str, resume: bool, callback):
    """One batch of the audit, into ``folder``; with ``resume`` continued from its checkpoint if it has one
    (the same settings only).  Ctrl-C: KeyboardInterrupt after the batch's files are written."""
    if resume and folder is not None and (folder / FILENAME).is_file():
        opened = open_run(folder)
        changed = differing(opened.config, cfg) + (["steps"] if opened.config.steps != cfg.steps else [])
        if changed:
            raise ConfigError(f"the audit in {folder.parent.parent} was made with other settings ({', '.join(changed)} "
                              "differ): resume it with the same ones, or start a new audit")
        result = opened.run(callback)
    else:
        result = run_session(cfg, folder, preset=preset, callback=callback, overwrite=resume)
    if result.interrupted:
        raise KeyboardInterrupt  # the checkpoint is on disk: audit_bias(..., resume=True) continues
    return result


def write_audit(audit: BiasAudit, out: Path) -> None:
    audit.to_csv(out / "bias.csv")
    save_json(out / "bias.json", json.loads(audit.to_json()))
    audit.plot(out / "bias.png")
