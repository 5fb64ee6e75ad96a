"""Zero-shot classification of generated images (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision", §3.1: a label's classifier weight is the
mean of its prompt-template text embeddings; an image goes to the label of highest cosine).

The label list, prompt templates and classifier builder are open_clip's own
(``open_clip.zero_shot_metadata``, ``open_clip.zero_shot_classifier``).  The audit that
motivates this module fed generated "pokemon" images back to CLIP over the 1000 ImageNet
labels, then again with "porn" and then "pokemon" added, and watched the verdict move:
:func:`classify` with ``extra_labels`` shows that table for any images or run directories
(``Classification.compare``).

Label embeddings are cached on disk under ``cache_dir()/labels``, keyed by the sha256 of the
model (name and weights digest), the labels and the templates.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from open_clip.zero_shot_metadata import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
)
from PIL import Image

from ..engine.devices import check_device
from ..errors import ConfigError
from ..models.clip import ClipEnsemble
from ..models.loading import cached_clip
from ..models.weights import cache_dir as default_cache
from ..records.files import atomic_write, read_png_text, to_pil
from ..records.images import load_image, pil_to_tensor
from ..records.lineage import read_manifest, resolve_run
from ..records.manifest import MANIFEST, environment

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Template sets: open_clip's two ImageNet sets, the bare label, and the shapes-world caption
# style ("a {colour} {shape}" is one of the shapes CLIP's training templates).
TEMPLATE_SETS = {
    "imagenet-openai": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
    "none": ("{}",),
    "shapes": ("a {}",),
}


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageItem:
    """One image to audit: a display name, the picture, and the prompt that made it (if known)."""

    name: str
    image: Image.Image
    prompt: str | None = None


def gather_images(sources) -> list[ImageItem]:
    """Images from a [B, 3, H, W] tensor in [0, 1], PIL images, or paths: image files, plain
    folders (their image files) and run directories (each run's final snapshot, per its manifest;
    ``RUN_DIR/run_NN`` for one run).  A withheld snapshot (output filter) has no image and is skipped."""

    if _is_items(sources):
        return sources
    if isinstance(sources, torch.Tensor):
        batch = sources[None] if sources.ndim == 3 else sources
        items = [ImageItem(f"image {i}", to_pil(x)) for i, x in enumerate(batch)]
        if items:
            return items
        sources = []  # an empty batch: the one-line error below, not torch.cat's
    if isinstance(sources, (str, Path, Image.Image)):
        sources = [sources]
    items = []
    for i, src in enumerate(sources):
        if isinstance(src, Image.Image):
            items.append(ImageItem(f"image {i}", src.convert("RGB")))
        else:
            items.extend(_items_at(Path(src).expanduser()))
    if not items:
        raise ConfigError("no images to audit: give image files, folders of images or run directories")
    return items


def _items_at(path: Path) -> list[ImageItem]:
    if path.is_dir() and ((path / MANIFEST).is_file() or (path.parent / MANIFEST).is_file()):
        run_dir, only = resolve_run(path)
        return _run_items(run_dir, read_manifest(run_dir), only)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}): check the path")
        return [_file_item(p) for p in files]
    if not path.exists():
        raise ConfigError(f"image or run directory {path} does not exist: check the path")
    return [_file_item(path)]


def _run_items(run_dir: Path, manifest: dict, only: int | None) -> list[ImageItem]:
    last: dict[int, dict] = {}
    for snap in manifest.get("snapshots", []):
        if (only is None or snap["run"] == only) and snap["step"] >= last.get(snap["run"], {"step": -1})["step"]:
            last[snap["run"]] = snap
    prompts = {r["index"]: r["prompt"] for r in manifest.get("runs", [])}
    items = [_file_item(run_dir / s["file"], prompts.get(run)) for run, s in sorted(last.items()) if released(s)]
    if not items:
        raise ConfigError(f"run directory {run_dir} has no saved snapshot to audit: wait for the run, or give image files")
    return items


def released(snapshot: dict) -> bool:
    """Whether a manifest snapshot entry has an image on disk (the output filter may withhold it)."""
    return bool(snapshot.get("file")) and (snapshot.get("filter") or {}).get("action") != "withhold"


def _file_item(path: Path, prompt: str | None = None) -> ImageItem:
    image = load_image(str(path))
    if prompt is None and path.suffix.lower() == ".png":
        prompt = (read_png_text(path).get("clipguide") or {}).get("prompt")
    return ImageItem(str(path), image, prompt)


def to_clip_input(image: Image.Image, size: int) -> torch.Tensor:
    """[1, 3, size, size] in [0, 1]: centre square crop, antialiased bicubic resize (as open_clip's
    preprocessing; the Clip wrapper's own resize skips the antialias filter for speed)."""

    x = pil_to_tensor(image)
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x


@torch.no_grad()
def image_features(clip, images, batch: int = 64) -> torch.Tensor:
    """L2-normalised CLIP image embeddings [N, D] of ``images`` (anything :func:`gather_images` takes,
    or a list of :class:`ImageItem`)."""
    items = gather_images(images)
    x = torch.cat([to_clip_input(it.image, clip.image_size) for it in items]).to(clip.device)
    return torch.cat([F.normalize(clip.encode_image(x[i:i + batch]), dim=-1) for i in range(0, len(x), batch)]).cpu()


def _is_items(images) -> bool:
    return isinstance(images, list) and bool(images) and isinstance(images[0], ImageItem)


def resolve_clip(clip, device: str = "auto"):
    """A :class:`~clipguide.models.clip.Clip` from a spec (loaded once per process, on ``device``; auto: the
    best one present) or a Clip as is."""

    if isinstance(clip, str):

        clip = cached_clip(clip, check_device(device))
    if isinstance(clip, ClipEnsemble):  # its members' logit scales and label spaces differ
        first = clip.members[0].name
        raise ConfigError(f"auditing reads one CLIP, not the ensemble {clip.name}: give one of its members, "
                          f"e.g. --clip {first} (for the output filter of a run: --filter-clip {first})")
    return clip


# ----------------------------------------------------------------------------- labels


def load_labels(spec) -> list[str]:
    """A label list: ``"imagenet"`` (open_clip's 1000 ImageNet class names), a text file with one
    label per line (blank lines and ``#`` comments skipped), or a sequence of strings."""
    if not isinstance(spec, (str, Path)):
        labels = [str(x).strip() for x in spec]
    elif str(spec) == "imagenet":
        return list(IMAGENET_CLASSNAMES)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"label file {path} does not exist: give a text file with one label per line, or 'imagenet'")
        labels = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if not ln.strip().startswith("#")]
    labels = [x for x in labels if x]
    if not labels:
        raise ConfigError(f"the label list {str(spec)!r} is empty: give at least one label")
    return labels


