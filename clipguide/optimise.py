"""The optimisation loop: one plain entry point, :func:`optimise`.

CLIP-guided generation through a discrete decoder (advadnoun's Aleph2Image,
Crowson's dVAE+CLIP; methods.md §2, §5): token logits are relaxed into code
weights, decoded to pixels, cut into random crops, embedded by CLIP and pulled
toward the prompt's text embeddings.  A batch holds independent runs (prompts x
seeds); each run draws all its randomness from its own ``torch.Generator``, so
the same seed, batch and thread count give the same image bit for bit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from .checkpoint import Checkpoint
from .config import RunConfig
from .cutouts import make_cutouts
from .devices import AUTO
from .errors import ConfigError, NonFiniteError
from .latents import Latent, check_latent, make_latent
from .losses import LOSSES, prompt_similarity
from .ops import clamp_with_grad, laplace_noise, tv_loss
from .prompts import encode_targets


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
    snapshots: dict  # step -> [B, 3, H, W] images at config.snapshots (CPU)
    losses: torch.Tensor  # [steps_done + 1, B]
    similarities: torch.Tensor  # [steps_done + 1, B]
    config: RunConfig
    runs: list  # [(prompt, seed)] in batch order
    steps_done: int
    interrupted: bool
    latent: torch.Tensor  # final optimised parameter (CPU)
    models: dict = field(default_factory=dict)  # describe_models(decoder, clip)
    checkpoint: Checkpoint | None = field(default=None, repr=False)  # the state after steps_done updates


def describe_models(decoder, clip, cfg: RunConfig | None = None) -> dict:
    """What identifies the models of a run: names, weight sha256s, sizes (recorded with its files).
    With ``cfg``: a run with an init image also records a dVAE encoder kept in its own file (OpenAI's
    encoder.pkl), which this loads; see DalleDecoder.describe for why it depends on ``cfg`` only."""
    encodes = cfg is not None and bool(cfg.init_image) and getattr(decoder, "encoder_source", None) is not None
    return {
        "decoder": decoder.describe(encoder=True) if encodes else decoder.describe(),
        "clip": {"name": clip.name, "sha256": getattr(clip, "sha256", None), "image_size": clip.image_size},
    }


def make_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per run: CPU draws make seeds portable across devices."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def display_seed(seed: int, step: int) -> int:
    """A seed for snapshot-time noise that depends only on (run seed, step)."""
    return int(np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1)[0])


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based); independent of the run length, so a
    k-step run and the first k steps of a longer run are the same computation."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup) if cfg.lr_warmup else 1.0
    return cfg.lr * cfg.lr_growth**step * warm


def grid_of(cfg: RunConfig, decoder) -> tuple[int, int]:
    f = decoder.downsample
    if cfg.size % f:
        lo, hi = cfg.size // f * f, (cfg.size // f + 1) * f
        raise ConfigError(f"--size {cfg.size} is not a multiple of the decoder's factor {f}: use {lo or f} or {hi}")
    return cfg.size // f, cfg.size // f


def check_fits(cfg: RunConfig, decoder) -> None:
    """Raise ConfigError for what ``cfg`` asks of ``decoder`` that it cannot do (the size, the latent),
    so that callers can refuse a run before they create its folder."""
    grid_of(cfg, decoder)
    check_latent(cfg, decoder.vocab_size, decoder)


def code_bias(cfg: RunConfig, decoder) -> torch.Tensor | None:
    """Crowson's -100 logit bias on blacklisted codes, or None.  The list names OpenAI dVAE codes: a
    VQGAN (it has a codebook) with 8192 codes, the Gumbel f8's, gets none."""
    from .presets import dalle_blacklist

    dvae = getattr(decoder, "codebook", None) is None
    codes = dalle_blacklist(decoder.vocab_size) if cfg.blacklist and dvae else []
    if not codes:
        return None
    bias = torch.zeros(decoder.vocab_size)
    bias[codes] = -100.0
    return bias


def decode_latent(decoder, latent: Latent, x, noise=None) -> torch.Tensor:
    """Pixels of ``latent``'s relaxed or displayed value ``x``: code weights through the decoder, or (``space``
    "z", VQGAN z+quantize) decoder latents through its z path."""
    if latent.space == "z":
        return decoder.decode_z(x)
    return decoder.decode(x, noise)


