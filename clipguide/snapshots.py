"""Snapshots as a step callback: PNGs with provenance, a manifest, a contact sheet.

Nothing is written unless a :class:`Snapshotter` is passed to ``optimise``.
Every file is written atomically (temporary file in the same folder, then
``os.replace``), so a crash never leaves a half-written PNG or JSON.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from .config import RunConfig
from .errors import ConfigError

MANIFEST = "manifest.json"
CONTACT_SHEET = "contact_sheet.png"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB image, rounding (torchvision's to_pil_image truncates)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def save_png(path: Path, image: Image.Image, text: dict | None = None) -> None:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def save_json(path: Path, data: dict) -> None:
    blob = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_write(path, lambda f: f.write(blob))


def read_png_text(path) -> dict:
    """The text chunks of a PNG written by clipguide (``clipguide`` holds the provenance JSON)."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}))
    if "clipguide" in text:
        text["clipguide"] = json.loads(text["clipguide"])
    return text


def prepare_out_dir(out_dir: Path, overwrite: bool = False) -> Path:
    """Create ``out_dir``; refuse an existing non-empty one unless ``overwrite``; check it is writable."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory: choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out_dir} already exists: pass --overwrite to replace its run, or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {out_dir} ({e.strerror}): choose a writable --out") from None
    return out_dir


def environment() -> dict:
    from . import __version__

    return {
        "clipguide": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


class Snapshotter:
    """Step callback saving the images at ``config.snapshots`` (plus the final step).

    Layout: one run -> ``OUT/step_000100.png``; several -> ``OUT/run_00/step_000100.png``.
    ``manifest.json`` lists config, models, environment and every snapshot
    ``{run, step, file, loss, clip_similarity}``; ``contact_sheet.png`` shows them by step.
    Each run lists its ``parents`` (init image and image prompts: file and sha256), and
    every PNG's provenance names its run directory, so lineages can be traced
    (:mod:`clipguide.lineage`).
    """

    def __init__(self, out_dir, config: RunConfig, models: dict, preset: str | None = None, overwrite: bool = False):
        from .prompts import run_parents

        self.out_dir = prepare_out_dir(out_dir, overwrite)
        self.config, self.preset = config, preset
        self.runs = config.runs()
        parents = {p: run_parents(p, config.init_image) for p in config.prompts}
        self.manifest = {
            "preset": preset,
            "config": config.to_dict(),
            "models": models,
            "environment": environment(),
            "runs": [{"index": i, "prompt": p, "seed": s, "dir": self.run_dir(i), "parents": parents[p]}
                     for i, (p, s) in enumerate(self.runs)],
            "snapshots": [],
            "steps_done": 0,
            "interrupted": False,
        }
        self.images: dict[int, list[Image.Image]] = {}

    def run_dir(self, i: int) -> str:
        return "." if len(self.runs) == 1 else f"run_{i:02d}"

    def __call__(self, state) -> None:
        if state.step in self.config.snapshots or state.step == self.config.steps:
            self.save(state.step, state.image(), state.loss, state.similarity)

    def save(self, step: int, images: torch.Tensor, loss=None, similarity=None) -> None:
        if step in self.images:
            return
        self.images[step] = []
        for i, ((prompt, seed), img) in enumerate(zip(self.runs, images)):
            rel = Path(self.run_dir(i)) / f"step_{step:06d}.png"
            (self.out_dir / rel.parent).mkdir(exist_ok=True)
            pil = to_pil(img)
            save_png(self.out_dir / rel, pil, self.provenance(prompt, seed, step, run=i))
            self.images[step].append(pil)
            self.manifest["snapshots"].append({
                "run": i, "step": step, "file": rel.as_posix(),
                "loss": None if loss is None else float(loss[i]),
                "clip_similarity": None if similarity is None else float(similarity[i]),
            })
        self.manifest["steps_done"] = max(self.manifest["steps_done"], step)
        save_json(self.out_dir / MANIFEST, self.manifest)

    def provenance(self, prompt: str, seed: int, step: int, run: int = 0) -> dict:
        m = self.manifest
        return {"Description": prompt, "clipguide": {
            "prompt": prompt, "seed": seed, "step": step, "preset": self.preset, "models": m["models"],
            "version": m["environment"]["clipguide"], "config": m["config"],
            "run": run, "run_dir": str(self.out_dir.resolve()), "parents": m["runs"][run]["parents"]}}

    def finish(self, result) -> Path:
        """Save the final image if not saved yet (interrupted runs), the manifest and the contact sheet."""
        if result.steps_done not in self.images:
            last = result.losses[-1] if len(result.losses) else None
            lastsim = result.similarities[-1] if len(result.similarities) else None
            self.save(result.steps_done, result.images, last, lastsim)
        self.manifest["steps_done"] = result.steps_done
        self.manifest["interrupted"] = result.interrupted
        sheet = contact_sheet(self.images)
        save_png(self.out_dir / CONTACT_SHEET, sheet, {"Description": "clipguide contact sheet"})
        self.manifest["contact_sheet"] = CONTACT_SHEET
        save_json(self.out_dir / MANIFEST, self.manifest)
        return self.out_dir


def contact_sheet(images: dict[int, list[Image.Image]], label_height: int = 14) -> Image.Image:
    """Grid of snapshots: one row per run, one column per step, each labelled 'step N'."""
    steps = sorted(images)
    w, h = images[steps[0]][0].size
    rows = len(images[steps[0]])
    sheet = Image.new("RGB", (w * len(steps), (h + label_height) * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for c, step in enumerate(steps):
        for r, im in enumerate(images[step]):
            y = r * (h + label_height)
            draw.text((c * w + 2, y + 1), f"step {step}", fill="black")
            sheet.paste(im, (c * w, y + label_height))
    return sheet
