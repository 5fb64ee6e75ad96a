"""Snapshots as a step callback: PNGs with provenance, a manifest, a contact sheet.

Nothing is written unless a :class:`Snapshotter` is among the loop's callbacks (:func:`~clipguide.run.session.run_session`
adds one for every run folder).  Every file is written atomically (:mod:`clipguide.records.files`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..audit.classification import resolve_clip
from ..audit.scores import FORMULA, clip_scores, scorer_info
from ..config import RunConfig
from ..engine.noise_init import noise_record
from ..engine.prompts import run_parents
from ..errors import ConfigError
from ..records.files import save_json, save_png, to_pil
from ..records.manifest import MANIFEST, environment, run_subdir

CONTACT_SHEET = "contact_sheet.png"
SHEET_INTERVAL_COLUMNS = 16  # --snapshot-every's snapshots on a contact sheet at most (memory, width)


FLAGGED = "flagged"  # originals of images the output filter flagged (only with keep_flagged)


def check_out_dir(out_dir: Path, overwrite: bool = False) -> Path:
    """Refuse, creating nothing, an ``out_dir`` that is a file, an existing non-empty one unless
    ``overwrite``, or one under a file or a folder this process cannot write to."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory: choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output directory {out_dir} already exists: pass --overwrite to replace its run, or choose another --out")
    parent = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "a file" if not parent.is_dir() else "not writable"
        raise ConfigError(f"cannot write to output directory {out_dir} ({parent} is {why}): choose a writable --out")
    return out_dir


