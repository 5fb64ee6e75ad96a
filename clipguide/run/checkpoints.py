"""Checkpoints as a step callback: the loop's state written every N steps, at every listed snapshot and at the end.

The snapshots of ``--snapshot-every`` (``--snapshots every:N``) write none of their own: with every:1 that
would be a checkpoint (latent and optimiser moments) per step; ``--checkpoint-every`` sets their interval.
A resume from a checkpoint behind the last snapshot recomputes the steps between and leaves the
snapshots already written as they are (bit-identical anyway)."""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..engine.state import Checkpoint
from ..errors import ConfigError
from ..records.checkpoints import FILENAME, write_checkpoint
from ..records.manifest import environment

DEFAULT_EVERY = 50


class Checkpointer:
    """Step callback writing ``OUT/checkpoint.safetensors`` every ``every`` steps (0: none
    between snapshots), at every step of ``config.snapshots`` and the last step, and on :meth:`finish`
    (after Ctrl-C too).  :func:`~clipguide.run.session.run_session` calls it after the
    :class:`~clipguide.run.snapshots.Snapshotter`, so that a checkpoint is never ahead of the
    snapshots on disk.  A fresh run removes an older run's checkpoint; a resumed one passes
    ``resumed_at``, the step of the checkpoint it starts from."""

    def __init__(self, out_dir, every: int = DEFAULT_EVERY, *, models: dict | None = None, preset: str | None = None,
                 resumed_at: int | None = None):
        if not isinstance(every, int) or every < 0:
            raise ConfigError(f"--checkpoint-every must be 0 (only at snapshots) or a number of steps, got {every}")
        self.path = Path(out_dir) / FILENAME
        self.every, self.step = every, resumed_at  # step: that of the checkpoint on disk
        self.info = {"models": models, "preset": preset, "every": every}
        if resumed_at is None:
            self.path.unlink(missing_ok=True)

    def due(self, cfg: RunConfig, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step in cfg.snapshots or step == cfg.steps

    def __call__(self, state) -> None:
        self.info["models"] = self.info["models"] or state.models  # the loop's own description
        if state.step != self.step and self.due(state.config, state.step):
            self.write(state.checkpoint())

    def finish(self, result) -> None:
        """Write the state the loop stopped in, unless that checkpoint is on disk already."""
        self.info["models"] = self.info["models"] or result.models
        if result.checkpoint is not None and result.checkpoint.step != self.step:
            self.write(result.checkpoint)

    def write(self, checkpoint: Checkpoint) -> None:
        write_checkpoint(self.path, checkpoint, {**self.info, "environment": environment()})
        self.step = checkpoint.step