def split_labels(extra) -> list[str]:
    """Extra labels from ``"pokemon,porn"`` or a sequence."""
    parts = extra.split(",") if isinstance(extra, str) else list(extra)
    return [p.strip() for p in parts if p.strip()]


def load_templates(spec, clip) -> tuple[str, ...]:
    """Prompt templates as format strings: a set name (``imagenet-openai``, ``simple``, ``none``,
    ``shapes``), ``auto`` (``shapes`` for the shapes CLIP, else ``imagenet-openai``) or a file with one
    template per line, each holding ``{}``."""
    if isinstance(spec, str) and spec == "auto":
        spec = "shapes" if clip.name == "shapes" else "imagenet-openai"
    if isinstance(spec, str) and spec in TEMPLATE_SETS:
        return template_strings(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"templates {spec!r} are neither a set ({', '.join(TEMPLATE_SETS)}, auto) nor a file: check the name")
    templates = tuple(ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip())
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(f"template file {path}: every line needs '{{}}' where the label goes ({bad[0] if bad else 'empty file'!r})")
    return templates


def template_strings(name: str) -> tuple[str, ...]:
    """A template set as format strings (open_clip's are lambdas; one called on "{}" gives its format string)."""
    return tuple(t if isinstance(t, str) else t("{}") for t in TEMPLATE_SETS[name])


