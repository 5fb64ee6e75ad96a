"""Scores of generated images: CLIP score against the prompt, and a CLIP-feature Fréchet distance.

* **CLIP score** (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image
  Captioning"): CLIP-S = w · max(cos(image, text), 0) with w = 2.5.  clipguide reports
  100 · max(cos, 0), the scale torchmetrics' ``CLIPScore`` uses (divide by 40 for Hessel's w = 2.5).
  Score with a CLIP other than the guiding one: the guide's own similarity is what the
  optimiser maximised, so it is inflated (adversarial to that model) — compare the manifest's
  ``clip_similarity`` with the ``clip_score`` of an independent scorer.
* **Fréchet distance** (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", the FID formula) between Gaussians fitted to the CLIP
  image embeddings of two sets: ||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^½).  Like FID it
  is biased upward for small sets (Chong & Forsyth 2020): compare values at equal set sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch.nn.functional as F

from ..engine.prompts import parse_prompt
from ..errors import ConfigError
from ..records.files import save_json
from ..records.lineage import read_manifest, resolve_run
from ..records.manifest import MANIFEST
from .classification import gather_images, image_features, resolve_clip

SCALE = 100.0
FORMULA = "100*max(cos,0) (CLIPScore, Hessel et al. 2021, with w=100 instead of 2.5)"


def prompt_texts(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) of a prompt's text targets that pull (weight > 0), weights summing to 1;
    image and noise targets have no caption to score against."""

    texts = [(t.value, t.weight) for t in parse_prompt(prompt).targets if t.kind == "text" and t.weight > 0]
    total = sum(w for _, w in texts)
    return [(t, w / total) for t, w in texts]


def clip_scores(images, prompts, clip="shapes", device: str = "auto") -> list[float | None]:
    """Per-image CLIP score of ``images`` against ``prompts`` (one string for all, or one per image;
    None where an image's prompt is unknown or has no text target).  ``images``: anything
    :func:`~clipguide.audit.classification.gather_images` takes (run directories bring their prompts)."""
    clip = resolve_clip(clip, device)
    items = gather_images(images)
    if prompts is None:
        prompts = [it.prompt for it in items]
    elif isinstance(prompts, str):
        prompts = [prompts] * len(items)
    if len(prompts) != len(items):
        raise ConfigError(f"{len(items)} images but {len(prompts)} prompts: give one prompt, or one per image")
    feats = image_features(clip, items)
    out = []
    for f, prompt in zip(feats, prompts):
        texts = prompt_texts(prompt) if prompt else []
        if not texts:
            out.append(None)
            continue
        emb = F.normalize(clip.encode_text([t for t, _ in texts]), dim=-1).cpu()
        cos = (emb @ f).clamp(min=0)
        out.append(SCALE * float(sum(w * c for (_, w), c in zip(texts, cos.tolist()))))
    return out


def clip_score(images, prompts=None, clip="shapes", device: str = "auto") -> float:
    """Mean CLIP score (100 · max(cos, 0)) of ``images`` against their prompts; see :func:`clip_scores`."""
    scores = [s for s in clip_scores(images, prompts, clip, device) if s is not None]
    if not scores:
        raise ConfigError("no image has a text prompt to score against: pass prompts=..., or give run directories")
    return float(np.mean(scores))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` [N, D] and ``b`` [M, D]
    (Heusel et al. 2017).  Tr((S_a S_b)^½) is computed as the sum of the square roots of the
    eigenvalues of S_a^½ S_b S_a^½ (symmetric, PSD), which needs no scipy."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ConfigError(f"a Fréchet distance needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(vals.clip(min=0))) @ vecs.T


def clip_frechet_distance(images_a, images_b, clip="shapes", device: str = "auto") -> float:
    """Fréchet distance between the CLIP image embeddings (L2-normalised) of two image sets."""
    clip = resolve_clip(clip, device)
    return frechet_distance(image_features(clip, images_a).numpy(), image_features(clip, images_b).numpy())


def score_runs(run_dirs: Sequence, clip="shapes", against=None, prompt: str | None = None, device: str = "auto") -> dict:
    """The ``scores`` record of run directories (or any images): each final image's CLIP score
    against its prompt (or ``prompt``), and, with ``against`` (another image set), the CLIP
    Fréchet distance to it."""
    clip = resolve_clip(clip, device)
    items = gather_images(run_dirs)
    per = clip_scores(items, prompt, clip)
    known = [s for s in per if s is not None]
    record = {"scorer": scorer_info(clip), "formula": FORMULA,
              "clip_score": [{"image": it.name, "prompt": it.prompt, "clip_score": s} for it, s in zip(items, per)],
              "mean_clip_score": float(np.mean(known)) if known else None}
    if against is not None:
        ref = gather_images(against)
        record["frechet"] = {"distance": clip_frechet_distance(items, ref, clip), "images": len(items),
                             "reference_images": len(ref), "reference": [str(x) for x in _as_list(against)]}
    return record


def scorer_info(clip) -> dict:
    return {"name": clip.name, "sha256": getattr(clip, "sha256", None)}


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def record_scores(sources: Sequence, record: dict) -> list[Path]:
    """Append ``record`` to ``scores.records`` in the manifest of every run directory among
    ``sources`` (atomically); the run directories written."""
    import datetime


    written = []
    for src in _as_list(sources):
        path = Path(src).expanduser()
        if not (path.is_dir() and ((path / MANIFEST).is_file() or (path.parent / MANIFEST).is_file())):
            continue
        run_dir, _ = resolve_run(path)
        manifest = read_manifest(run_dir)
        stamped = {**record, "recorded": datetime.datetime.now().isoformat(timespec="seconds")}
        manifest.setdefault("scores", {}).setdefault("records", []).append(stamped)
        save_json(run_dir / MANIFEST, manifest)
        written.append(run_dir)
    if not written:
        raise ConfigError("--record writes into run directories' manifests, and none was given: drop --record")
    return written
