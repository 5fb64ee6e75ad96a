"""Replay a recorded run from its ``manifest.json`` and check it reproduces bit for bit.

A run is reproducible bit for bit when the seed, the batch, the clipguide / torch / python
versions, the thread count, the device and the model weights are the same (README,
"Reproducibility").  :func:`replay` rebuilds the recorded :class:`RunConfig`, re-runs it
with the recorded seeds and thread count, compares every recorded snapshot pixel for pixel
and names whatever differs from the record.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import RunConfig
from ..engine.loop import describe_models
from ..errors import ConfigError
from ..models.loading import load_models, load_prior_of, load_ranker_of
from ..records.files import read_png_text
from ..records.images import sha256_of
from ..records.manifest import MANIFEST, environment, environment_differences, read_manifest
from .session import recorded_audit, run_session


@dataclass
class SnapshotCheck:
    """One recorded snapshot against its replay."""

    run: int
    step: int
    file: str
    max_abs_diff: int | None  # largest |recorded - replayed| of any pixel channel, 0..255; None: not comparable
    note: str = ""  # why it could not be compared

    @property
    def identical(self) -> bool:
        return self.max_abs_diff == 0

    def describe(self) -> str:
        what = self.note or f"max abs pixel difference {self.max_abs_diff}/255"
        return f"run {self.run} step {self.step} ({self.file}): {what}"


@dataclass
class ReplayReport:
    """What a replay reproduced: ``identical`` when every recorded snapshot came back bit for
    bit; ``differences`` lists what differs from the record (set-up first, then pixels)."""

    manifest: Path
    out_dir: Path | None  # where the replay wrote its run (None: a temporary folder, removed)
    snapshots: list[SnapshotCheck]
    setup: list[str] = field(default_factory=list)  # recorded vs replayed: versions, threads, models, inputs

    @property
    def identical(self) -> bool:
        return bool(self.snapshots) and all(s.identical for s in self.snapshots)

    @property
    def differences(self) -> list[str]:
        return self.setup + [s.describe() for s in self.snapshots if not s.identical]

    def __str__(self) -> str:
        n, bad = len(self.snapshots), sum(not s.identical for s in self.snapshots)
        head = (f"identical: all {n} recorded snapshots reproduced bit for bit" if self.identical
                else f"DIFFERENT: {bad} of {n} recorded snapshots differ")
        return "\n".join([f"replay of {self.manifest}: {head}"] + [f"  {d}" for d in self.differences])


def replay(manifest_path, out_dir=None, threads: int | None = None, device: str | None = None,
           overwrite: bool = False) -> ReplayReport:
    """Re-run the run recorded in ``manifest_path`` (or a run directory) and compare.

    ``threads`` defaults to the recorded thread count and ``device`` to the recorded one;
    the replay is written to ``out_dir`` (kept) or a temporary folder (removed).
    An unreadable or inconsistent manifest raises :class:`ConfigError` (one line).
    """
    path = Path(manifest_path).expanduser()
    path = path / MANIFEST if path.is_dir() else path
    manifest = read_manifest(path)  # checked: its config rebuilds and its runs match it
    recorded = RunConfig.from_dict(manifest["config"])
    cfg = replay_config(manifest, recorded, device)
    if out_dir is not None and Path(out_dir).resolve() == path.parent.resolve():
        raise ConfigError(f"--out {out_dir} is the recorded run itself: replay into another folder")
    n_threads = threads or int(manifest.get("environment", {}).get("threads") or torch.get_num_threads())
    with _torch_threads(n_threads), _folder(out_dir) as out:
        models = _run(cfg, out, manifest.get("preset"), overwrite, recorded_audit(manifest, cfg.device, path.parent))
        setup = _setup_differences(manifest, path, recorded, cfg, models)
        checks = [_compare(path.parent / s["file"], out / s["file"], s) for s in manifest["snapshots"]]
    return ReplayReport(path, None if out_dir is None else Path(out_dir), checks, setup)


def replay_config(manifest: dict, recorded: RunConfig, device: str | None) -> RunConfig:
    """The recorded config; an interrupted run replays up to the step it reached (snapshot k
    of any run equals the end of a k-step run, so this reproduces its images)."""
    cfg = (recorded.replace(device=device) if device else recorded).resolved()  # old manifests may say "auto"
    if manifest.get("interrupted"):
        done = int(manifest.get("steps_done") or 0)
        if done < 1:
            raise ConfigError("the recorded run was interrupted before its first step: there is nothing to replay")
        cfg = cfg.replace(steps=done, snapshots=tuple(s for s in cfg.snapshots if s <= done))
    return cfg


def _run(cfg: RunConfig, out: Path, preset: str | None, overwrite: bool, audit: dict) -> dict:
    decoder, clip = load_models(cfg)
    prior, ranker = load_prior_of(cfg), load_ranker_of(cfg)
    run_session(cfg, out, models=(decoder, clip), prior=prior, ranker=ranker, preset=preset, overwrite=overwrite, **audit)
    return describe_models(decoder, clip, cfg, prior, ranker)


def _setup_differences(manifest: dict, path: Path, recorded: RunConfig, cfg: RunConfig, models: dict) -> list[str]:
    """Everything bit-exactness depends on that differs between the record and this replay."""
    out = []
    differs = environment_differences(manifest.get("environment", {}), environment())
    out += [f"{k}: recorded {then}, replayed with {now}" for k, then, now in differs]
    if cfg.device != recorded.device:
        out.append(f"device: recorded {recorded.device}, replayed on {cfg.device}")
    if cfg.steps != recorded.steps:
        out.append(f"the recorded run was interrupted at step {cfg.steps} of {recorded.steps}: replayed {cfg.steps} steps")
    for role in ("decoder", "clip", "prior", "prior_clip"):  # the last two where the run has them
        was, got = manifest.get("models", {}).get(role) or {}, models.get(role) or {}
        for key in ("name", "sha256", "encoder_sha256"):  # encoder_sha256: a dVAE's encoder.pkl, init-image runs only
            if was.get(key) != got.get(key):
                out.append(f"{role} {key}: recorded {was.get(key)}, replayed with {got.get(key)}")
    out += _input_differences(manifest)
    out += _provenance_differences(manifest, path)
    return out


def _input_differences(manifest: dict) -> list[str]:
    """Init images and image prompts that changed on disk since the run."""

    out = []
    for run in manifest["runs"]:
        for p in run.get("parents", []):
            now = sha256_of(p["source"])
            if now != p.get("sha256"):
                out.append(f"{p['role']} {p['source']}: recorded sha256 {p.get('sha256')}, now {now}")
    return out


def _provenance_differences(manifest: dict, path: Path) -> list[str]:
    """Runs whose prompt or seed in the manifest disagree with their PNGs' own provenance."""
    out = []
    for snap in manifest["snapshots"]:
        run = manifest["runs"][snap["run"]]
        file = path.parent / snap["file"]
        prov = read_png_text(file).get("clipguide", {}) if file.is_file() else {}
        for key in ("prompt", "seed"):
            if prov and prov.get(key) != run.get(key):
                out.append(f"run {snap['run']} {key}: the manifest says {run.get(key)!r}, "
                           f"{snap['file']}'s provenance says {prov.get(key)!r}")
    return list(dict.fromkeys(out))


def _compare(recorded: Path, replayed: Path, snap: dict) -> SnapshotCheck:
    check = SnapshotCheck(int(snap["run"]), int(snap["step"]), snap["file"], None)
    for file, whose in ((recorded, "recorded"), (replayed, "replayed")):
        if not file.is_file():
            check.note = f"the {whose} file {file} is missing"
            return check
    a, b = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in (recorded, replayed))
    if a.shape != b.shape:
        check.note = f"recorded size {a.shape[1]}x{a.shape[0]}, replayed {b.shape[1]}x{b.shape[0]}"
        return check
    check.max_abs_diff = int(np.abs(a - b).max())
    return check


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _folder(out_dir):
    if out_dir is not None:
        yield Path(out_dir)
        return
    with tempfile.TemporaryDirectory(prefix="clipguide-replay-") as tmp:
        yield Path(tmp) / "run"