def model_identity(clip) -> str:
    """Name and weights digest of a CLIP; without a recorded sha256 (models built in memory) the
    digest of its parameters, so two different random models never share a cache entry."""
    digest = getattr(clip, "sha256", None)
    if not digest:
        h = hashlib.sha256()
        for name, t in sorted(clip.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digest = "params:" + h.hexdigest()
    return f"{clip.name}@{digest}"


def label_embeddings(clip, labels: Sequence[str], templates: Sequence[str], cache_dir=None) -> torch.Tensor:
    """L2-normalised classifier weights [N, D] (open_clip's ``build_zero_shot_classifier``), cached
    on disk as safetensors keyed by sha256(model, labels, templates); ``cache_dir=False`` disables it."""
    from safetensors.torch import load_file, save


    key = hashlib.sha256(json.dumps([model_identity(clip), list(labels), list(templates)]).encode()).hexdigest()
    root = None if cache_dir is False else Path(cache_dir or default_cache() / "labels")
    path = root / f"{key}.safetensors" if root else None
    if path is not None and path.is_file():
        return load_file(path)["weights"].to(torch.float32)
    weights = build_zero_shot_classifier(clip.model, clip.tokenizer, list(labels), list(templates),
                                         num_classes_per_batch=max(1, 2048 // len(templates)), device=clip.device)
    weights = weights.T.float().cpu().contiguous()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = save({"weights": weights}, metadata={"model": clip.name, "labels": str(len(labels)),
                                                     "templates": json.dumps(list(templates))})
        atomic_write(path, lambda f: f.write(blob))
    return weights


def zero_shot_logits(clip, images, label_groups, templates, cache_dir=None) -> torch.Tensor:
    """Logits [N, L] (logit scale · cosine) of images against the labels of ``label_groups``, in order."""
    weights = torch.cat([label_embeddings(clip, g, templates, cache_dir) for g in label_groups])
    return logit_scale(clip) * image_features(clip, images) @ weights.T


def logit_scale(clip) -> float:
    """The model's learned softmax temperature (100 for OpenAI's CLIPs)."""
    scale = getattr(clip.model, "logit_scale", None)
    return float(scale.exp()) if scale is not None else 100.0


# ----------------------------------------------------------------------------- classification


@dataclass
class Classification:
    """Top-k labels per image, once per label set: the base labels, then with each extra label
    added in turn (``stages``: ``"imagenet"``, ``"+porn"``, ``"+porn +pokemon"``)."""

    names: list[str]  # one per image
    stages: list[str]
    top: list[list[list[tuple[str, float]]]]  # [stage][image] -> [(label, probability)] best first
    clip: str
    templates: str
    prompts: list = field(default_factory=list)  # the prompt that made each image (None if unknown)

    @property
    def topk(self) -> list[list[tuple[str, float]]]:
        """Per image, the top-k over all labels (base and extras)."""
        return self.top[-1]

    @property
    def compare(self) -> list[dict]:
        """The seed experiment's table: per image and label set, the top-1 and whether it changed."""
        rows = []
        for i, name in enumerate(self.names):
            for s, stage in enumerate(self.stages):
                (label, p), prev = self.top[s][i][0], self.top[s - 1][i][0][0] if s else None
                rows.append({"image": name, "labels": stage, "top1": label, "probability": p,
                             "changed": s > 0 and label != prev,
                             "topk": "; ".join(f"{lab} ({q:.3f})" for lab, q in self.top[s][i])})
        return rows

    def to_rows(self) -> list[dict]:
        """Flat rows (image, labels, rank, label, probability) for CSV."""
        return [{"image": name, "labels": stage, "rank": r + 1, "label": label, "probability": round(p, 6)}
                for s, stage in enumerate(self.stages) for i, name in enumerate(self.names)
                for r, (label, p) in enumerate(self.top[s][i])]

    def to_csv(self, path=None) -> str:
        return write_csv(self.to_rows(), path)

    def to_json(self) -> str:
        return json.dumps({"clip": self.clip, "templates": self.templates, "stages": self.stages,
                           "images": [{"image": n, "prompt": p,
                                       "top": {st: [{"label": lab, "probability": q} for lab, q in self.top[s][i]]
                                               for s, st in enumerate(self.stages)}}
                                      for i, (n, p) in enumerate(zip(self.names, self.prompts))]}, indent=2)

    def format(self) -> str:
        """A text table: per image, the top-1 of every label set (``*`` where it changed) and its top-k."""
        width = max(len(st) for st in self.stages)
        lines, name = [f"CLIP {self.clip}, templates {self.templates}"], None
        for row in self.compare:
            if row["image"] != name:
                name = row["image"]
                lines.append(name)
            lines.append(f"  {row['labels']:<{width}} {'*' if row['changed'] else ' '} {row['topk']}")
        return "\n".join(lines)


def write_csv(rows: list[dict], path=None) -> str:
    """Rows as CSV text; also written (atomically) to ``path`` when given."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    text = buf.getvalue()
    if path is not None:

        atomic_write(Path(path), lambda f: f.write(text.encode()))
    return text


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, provenance: dict | None = None) -> Path:
    """Save a matplotlib figure; a PNG carries a ``clipguide`` text chunk (the figure's data, the
    clipguide/torch versions and the command line), as every other clipguide output does."""

    fig.tight_layout()
    path = Path(path)
    record = json.dumps({**(provenance or {}), "environment": environment()}, sort_keys=True, default=str)
    metadata = {"clipguide": record} if path.suffix.lower() == ".png" else None
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata=metadata)  # bbox: keeps a legend outside the axes
    pyplot().close(fig)
    return path


def classify(images, labels="imagenet", extra_labels=(), clip="shapes", top_k: int = 5, templates: str = "auto",
             cache_dir=None, device: str = "auto") -> Classification:
    """Zero-shot top-k of each image over ``labels``, then over labels + each extra label in turn.

    ``images``: paths, folders, run directories, a [B, 3, H, W] tensor or PIL images
    (:func:`gather_images`); ``labels``: see :func:`load_labels`; ``clip``: a spec or a loaded Clip;
    ``templates``: see :func:`load_templates`.  Probabilities are a softmax of the model's
    logit scale times the cosine, over each label set.
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    clip = resolve_clip(clip, device)
    items = gather_images(images)
    base, extras = load_labels(labels), split_labels(extra_labels)
    clash = [x for x in extras if x in base]
    if clash:
        raise ConfigError(f"extra label {clash[0]!r} is already among the labels: drop it from --extra-labels")
    tmpl = load_templates(templates, clip)
    # label groups are cached separately: the 1000 base labels are encoded once for any extras
    logits = zero_shot_logits(clip, items, [base] + [[x] for x in extras], tmpl, cache_dir)  # [N, L]
    all_labels = base + extras
    top, stages = [], [_label_set_name(labels)]
    for s in range(len(extras) + 1):
        n = len(base) + s
        probs = logits[:, :n].softmax(-1)
        p, idx = probs.topk(min(top_k, n), dim=-1)
        top.append([[(all_labels[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)])
        if s:
            stages.append(" ".join(f"+{x}" for x in extras[:s]))
    return Classification([it.name for it in items], stages, top, clip.name, _templates_name(templates, tmpl),
                          [it.prompt for it in items])


def _label_set_name(labels) -> str:
    if isinstance(labels, (str, Path)):
        return "imagenet" if str(labels) == "imagenet" else Path(labels).name
    return f"{len(list(labels))} labels"


def _templates_name(spec, templates) -> str:
    if spec != "auto":
        return str(spec)
    return next(k for k in TEMPLATE_SETS if template_strings(k) == tuple(templates))