class Step:
    """The forward computation of one step for a batch of runs."""

    def __init__(self, cfg, decoder, clip, latent: Latent, targets, seeds):
        dtype = DTYPES[cfg.precision]  # cast copies are made once per run, not per step
        self.cfg, self.decoder, self.clip, self.latent = cfg, decoder.cast(dtype), clip.cast(dtype), latent
        self.targets = targets.to(cfg.device)  # prompts.Targets: the story phrase depends on the step
        self.seeds = seeds
        self.loss_fn = LOSSES[cfg.loss]

    def decode(self, x, noise=None):
        return decode_latent(self.decoder, self.latent, x, noise)

    def pixels(self, codes, noise=None):
        x = self.decode(codes, noise)
        return clamp_with_grad(x, 0, 1) if self.cfg.clamp_grad else x.clamp(0, 1)

    def noise(self, gens, shape):
        if not self.cfg.noise_scale:
            return None
        n = torch.stack([laplace_noise(shape, g, self.cfg.device) for g in gens])
        return self.cfg.noise_scale * n

    def forward(self, gens, step: int = 0, backward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-run (loss [B], similarity [B]) at the current latent, drawing from ``gens``; with
        ``backward`` the loss's gradient is also accumulated into the latent (:meth:`backward`)."""
        cfg = self.cfg
        embeds, weights, stops = self.targets.at(step)
        self.latent.step = step  # a coarse-to-fine latent lets its levels learn by the step
        codes = self.latent.relax(gens)
        img = self.pixels(codes, self.noise(gens, (3, cfg.size, cfg.size)))
        cuts = make_cutouts(img, cfg, self.clip.image_size, gens)
        extra = self.regularisers(img)
        if backward:
            loss, emb = self.backward(cuts, (embeds, weights, stops), extra)
        else:
            emb = self.clip.encode_image(cuts).view(len(gens), cfg.cutn, -1)
            loss = cfg.loss_scale * self.loss_fn(emb, embeds, weights, stops)
        loss = sum(extra, loss)  # in backward mode the terms are already back-propagated: report the value only
        return (loss.detach() if backward else loss), prompt_similarity(emb.detach(), embeds, weights)

    def backward(self, cuts, targets, extra) -> tuple[torch.Tensor, torch.Tensor]:
        """Back-propagate the prompt loss of ``cuts`` [B·cutn, ...] and the ``extra`` terms into the
        latent; returns (prompt loss [B], cutout embeddings [B, cutn, D]), both detached.

        CLIP runs ``cfg.cut_batch`` cutouts at a time: the loss is a mean over cutouts, so the
        chunks' losses and gradients add up to the whole's while only one chunk's activations are
        alive; the decoder's backward then runs once with the summed gradient."""
        cfg, b = self.cfg, len(self.seeds)
        loss, emb, grad = 0, [], []
        for part in cuts.view(b, cfg.cutn, *cuts.shape[1:]).split(cfg.cut_batch or cfg.cutn, dim=1):
            leaf = part.detach().requires_grad_()
            e = self.clip.encode_image(leaf.flatten(0, 1)).view(b, part.shape[1], -1)
            part_loss = cfg.loss_scale * self.loss_fn(e, *targets) * (part.shape[1] / cfg.cutn)
            part_loss.sum().backward()  # runs are independent: each gets its own gradient
            loss, grad = loss + part_loss.detach(), grad + [leaf.grad]
            emb.append(e.detach())
        roots, grads = [cuts], [torch.cat(grad, 1).view_as(cuts)]
        if extra:
            roots.append(sum(t.sum() for t in extra))
            grads.append(None)
        torch.autograd.backward(roots, grads)  # through the cutouts and the decoder, once
        return loss, torch.cat(emb, 1)

    def regularisers(self, img) -> list[torch.Tensor]:
        """Per-run terms [B] added to the prompt loss: total variation and the latent's penalty."""
        terms = [self.cfg.tv_weight / 4 * tv_loss(img)] if self.cfg.tv_weight else []
        penalty = self.latent.penalty()
        return terms if penalty is None else terms + [penalty]

    @torch.no_grad()
    def display(self, step: int) -> torch.Tensor:
        cfg = self.cfg
        with self.latent.averaged():
            codes = self.latent.display(cfg.display)
        noise = None
        if cfg.display_noise and cfg.noise_scale:
            noise = self.noise(make_generators(display_seed(s, step) for s in self.seeds), (3, cfg.size, cfg.size))
        return self.decode(codes, noise).clamp(0, 1).float().cpu()


def make_optimiser(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimiser == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def optimise(cfg: RunConfig, decoder, clip, callback: Callable[[StepState], None] | list | None = None, *,
             resume_from: Checkpoint | None = None) -> Result:
    """Optimise ``cfg.runs()`` (prompts x seeds) together for ``cfg.steps`` steps.

    ``callback(state)`` is called at every step 0..steps (after that many updates).
    Ctrl-C stops the loop cleanly: the partial :class:`Result` has ``interrupted``
    set and the images of the last completed step.  Nothing is written to disk.
    ``resume_from`` (a :class:`~clipguide.checkpoint.Checkpoint` of this config, ``steps``
    and ``snapshots`` aside) continues a run from its step, bit for bit; callbacks then
    start at that step.  A NaN or infinite loss or latent raises :class:`NonFiniteError`
    naming the step, after the callbacks of the last good step.
    """
    if not cfg.prompts:
        raise ConfigError("no prompt given: pass at least one prompt")
    if cfg.device == AUTO:  # run where the caller put the models (load_models puts them on the best device)
        cfg = cfg.replace(device=str(getattr(clip, "device", "cpu")))
    models = describe_models(decoder, clip, cfg)
    callbacks = callback if isinstance(callback, list) else [callback] if callback else []
    runs = cfg.runs()
    seeds = [s for _, s in runs]
    gens = make_generators(seeds)
    latent = make_latent(cfg, decoder.vocab_size, grid_of(cfg, decoder), gens, code_bias(cfg, decoder), decoder=decoder)
    latent = latent.to(cfg.device)
    step_fn = Step(cfg, decoder, clip, latent, encode_targets(clip, [p for p, _ in runs], cfg, seeds), seeds)
    opt = make_optimiser(cfg, [latent.param])
    losses, sims, snaps = [], [], {}
    if resume_from is not None:
        resume_from.restore(cfg, latent, opt, gens)
        losses, sims = list(resume_from.losses.unbind(0)), list(resume_from.similarities.unbind(0))
    done = start = len(losses)
    interrupted, image = False, None
    # The generators as they are before forward `done`: with latent and optimiser after `done` updates,
    # the resumable state (updated together with `done`, out of Ctrl-C's reach).
    gen_states = [g.get_state() for g in gens]
    try:
        for k in range(start, cfg.steps + 1):
            last = k == cfg.steps
            check_finite(latent.param, "latent", k, runs)
            opt.zero_grad(set_to_none=True)
            with torch.no_grad() if last else contextlib.nullcontext():
                loss, sim = step_fn.forward(gens, k, backward=not last)
            check_finite(loss, "loss", k, runs)
            losses.append(loss.detach().cpu())
            sims.append(sim.cpu())
            image = _lazy(step_fn.display, k)
            if k in cfg.snapshots:
                snaps[k] = image()
            checkpoint = _lazy(capture, cfg, k, latent, opt, gen_states, losses, sims, True)
            state = StepState(k, cfg.steps, losses[-1], sims[-1], lr_at(cfg, k), runs, cfg, models, image, checkpoint)
            for cb in callbacks:
                cb(state)
            if last:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, k)
            with deferred_interrupt():  # a half-applied update could not be resumed
                opt.step()
                latent.end_step()
                done = k + 1
                gen_states = [g.get_state() for g in gens]
    except KeyboardInterrupt:
        interrupted = True
    if image is None or len(losses) != done + 1:
        image = _lazy(step_fn.display, done)
    return Result(
        images=image(),
        snapshots=snaps,
        losses=torch.stack(losses[: done + 1]) if losses else torch.empty(0, len(runs)),
        similarities=torch.stack(sims[: done + 1]) if sims else torch.empty(0, len(runs)),
        config=cfg,
        runs=runs,
        steps_done=done,
        interrupted=interrupted,
        latent=latent.param.detach().cpu(),
        models=models,
        checkpoint=capture(cfg, done, latent, opt, gen_states, losses, sims, False),
    )


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


def check_finite(x: torch.Tensor, what: str, step: int, runs: list) -> None:
    """Raise :class:`NonFiniteError` naming the runs whose ``x`` (loss [B] or latent [B, ...]) has a NaN or inf."""
    ok = torch.isfinite(x.detach()).reshape(len(runs), -1).all(1)
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
