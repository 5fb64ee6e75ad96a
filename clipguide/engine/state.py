"""What the loop hands out and takes back: a step's state, the result, the resumable checkpoint.

A :class:`Checkpoint` "at step k" follows the loop's order (callbacks see step k before update k):
the latent and optimiser after k updates, the generators as they were before forward k drew
from them, and the losses of steps 0..k-1.  Resuming recomputes forward k from there, so the
continued run is the uninterrupted one, bit for bit, on the same torch, thread count and device.
Its file format is :mod:`clipguide.records.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, error_detail
from .latents import Latent

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig


OUTPUT_ONLY = ("steps", "snapshots", "snapshot_every")  # config fields a resume may change: they do not alter the computation


@dataclass(eq=False)
class Checkpoint:
    """The loop's state after ``step`` updates (see the module docstring for what "at step k" holds)."""

    step: int
    config: RunConfig
    latent: dict  # Latent.state_dict(): param, EMA, anchor, inverse temperature
    optimiser: dict  # torch optimiser state_dict: {"state": {index: {name: tensor}}, "param_groups": [...]}
    generators: list  # one ByteTensor per run: torch.Generator.get_state() before forward `step`
    losses: torch.Tensor  # [step, B]: steps 0..step-1
    similarities: torch.Tensor  # [step, B]
    info: dict = field(default_factory=dict)  # recorded with the file: models, preset, environment, every

    def restore(self, cfg: RunConfig, latent, optimiser, generators) -> None:
        """Load this state into a fresh loop of ``cfg`` (the config it was made with; ``steps``
        and ``snapshots`` may differ)."""
        differ = differing(self.config, cfg)
        if differ:
            raise ConfigError(f"the checkpoint was made with another config ({', '.join(differ)} differ): "
                              "resume it with its own config (only --steps may change)")
        if self.step > cfg.steps:
            raise ConfigError(f"the checkpoint is at step {self.step}, beyond --steps {cfg.steps}: "
                              f"pass --steps {self.step} or more")
        if len(self.losses) != self.step or len(self.similarities) != self.step:
            raise CheckpointError(f"the checkpoint at step {self.step} holds a loss history of {len(self.losses)} "
                                  "steps: it was not used")
        try:
            latent.load_state_dict(self.latent, strict=True)
            optimiser.load_state_dict(self.optimiser)
            for g, state in zip(generators, self.generators, strict=True):
                g.set_state(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint does not fit this run ({error_detail(e)}): it was not used") from None


def differing(a: RunConfig, b: RunConfig) -> list[str]:
    """The fields in which two configs describe different computations."""
    a, b = a.to_dict(), b.to_dict()
    return [k for k in a if k not in OUTPUT_ONLY and a[k] != b[k]]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # RunConfig.precision -> decoder and CLIP arithmetic


@dataclass(frozen=True, eq=False)
class StepState:
    """What a callback sees after ``step`` optimiser updates (step 0: the initial latent)."""

    step: int
    steps: int
    loss: torch.Tensor  # [B] per-run loss at this step
    similarity: torch.Tensor  # [B] CLIP cosine to the prompt's positive targets
    lr: float
    runs: list
    config: RunConfig
    models: dict  # describe_models(decoder, clip): names, weight sha256s (what manifests record)
    _image: Callable[[], torch.Tensor] = field(repr=False, default=None)
    _checkpoint: Callable[[], Checkpoint] = field(repr=False, default=None)

    def image(self) -> torch.Tensor:
        """Display decode of the current latent, [B, 3, H, W] in [0, 1] on the CPU (computed once)."""
        return self._image()

    def checkpoint(self) -> Checkpoint:
        """The loop's state at this step, copied to the CPU (computed once; call it during the
        callback): ``optimise(..., resume_from=it)`` continues from here bit for bit."""
        return self._checkpoint()


@dataclass(eq=False)
class Result:
    images: torch.Tensor  # [B, 3, H, W] final images in [0, 1] (CPU)
    snapshots: dict  # step -> [B, 3, H, W] images at config.snapshot_steps() (CPU)
    losses: torch.Tensor  # [steps_done + 1, B]
    similarities: torch.Tensor  # [steps_done + 1, B]
    config: RunConfig
    runs: list  # [(prompt, seed)] in batch order
    steps_done: int
    interrupted: bool
    latent: torch.Tensor  # final optimised parameter (CPU)
    models: dict = field(default_factory=dict)  # describe_models(decoder, clip)
    checkpoint: Checkpoint | None = field(default=None, repr=False)  # the state after steps_done updates


def make_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per run: CPU draws make seeds portable across devices."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def display_seed(seed: int, step: int) -> int:
    """A seed for snapshot-time noise that depends only on (run seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1)[0])


def capture(cfg: RunConfig, step: int, latent: Latent, opt, gen_states, losses, sims, copy: bool) -> Checkpoint:
    """The resumable state after ``step`` updates (``losses``/``sims`` may run past it);
    ``copy`` when the loop goes on mutating the latent and optimiser."""
    def cpu(t):
        return t.detach().to("cpu", copy=copy)

    state = opt.state_dict()
    optimiser = {"state": {i: {k: cpu(v) if torch.is_tensor(v) else v for k, v in s.items()}
                           for i, s in state["state"].items()},
                 "param_groups": state["param_groups"]}
    b = len(gen_states)
    return Checkpoint(
        step=step, config=cfg, latent={k: cpu(v) for k, v in latent.state_dict().items()}, optimiser=optimiser,
        generators=[g.clone() for g in gen_states],
        losses=torch.stack(losses[:step]) if step else torch.empty(0, b),
        similarities=torch.stack(sims[:step]) if step else torch.empty(0, b),
    )