def prepare_out_dir(out_dir: Path, overwrite: bool = False) -> Path:
    """Create ``out_dir``; refuse an existing non-empty one unless ``overwrite``; check it is writable."""
    out_dir = check_out_dir(out_dir, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write to output directory {out_dir} ({e.strerror}): choose a writable --out") from None
    return out_dir


def on_sheet(config: RunConfig, step: int) -> bool:
    """Whether a snapshot goes on the contact sheet: all do, except that of the steps kept only by
    ``snapshot_every`` (not listed, not the last) just every k-th multiple is shown, k chosen so that
    at most SHEET_INTERVAL_COLUMNS are (with every:1 a sheet of every step would not fit in memory)."""
    every = config.snapshot_every
    if not every or step % every or step in config.snapshots or step == config.steps:
        return True
    k = -(-(config.steps // every + 1) // SHEET_INTERVAL_COLUMNS)  # ceil: multiples of every, 0 included
    return step % (every * k) == 0


def started(config: RunConfig, seed: int) -> dict:
    """A run's generated start for its manifest entry: ``{"init_noise": {kind, seed, size, sha256}}`` with
    --init-noise (no file: the run's seed makes it again, the sha256 checks that), else nothing."""
    if not config.init_noise:
        return {}
    return {"init_noise": noise_record(config.init_noise, seed, *config.dims())}


class Snapshotter:
    """Step callback saving the images at ``config.snapshot_steps()`` (plus the final step).

    Layout: one run -> ``OUT/step_000100.png``; several -> ``OUT/run_00/step_000100.png``.
    ``manifest.json`` lists config, models, environment and every snapshot
    ``{run, step, file, loss, clip_similarity}``; ``contact_sheet.png`` shows them by step
    (those :func:`on_sheet` keeps: only they stay in memory).
    Each run lists its ``parents`` (init image and image prompts: file and sha256), and
    every PNG's provenance names its run directory, so lineages can be traced
    (:mod:`clipguide.records.lineage`).

    ``output_filter`` (:class:`~clipguide.audit.output_filter.OutputFilter`) screens every snapshot as it
    is written: a flagged one is saved blurred or withheld (its original under ``flagged/`` only
    with keep_flagged) and its entry records ``filter: {scores, flagged, concepts, action}``.
    ``scorer`` (a CLIP or spec) adds each snapshot's ``clip_score`` against its prompt and a
    manifest ``scores`` section (:mod:`clipguide.audit.scores`).
    """

    def __init__(self, out_dir, config: RunConfig, models: dict | None = None, preset: str | None = None,
                 overwrite: bool = False, output_filter=None, scorer=None):
        self.out_dir = prepare_out_dir(out_dir, overwrite)
        self.config, self.preset = config, preset
        self.runs = config.runs()
        parents = {p: run_parents(p, config.init_image) for p in config.prompts}
        self.manifest = {
            "preset": preset,
            "config": config.to_dict(),
            "models": models,
            "environment": environment(),
            "runs": [{"index": i, "prompt": p, "seed": s, "dir": self.run_dir(i), "parents": parents[p], **started(config, s)}
                     for i, (p, s) in enumerate(self.runs)],
            "snapshots": [],
            "steps_done": 0,
            "interrupted": False,
        }
        self.images: dict[int, list[Image.Image]] = {}  # the contact sheet's columns
        self.saved: set[int] = set()  # every step written (the sheet may show fewer)
        self.off_sheet: tuple[int, list] | None = None  # the latest snapshot on_sheet leaves out
        self.keep = set(config.snapshot_steps())
        self.recorded = False  # manifest.json written
        self.output_filter, self.scorer = output_filter, scorer
        if output_filter is not None:
            self.manifest["filter"] = output_filter.describe()
        if scorer is not None:

            self.scorer = resolve_clip(scorer, config.device)
            self.manifest["scores"] = {"scorer": scorer_info(self.scorer), "formula": FORMULA, "clip_score": []}

    def run_dir(self, i: int) -> str:
        return run_subdir(len(self.runs), i)

    def adopt(self, manifest: dict, step: int) -> None:
        """Continue the run recorded in ``manifest`` (from :func:`read_manifest`) at ``step``
        (``clipguide resume``): the record is kept (environment, snapshots, scores, ...; the
        config may have a new ``steps``), the snapshot images are reloaded for the contact
        sheet, and a step already recorded is not written again."""
        resumed = [*manifest.get("resumed", []), {"step": step, "environment": environment()}]
        self.manifest = {**manifest, "config": self.manifest["config"], "resumed": resumed}
        rows: dict[int, dict[int, Image.Image]] = {}
        for snap in manifest["snapshots"]:
            self.saved.add(snap["step"])
            if not on_sheet(self.config, snap["step"]):
                continue
            path = self.out_dir / snap["file"]
            try:
                with Image.open(path) as im:
                    rows.setdefault(snap["step"], {})[snap["run"]] = im.convert("RGB")
            except Exception as e:  # noqa: BLE001 - missing, truncated, not an image: PIL raises many types
                raise ConfigError(f"snapshot {path} listed in {MANIFEST} is missing or unreadable ({type(e).__name__}): "
                                  "restore it, or start the run again") from None
        for k, row in rows.items():
            blank = Image.new("RGB", next(iter(row.values())).size, "gray")  # a run whose file is not listed
            self.images[k] = [row.get(i, blank) for i in range(len(self.runs))]

    def __call__(self, state) -> None:
        if not self.recorded:  # from the first step on, so that a run killed before its first snapshot can resume
            self.record_loop(state)
            self.recorded = True
            save_json(self.out_dir / MANIFEST, self.manifest)
        if state.step in self.keep or state.step == self.config.steps:
            self.save(state.step, state.image(), state.loss, state.similarity)

    def record_loop(self, loop) -> None:
        """Take what the loop reports (its StepState or Result): the description of its models (one given
        to the constructor must match it, or ``clipguide resume`` would later refuse the run as made with
        other models) and the device it runs on (the config may say auto)."""
        given = self.manifest["models"]
        if given is not None and json.loads(json.dumps(given)) != json.loads(json.dumps(loop.models)):
            raise ConfigError(f"the models given to Snapshotter ({given!r:.80}) are not those the loop runs with: "
                              "leave models out, the loop describes its own")
        self.manifest["models"] = loop.models
        self.config = self.config.replace(device=loop.config.device)
        self.manifest["config"] = self.config.to_dict()

    def save(self, step: int, images: torch.Tensor, loss=None, similarity=None) -> None:
        if step in self.saved:
            return
        self.saved.add(step)
        column = self.images[step] = []
        audits = self.audit(images)
        for i, ((prompt, seed), img) in enumerate(zip(self.runs, images)):
            rel = Path(self.run_dir(i)) / f"step_{step:06d}.png"
            (self.out_dir / rel.parent).mkdir(exist_ok=True)
            provenance = self.provenance(prompt, seed, step, run=i)
            pil = self.screen(to_pil(img), rel, provenance, audits[i])
            save_png(self.out_dir / rel, pil, provenance)
            column.append(pil)
            self.manifest["snapshots"].append({
                "run": i, "step": step, "file": rel.as_posix(),
                "loss": None if loss is None else float(loss[i]),
                "clip_similarity": None if similarity is None else float(similarity[i]),
                **audits[i],
            })
        if not on_sheet(self.config, step):  # kept aside only while it is the latest (an interrupted run's last)
            self.off_sheet = (step, self.images.pop(step))
        if self.scorer is not None:  # the latest snapshot of every run
            self.manifest["scores"]["clip_score"] = [{"run": i, "step": step, "clip_score": a["clip_score"]}
                                                     for i, a in enumerate(audits)]
        self.manifest["steps_done"] = max(self.manifest["steps_done"], step)
        save_json(self.out_dir / MANIFEST, self.manifest)

    def audit(self, images: torch.Tensor) -> list[dict]:
        """Per run: the output filter's decision and the scorer's CLIP score, when asked for."""
        audits = [{} for _ in self.runs]
        if self.output_filter is not None:
            for entry, decision in zip(audits, self.output_filter.check(images)):
                entry["filter"] = decision
        if self.scorer is not None:

            for entry, score in zip(audits, clip_scores(images, [p for p, _ in self.runs], self.scorer)):
                entry["clip_score"] = score
        return audits

    def screen(self, pil: Image.Image, rel: Path, provenance: dict, audit: dict) -> Image.Image:
        """The image to save: a flagged one blurred or withheld, its original kept only with keep_flagged."""
        decision = audit.get("filter")
        if decision is None:
            return pil
        audit["filter"] = provenance["clipguide"]["filter"] = decision.to_dict()
        if not decision.is_flagged:
            return pil
        if self.output_filter.keep_flagged:
            original = Path(FLAGGED) / rel
            (self.out_dir / original.parent).mkdir(parents=True, exist_ok=True)
            save_png(self.out_dir / original, pil, provenance)
            audit["filter"]["original"] = original.as_posix()
        return self.output_filter.apply(pil, decision)

    def provenance(self, prompt: str, seed: int, step: int, run: int = 0) -> dict:
        m = self.manifest
        return {"Description": prompt, "clipguide": {
            "prompt": prompt, "seed": seed, "step": step, "preset": self.preset, "models": m["models"],
            "version": m["environment"]["clipguide"], "config": m["config"],
            "run": run, "run_dir": str(self.out_dir.resolve()), "parents": m["runs"][run]["parents"]}}

    def finish(self, result) -> Path:
        """Save the final image if not saved yet (interrupted runs), the manifest and the contact sheet."""
        if not self.recorded:  # interrupted before the first step's callbacks
            self.record_loop(result)
        if result.steps_done not in self.saved:
            last = result.losses[-1] if len(result.losses) else None
            lastsim = result.similarities[-1] if len(result.similarities) else None
            self.save(result.steps_done, result.images, last, lastsim)
        if self.off_sheet is not None and self.off_sheet[0] == result.steps_done:  # the sheet ends on the last image
            self.images[result.steps_done] = self.off_sheet[1]
        self.manifest["steps_done"] = result.steps_done
        self.manifest["interrupted"] = result.interrupted
        sheet = contact_sheet(self.images, rows=row_labels(self.runs))
        record = {k: self.manifest[k] for k in ("preset", "config", "models", "environment", "runs")}
        save_png(self.out_dir / CONTACT_SHEET, sheet, {"Description": "clipguide contact sheet", "clipguide": record})
        self.manifest["contact_sheet"] = CONTACT_SHEET
        save_json(self.out_dir / MANIFEST, self.manifest)
        return self.out_dir


def contact_sheet(images: dict[int, list[Image.Image]], label_height: int = 14,
                  rows: list[str] | None = None) -> Image.Image:
    """Grid of snapshots: one row per run, one column per step, each labelled 'step N'.

    ``rows`` (e.g. :func:`row_labels`), one per run, adds a grey band of ``label_height``
    pixels above each row with its label, cut with an ellipsis to the sheet's width."""
    steps = sorted(images)
    w, h = images[steps[0]][0].size
    n = len(images[steps[0]])
    if rows is not None and len(rows) != n:
        raise ValueError(f"contact_sheet: {len(rows)} row labels for {n} runs")
    band = 0 if rows is None else label_height
    row_h = band + label_height + h
    sheet = Image.new("RGB", (w * len(steps), row_h * n), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(n if rows is not None else 0):
        draw.rectangle((0, r * row_h, sheet.width - 1, r * row_h + band - 1), fill=ROW_BAND)
        draw.text((2, r * row_h + 1), fit_text(rows[r], sheet.width - 4, draw), fill="black")
    for c, step in enumerate(steps):
        for r, im in enumerate(images[step]):
            y = r * row_h + band
            draw.text((c * w + 2, y + 1), f"step {step}", fill="black")
            sheet.paste(im, (c * w, y + label_height))
    return sheet


ROW_BAND = (224, 224, 224)  # background of a contact sheet's row labels


def row_labels(runs) -> list[str]:
    """A contact sheet's row labels, 'run I · seed S · PROMPT', for ``runs`` [(prompt, seed)]
    (whitespace in a prompt, newlines included, becomes single spaces)."""
    return [f"run {i} · seed {seed} · {' '.join(str(prompt).split())}" for i, (prompt, seed) in enumerate(runs)]


def fit_text(text: str, width: float, draw: ImageDraw.ImageDraw) -> str:
    """``text`` as drawn in ``draw``'s font, cut with an ellipsis to at most ``width`` pixels
    ("" when not even the ellipsis fits).  PIL's bitmap font (no FreeType) has only Latin-1:
    it gets '...' and '?' for the other characters."""
    font = draw.getfont()
    ellipsis = "…"
    if not isinstance(font, ImageFont.FreeTypeFont):
        text, ellipsis = text.encode("latin-1", "replace").decode("latin-1"), "..."
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis: text[:lo]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid].rstrip() + ellipsis, font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    cut = text[:lo].rstrip() + ellipsis
    return cut if draw.textlength(cut, font=font) <= width else ""
