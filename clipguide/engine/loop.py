"""The optimisation loop: one plain entry point, :func:`optimise`.

CLIP-guided generation through a discrete decoder (advadnoun's Aleph2Image, Crowson's dVAE+CLIP;
docs/methods.md §2, §5): each step the latent is rendered to pixels (:mod:`~clipguide.engine.render`)
and judged by an objective (:mod:`~clipguide.engine.objective`; by default CLIP's loss over random
cutouts toward the prompt), whose gradient updates the latent.  A batch holds independent runs
(prompts x seeds); each run draws all its randomness from its own ``torch.Generator``, so the same
seed, batch and thread count give the same image bit for bit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..errors import ConfigError, NonFiniteError
from .augments import require_kornia
from .devices import AUTO, compiled, to_host
from .latents import Latent, check_latent, make_latent
from .objective import Objective, View, prompt_objective
from .optimisers import make_optimiser
from .prompts import encode_targets
from .proposals import check_prior, propose
from .render import Renderer
from .state import DTYPES, Checkpoint, Result, StepState, capture, make_generators
from .zoom import Zoom, check_zoom, make_zoom

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig

Callback = Callable[[StepState], None]


def describe_clip(clip) -> dict | None:
    """A CLIP's record in a run's models (None for a run without one)."""
    return None if clip is None else {"name": clip.name, "sha256": clip.sha256, "image_size": clip.image_size}


def describe_models(decoder, clip, cfg: RunConfig | None = None, prior=None, ranker=None) -> dict:
    """What identifies the models of a run: names, weight sha256s, sizes (recorded with its files).
    With ``cfg``: a run with an init image also records a dVAE encoder kept in its own file (OpenAI's
    encoder.pkl), which this loads; see DalleDecoder.describe for why it depends on ``cfg`` only.
    ``ranker``: the CLIP of ``cfg.prior_clip``, which rated the prior's proposals."""
    encodes = cfg is not None and bool(cfg.init_image or cfg.init_noise or cfg.zoom_every)  # the zoom re-encodes too
    record = {"decoder": decoder.describe(encoder=encodes), "clip": describe_clip(clip)}
    if prior is not None:
        record["prior"] = prior.describe()
    if ranker is not None:
        record["prior_clip"] = describe_clip(ranker)
    return record


def as_callbacks(callback) -> list:
    """A callback, a sequence of them, or None -> a list (the one form every caller passes on)."""
    if callback is None:
        return []
    return [callback] if callable(callback) else list(callback)


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based); independent of the run length, so a
    k-step run and the first k steps of a longer run are the same computation."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else 1.0
    return cfg.lr * cfg.lr_growth**step * warm


def grid_of(cfg: RunConfig, decoder) -> tuple[int, int]:
    """The token grid (h, w) of the output: its height and width over the decoder's factor."""
    f = decoder.downsample
    width, height = cfg.dims()
    for side, value in (("width", width), ("height", height)):
        if value % f:
            lo, hi = value // f * f or f, (value // f + 1) * f
            if width == height:
                raise ConfigError(f"--size {value} is not a multiple of the decoder's factor {f}: use {lo} or {hi}")
            raise ConfigError(f"--size {width},{height}: the {side} {value} is not a multiple of the decoder's factor "
                              f"{f}: use a {side} of {lo} or {hi}")
    return height // f, width // f


def check_fits(cfg: RunConfig, decoder, prior=None, ranker=None) -> None:
    """Raise ConfigError for what ``cfg`` asks of ``decoder`` (and ``prior``, ``ranker``) that they cannot do (the
    size, the latent, the prior's grid), so that callers can refuse a run before they create its folder."""
    check_latent(cfg, decoder.vocab_size, decoder)
    if cfg.augments:  # Kornia is optional: its absence is one line before anything is written
        require_kornia()
    check_zoom(cfg, decoder)
    check_prior(cfg, prior, decoder.vocab_size, grid_of(cfg, decoder), ranker)


