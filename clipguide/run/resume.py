"""Continuing a run folder from its checkpoint (``clipguide resume``)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..engine.loop import describe_models
from ..engine.prompts import run_parents
from ..engine.state import Checkpoint, differing
from ..errors import CheckpointError, ConfigError, WeightsError
from ..models.loading import load_models, load_prior_of, load_ranker_of
from ..records.checkpoints import FILENAME, read_checkpoint
from ..records.files import remove_temporaries
from ..records.manifest import environment, environment_differences, read_manifest
from .checkpoints import DEFAULT_EVERY
from .session import recorded_audit, run_session


@dataclass(eq=False)
class Resumption:
    """A run directory opened to continue it (:func:`open_run`), its models loaded."""

    run_dir: Path
    checkpoint: Checkpoint
    manifest: dict
    config: RunConfig
    decoder: object
    clip: object
    models: dict
    every: int
    audit: dict = field(default_factory=dict)  # the output filter and scorer the run was made with

    @property
    def recorded_environment(self) -> dict:
        return self.checkpoint.info.get("environment") or {}

    def differences(self) -> list[str]:
        """What differs from the environment the checkpoint was written in (then the
        continuation is not bit-identical to an uninterrupted run)."""
        return [f"{k} {then} -> {now}" for k, then, now in environment_differences(self.recorded_environment, environment())]

    def run(self, callback=None):
        """Continue the run to ``config.steps``: snapshots, manifest and checkpoints go on in the run directory."""
        return run_session(self.config, self.run_dir, models=(self.decoder, self.clip), preset=self.manifest.get("preset"),
                           callback=callback, checkpoint_every=self.every, checkpoint=self.checkpoint,
                           manifest=self.manifest, **self.audit)


def open_run(run_dir, steps: int | None = None, checkpoint_every: int | None = None) -> Resumption:
    """Read and check a run directory's manifest and checkpoint, load its models (the same
    weights, by sha256) and its image inputs (unchanged, by sha256); ``steps`` extends the run."""

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: give the run directory (--out) of a clipguide run")
    manifest = read_manifest(run_dir)
    checkpoint = read_checkpoint(run_dir / FILENAME)
    differ = differing(RunConfig.from_dict(manifest["config"]), checkpoint.config)
    if differ:
        raise CheckpointError(f"{run_dir / FILENAME} and {run_dir / 'manifest.json'} describe different runs "
                              f"({', '.join(differ)} differ): the checkpoint was not used; start the run again")
    cfg = checkpoint.config
    if steps is not None:
        if steps < checkpoint.step:
            raise ConfigError(f"--steps {steps} is before the checkpoint's step {checkpoint.step}: "
                              f"pass {checkpoint.step} or more")
        cfg = cfg.replace(steps=steps)
    decoder, clip = load_models(cfg)
    models = json.loads(json.dumps(describe_models(decoder, clip, cfg, load_prior_of(cfg), load_ranker_of(cfg))))
    then = checkpoint.info.get("models") or manifest["models"]
    if then != models:
        raise WeightsError(f"the models differ from those {run_dir} was made with ({_model_change(then, models)}): "
                           "resuming would not continue the same run; restore those weight files")
    for run in manifest["runs"]:
        now = [p["sha256"] for p in run_parents(run["prompt"], cfg.init_image)]
        if now != [p.get("sha256") for p in run["parents"]]:
            files = ", ".join(p.get("file", "?") for p in run["parents"])
            raise ConfigError(f"an input image of {run_dir} ({files}) changed since the run started "
                              "(sha256 differs): restore it to resume the run")
    audit = recorded_audit(manifest, cfg.device, run_dir)
    remove_temporaries(run_dir)
    every = checkpoint.info.get("every", DEFAULT_EVERY) if checkpoint_every is None else checkpoint_every
    return Resumption(run_dir, checkpoint, manifest, cfg, decoder, clip, models, every, audit)


def resume(run_dir, callback=None, steps: int | None = None, checkpoint_every: int | None = None):
    """Continue the run in ``run_dir`` (written by ``clipguide generate`` or ``generate(out_dir=...)``)
    from its checkpoint, to its ``steps`` or to ``steps`` if given (extending it).

    The steps since the last checkpoint are recomputed; with the torch version, thread count
    and device the run started with, every snapshot is bit-identical to an uninterrupted run
    (a warning names what differs otherwise).  Returns the :class:`~clipguide.Result` of the
    whole run (losses from step 0); its ``snapshots`` are those taken after resuming.
    """
    opened = open_run(run_dir, steps, checkpoint_every)
    differences = opened.differences()
    if differences:
        warnings.warn(f"resuming {opened.run_dir} in another environment ({'; '.join(differences)}): "
                      "the continuation will not be bit-identical to an uninterrupted run", stacklevel=2)
    return opened.run(callback)


def _model_change(then, now: dict) -> str:
    """Which models differ, e.g. "decoder shapes-dvae sha256 3f2a... -> 9c01..."."""
    then = then if isinstance(then, dict) else {}
    out = []
    for role, model in now.items():
        old = then.get(role) if isinstance(then.get(role), dict) else {}
        if old != model:
            out.append(f"{role} {old.get('name')} sha256 {str(old.get('sha256'))[:12]} -> "
                       f"{model.get('name')} sha256 {str(model.get('sha256'))[:12]}")
            if old.get("encoder_sha256") != model.get("encoder_sha256"):  # a dVAE's own encoder.pkl (--init-image)
                out[-1] += (f" (encoder sha256 {str(old.get('encoder_sha256'))[:12]} -> "
                            f"{str(model.get('encoder_sha256'))[:12]})")
    return "; ".join(out) or "different descriptions"