def code_bias(cfg: RunConfig, decoder) -> torch.Tensor | None:
    """Crowson's -100 logit bias on the codes the decoder blacklists (``--blacklist``; docs/methods.md §2), or None."""
    codes = decoder.blacklisted_codes() if cfg.blacklist else []
    if not codes:
        return None
    bias = torch.zeros(decoder.vocab_size)
    bias[codes] = -100.0
    return bias


COMPILED = {"decoder": ("decode", "decode_z"), "clip": ("encode_image",)}  # what --compile compiles


def cast_decoder(cfg: RunConfig, decoder):
    """The decoder in ``cfg.precision`` (cast once per run, not per step), compiled with ``cfg.compile``."""
    return compiled(decoder.cast(DTYPES[cfg.precision]), COMPILED["decoder"], cfg.compile)


class Step:
    """One step of a batch of runs: the latent rendered, judged by the objective, and (with ``backward``)
    the objective's gradient back-propagated into the latent in one pass."""

    def __init__(self, renderer: Renderer, objective: Objective):
        self.renderer, self.objective = renderer, objective

    @classmethod
    def for_prompts(cls, cfg: RunConfig, decoder, clip, latent: Latent, targets, seeds, prior=None) -> "Step":
        """The step of the default objective (:func:`~clipguide.engine.objective.prompt_objective`), with
        the decoder and CLIP cast to ``cfg.precision`` (once per run, not per step)."""
        dtype = DTYPES[cfg.precision]
        objective = prompt_objective(cfg, compiled(clip.cast(dtype), COMPILED["clip"], cfg.compile), targets, prior)
        return cls(Renderer(cfg, cast_decoder(cfg, decoder), latent, seeds), objective)

    @property
    def latent(self) -> Latent:
        return self.renderer.latent

    def forward(self, gens, step: int = 0, backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-run (loss [B], similarity [B]; NaN for an objective without CLIP) at the current latent."""
        codes, image = self.renderer.render(gens, step)
        ev = self.objective(View(image, self.latent, step, gens, codes), backward)
        if backward:
            torch.autograd.backward(ev.roots, ev.grads)  # through the objective's roots and the decoder, once
        sim = ev.similarity if ev.similarity is not None else torch.full_like(ev.loss, float("nan"))
        return ev.loss, sim.detach()

    def display(self, step: int) -> torch.Tensor:
        return self.renderer.display(step)


@dataclass(eq=False)
class Loop:
    """A batch of runs set up to optimise: what :func:`optimise` drives."""

    cfg: RunConfig
    runs: list
    gens: list
    step: Step
    opt: torch.optim.Optimizer
    models: dict
    zoom: Zoom | None = None  # --zoom-every: re-encode a zoomed image after some updates

    @property
    def latent(self) -> Latent:
        return self.step.latent


def prepare(cfg: RunConfig, decoder, clip, objective, prior=None, resuming: bool = False, ranker=None) -> Loop:
    """The latent, renderer, objective and optimiser of ``cfg.runs()``; with ``cfg.prior_candidates`` the
    latent starts from the prior's best proposal (not when ``resuming``: the checkpoint holds the start),
    as the run's CLIP rates it or, with ``cfg.prior_clip``, as ``ranker`` does."""
    runs, ranker = cfg.runs(), ranker if cfg.prior_clip else None
    seeds = [s for _, s in runs]
    gens = make_generators(seeds)
    grid = grid_of(cfg, decoder)
    check_prior(cfg, prior, decoder.vocab_size, grid, ranker)  # (make_latent checks the latent)
    latent = make_latent(cfg, decoder.vocab_size, grid, gens, code_bias(cfg, decoder), decoder=decoder).to(cfg.device)
    if objective is None:
        prompts = [p for p, _ in runs]
        targets = encode_targets(clip, prompts, cfg, seeds)
        step = Step.for_prompts(cfg, decoder, clip, latent, targets, seeds, prior)
        if cfg.prior_candidates and not resuming:
            guide = step.objective.guide
            rater, rated = guide.clip, guide.targets
            if ranker is not None:  # --prior-clip: another CLIP rates the proposals, toward its own targets
                rater, rated = ranker, encode_targets(ranker, prompts, cfg, seeds)
            latent.restart(propose(cfg, prior, step.renderer.decoder, rater, rated, seeds))
    else:
        step = Step(Renderer(cfg, cast_decoder(cfg, decoder), latent, seeds), objective)
    models = describe_models(decoder, clip, cfg, prior if cfg.prior else None, ranker)
    opt = make_optimiser(cfg, [latent.param])
    return Loop(cfg, runs, gens, step, opt, models, make_zoom(cfg, decoder, step.renderer, opt))


def optimise(cfg: RunConfig, decoder, clip, callback: Callback | list | None = None, *,
             resume_from: Checkpoint | None = None, objective: Objective | None = None, prior=None,
             ranker=None) -> Result:
    """Optimise ``cfg.runs()`` (prompts x seeds) together for ``cfg.steps`` steps.

    ``objective`` (a callable ``(View, backward) -> Evaluation``, see :mod:`clipguide.engine.objective`)
    replaces the default, CLIP's loss toward the prompts plus the config's extra terms; ``clip`` may
    then be None.  ``callback`` (a callable or a sequence of them) is called with a :class:`StepState`
    at every step 0..steps (after that many updates).  Ctrl-C stops the loop cleanly: the partial
    :class:`Result` has ``interrupted`` set and the images of the last completed step.  Nothing is
    written to disk.  ``resume_from`` (a :class:`Checkpoint` of this config, ``steps`` and ``snapshots``
    aside) continues a run from its step, bit for bit; callbacks then start at that step.  A NaN or
    infinite loss or latent raises :class:`NonFiniteError` naming the step, after the callbacks of the
    last good step.  ``prior`` is the token prior that ``cfg.prior`` names (:func:`clipguide.load_prior`),
    ``ranker`` the CLIP that ``cfg.prior_clip`` names (:func:`clipguide.load_clip`).
    """
    if not cfg.prompts:
        raise ConfigError("no prompt given: pass at least one prompt")
    if cfg.device == AUTO:  # run where the caller put the models (load_models puts them on the best device)
        cfg = cfg.replace(device=str(getattr(clip, "device", "cpu")))
    loop = prepare(cfg, decoder, clip, objective, prior, resuming=resume_from is not None, ranker=ranker)
    return drive(loop, as_callbacks(callback), resume_from)


def drive(loop: Loop, callbacks: list, resume_from: Checkpoint | None) -> Result:
    """Run ``loop`` from step 0 (or the checkpoint's) to ``cfg.steps``, calling ``callbacks`` at each step."""
    cfg, latent, opt, gens, runs = loop.cfg, loop.latent, loop.opt, loop.gens, loop.runs
    losses, sims, snaps = [], [], {}
    if resume_from is not None:
        resume_from.restore(cfg, latent, opt, gens)
        losses, sims = list(resume_from.losses.unbind(0)), list(resume_from.similarities.unbind(0))
    done = len(losses)
    interrupted, image = False, None
    keep = set(cfg.snapshot_steps())  # the listed steps and every multiple of --snapshot-every
    # The generators as they are before forward `done`: with latent and optimiser after `done` updates,
    # the resumable state (updated together with `done`, out of Ctrl-C's reach).
    gen_states = [g.get_state() for g in gens]
    try:
        for k in range(done, cfg.steps + 1):
            loss, sim = evaluate_step(loop, k)
            losses.append(loss)
            sims.append(sim)
            image = _lazy(loop.step.display, k)
            if k in keep:
                snaps[k] = image()
            checkpoint = _lazy(capture, cfg, k, latent, opt, gen_states, losses, sims, True)
            state = StepState(k, cfg.steps, losses[-1], sims[-1], lr_at(cfg, k), runs, cfg, loop.models, image, checkpoint)
            for cb in callbacks:
                cb(state)
            if k == cfg.steps:
                break
            with deferred_interrupt():  # a half-applied update could not be resumed
                update(loop, k)
                done = k + 1
                gen_states = [g.get_state() for g in gens]
    except KeyboardInterrupt:
        interrupted = True
    if image is None or len(losses) != done + 1:
        image = _lazy(loop.step.display, done)
    return Result(
        images=image(), snapshots=snaps,
        losses=torch.stack(losses[: done + 1]) if losses else torch.empty(0, len(runs)),
        similarities=torch.stack(sims[: done + 1]) if sims else torch.empty(0, len(runs)),
        config=cfg, runs=runs, steps_done=done, interrupted=interrupted, latent=latent.param.detach().cpu(),
        models=loop.models, checkpoint=capture(cfg, done, latent, opt, gen_states, losses, sims, False),
    )


def evaluate_step(loop: Loop, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``k``'s per-run loss and similarity on the CPU, its gradient accumulated unless it is the last.

    The step reads the device once: loss, similarity and the finiteness of the latent (before the
    forward) and of the loss come back in one copy (:func:`to_host`), so a GPU queues the next step's
    work without waiting for the host more than that (on a GPU a NaN latent is named after its forward)."""
    last = k == loop.cfg.steps
    latent_ok = finite_runs(loop.latent.param, len(loop.runs))
    if latent_ok.device.type == "cpu":  # free there, and the CPU's sampler refuses NaN probabilities
        check_finite(latent_ok, "latent", k, loop.runs)
    loop.opt.zero_grad(set_to_none=True)
    with torch.no_grad() if last else contextlib.nullcontext():
        loss, sim = loop.step.forward(loop.gens, k, backward=not last)
    loss, sim, latent_ok, loss_ok = to_host(loss.detach(), sim, latent_ok, finite_runs(loss, len(loop.runs)))
    check_finite(latent_ok, "latent", k, loop.runs)
    check_finite(loss_ok, "loss", k, loop.runs)
    return loss, sim


def finite_runs(x: torch.Tensor, runs: int) -> torch.Tensor:
    """Per run, whether ``x`` (loss [B] or latent [B, ...]) is finite: a [B] bool tensor where ``x`` is."""
    return torch.isfinite(x.detach()).reshape(runs, -1).all(1)


def update(loop: Loop, k: int) -> None:
    """Apply update ``k``: the optimiser at ``lr_at(k)``, then the latent's own end of step (EMA, annealing),
    then the zoom when one is due (:mod:`~clipguide.engine.zoom`)."""
    for group in loop.opt.param_groups:
        group["lr"] = lr_at(loop.cfg, k)
    loop.opt.step()
    loop.latent.end_step()
    if loop.zoom is not None:  # part of the update: a checkpoint is before or after a zoom, never inside
        loop.zoom(loop.latent, loop.opt, k)


def check_finite(ok: torch.Tensor, what: str, step: int, runs: list) -> None:
    """Raise :class:`NonFiniteError` naming the runs whose ``what`` (loss or latent) is not finite (``ok``: [B],
    from :func:`finite_runs`, on the CPU)."""
    if bool(ok.all()):
        return
    bad = [i for i in range(len(runs)) if not ok[i]]
    named = ", ".join(f"{i} ({runs[i][0]!r:.60}, seed {runs[i][1]})" for i in bad[:3]) + (" ..." if len(bad) > 3 else "")
    when = f"after update {step - 1}" if what == "latent" else "at forward"
    raise NonFiniteError(
        f"the {what} of run(s) {named} became NaN or infinite at step {step} ({when}): the optimisation diverged; "
        "nothing from this step was kept: lower --lr (or --lr-growth, --loss-scale) and start the run again", step, bad)


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it: the optimiser update and the
    bookkeeping of what is done happen entirely or not at all.  Outside the main thread
    (where signals cannot be handled) the block runs as is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # no Python-level handler to restore (set from C): leave SIGINT alone
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)


def _lazy(fn, *args):
    """A zero-argument function computing ``fn(*args)`` once."""
    cache = []

    def get():
        if not cache:
            cache.append(fn(*args))
        return cache[0]

    return get
