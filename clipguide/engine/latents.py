"""Latent parametrisations: the optimised token logits and their relaxation.

Each parametrisation turns its parameter into the decoder's input, a grid of
code weights ``[B, V, h, w]`` (one-hot, soft, or a mix), in two ways:
``relax`` for a training step (may sample, from the runs' own generators) and
``display`` for snapshots (deterministic).

* ``categorical``: straight-through categorical sampling (Crowson, docs/methods.md §2):
  forward a sampled one-hot, backward through the softmax probabilities.
* ``softmax``: the plain per-position softmax over codes.
* ``parity-softmax``: Aleph2Image Delta's softmax (docs/methods.md §5.1).  Its reshape
  of ``[V, h·w]`` to ``[h·w, V]`` normalises, at each position, the even and the
  odd codes separately (two softmaxes summing to 2).  Reproduced deliberately.
* ``parity-gumbel``: Aleph2Image Gamma: the same grouping with Gumbel noise.
* ``spatial-gumbel``: the first Aleph2Image: Gumbel-softmax over the spatial
  positions of each code (not over codes), a fresh sample every step.
* ``zquantize``: Crowson's VQGAN z+quantize (docs/methods.md §4): the parameter is the
  decoder's latent z itself, quantized to the nearest code vectors (decoded by ``decode_z``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..records.images import load_image, pil_to_tensor
from .interfaces import CodebookDecoder, LogitEncoder
from .noise_init import encode_init_noise
from .ops import gumbel_noise, replace_grad, sample_codes, vector_quantize

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig


class Latent(torch.nn.Module):
    """Token logits of B independent runs on an h x w grid of V codes."""

    # relax/display return code weights [B, V, h, w]; decode() says what the decoder makes of them

    def __init__(self, cfg: RunConfig, vocab: int, grid: tuple[int, int], generators, bias: torch.Tensor | None = None,
                 decoder=None):
        super().__init__()
        self.vocab, self.grid = vocab, grid
        self.beta = float(cfg.temperature)  # inverse temperature ("hadies")
        self.decay, self.floor = cfg.temperature_decay, cfg.temperature_floor
        self.register_buffer("bias", bias if bias is not None else torch.zeros(vocab), persistent=False)
        self.param = torch.nn.Parameter(self.initial(cfg, generators, decoder))
        self.init_weight, self.init_pull = cfg.init_weight, cfg.init_pull
        self.ema_decay = cfg.ema
        # Persistent buffers and the extra state are the run's state beyond ``param``: ``state_dict()``
        # holds all of it, so a checkpoint (clipguide.run.resume) restores a latent exactly.
        if self.ema_decay:  # snapshots decode an exponential moving average of the parameter
            self.register_buffer("param_ema", self.param.detach().clone())
        if self.init_weight:  # the pull's anchor: the initial latent (the init image's, when given)
            self.register_buffer("param_init", self.param.detach().clone())

    def initial(self, cfg: RunConfig, generators, decoder) -> torch.Tensor:
        """The initial parameter; ``decoder`` is for parametrisations that live in its latent space
        (and for encoding ``cfg.init_image``)."""
        if cfg.init_image:
            return self.to_param(encode_init_image(cfg, decoder, self.grid, len(generators), "codes"))
        if cfg.init_noise:  # each run's own noise image, encoded as an init image is
            return self.to_param(encode_init_noise(cfg, decoder, self.grid, generators, "codes"))
        return self.to_param(init_logits(cfg, self.vocab, self.grid, generators))

    @torch.no_grad()
    def restart(self, logits: torch.Tensor) -> None:
        """Start from ``logits`` [B, V, h, w] instead (a prior's proposal): the parameter, and its moving
        average and anchor when it has them, become their layout of it."""
        self.param.copy_(self.to_param(logits.to(self.param)))
        for name in ("param_ema", "param_init"):
            if hasattr(self, name):
                getattr(self, name).copy_(self.param)

    # layout: subclasses keep the parameter as the original notebooks did
    def to_param(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # [B, V, h, w]

    def logits(self) -> torch.Tensor:
        """[B, V, h, w] logits including the code bias."""
        return self.param + self.bias[:, None, None]

    def relax(self, generators) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, decoder, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels of a relaxed or displayed value ``x`` of this latent: code weights through the decoder."""
        return decoder.decode(x, noise)

    def display(self, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self, step: int = 0) -> torch.Tensor | None:
        """Per-run regulariser [B] added to the loss at ``step``, or None: Crowson's pull toward the initial
        latent, init_weight/2 · MSE(latent, initial latent) (docs/methods.md §4); with ``init_pull``
        "zero-decay", nerdyrodent's pull toward zero, init_weight/(2·step + 1)/2 · MSE(latent, 0) (§6)."""
        if not self.init_weight:
            return None
        if self.init_pull == "zero-decay":
            return self.init_weight / (2 * step + 1) / 2 * self.param.pow(2).flatten(1).mean(1)
        return self.init_weight / 2 * (self.param - self.param_init).pow(2).flatten(1).mean(1)

    @contextlib.contextmanager
    def averaged(self):
        """Within the block, the parameter holds its moving average (if ``ema`` is on)."""
        if not self.ema_decay:
            yield
            return
        current = self.param.detach().clone()
        with torch.no_grad():
            self.param.copy_(self.param_ema)
        try:
            yield
        finally:
            with torch.no_grad():
                self.param.copy_(current)

    def get_extra_state(self) -> torch.Tensor:
        """The annealed inverse temperature, as a float64 tensor (a Python float, exactly)."""
        return torch.tensor(self.beta, dtype=torch.float64)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.beta = float(state)

    def end_step(self) -> None:
        """Update the moving average; anneal the inverse temperature (Aleph2Image Gamma: ÷1.01 per step, floor 1.5)."""
        if self.ema_decay:
            with torch.no_grad():
                self.param_ema.lerp_(self.param, 1 - self.ema_decay)
        if self.decay != 1.0:
            self.beta = max(self.beta / self.decay, self.floor)


class Categorical(Latent):
    """Per-position logits [B, h·w, V] as in the notebook, optionally plus coarse grids (``cfg.pyramid``).

    A factor k adds a ceil(h/k) x ceil(w/k) grid of logits, upsampled (nearest, cropped to h x w)
    onto the tokens and stored after the fine ones in the same parameter: the gradient of a coarse
    logit is the sum over its k x k tokens, so whole regions change code together, and the image
    is made of large flat areas instead of a mosaic (the multi-scale image parametrisation of
    Mordvintsev et al. 2018, "Differentiable Image Parameterizations", applied to token logits).

    With ``cfg.pyramid_every`` = N the levels learn coarse to fine, as in progressive growing
    (Karras et al. 2018): before step N·r only the r coarsest levels get a gradient, so the run
    first settles a layout of a few large regions and only then refines edges and tokens.
    """

    def __init__(self, cfg, vocab, grid, generators, bias=None, decoder=None):
        self.factors = tuple(cfg.pyramid)
        # the step from which each level (factor; 1 = the tokens) learns: the coarsest from 0
        self.starts = {k: r * cfg.pyramid_every for r, k in enumerate(sorted(set(self.factors) | {1}, reverse=True))}
        self.step = 0  # the optimiser step being taken (set by the loop): which levels learn
        super().__init__(cfg, vocab, grid, generators, bias, decoder)

    def learns(self, factor: int) -> bool:
        """Whether the level of ``factor`` (1 = the tokens) gets a gradient at ``self.step``."""
        return self.step >= self.starts[factor]

    def coarse_grids(self) -> list[tuple[int, int]]:
        h, w = self.grid
        return [(-(-h // k), -(-w // k)) for k in self.factors]

    def to_param(self, logits):
        b, v = logits.shape[:2]
        coarse = [logits.new_zeros(b, ch * cw, v) for ch, cw in self.coarse_grids()]
        return torch.cat([logits.flatten(2).transpose(1, 2)] + coarse, 1).contiguous()

    def combined(self) -> torch.Tensor:
        """The token logits [B, h·w, V]: the fine ones plus every upsampled coarse grid."""
        (h, w), b, v = self.grid, self.param.shape[0], self.vocab
        sizes = self.coarse_grids()
        parts = [p if self.learns(k) else p.detach()
                 for k, p in zip((1,) + self.factors, self.param.split([h * w] + [ch * cw for ch, cw in sizes], 1))]
        out = parts[0]
        for k, (ch, cw), part in zip(self.factors, sizes, parts[1:]):
            up = part.view(b, ch, 1, cw, 1, v).expand(b, ch, k, cw, k, v).reshape(b, ch * k, cw * k, v)
            out = out + up[:, :h, :w].reshape(b, h * w, v)
        return out

    def logits(self):
        b, (h, w) = self.param.shape[0], self.grid
        return (self.combined() + self.bias).transpose(1, 2).reshape(b, self.vocab, h, w)

    def probs(self) -> torch.Tensor:
        return (self.beta * (self.combined() + self.bias)).softmax(-1)  # [B, h·w, V]

    def relax(self, generators):
        probs = self.probs()
        one_hot = F.one_hot(sample_codes(probs, generators), self.vocab).to(probs.dtype)
        return self._grid(replace_grad(one_hot, probs))

    def display(self, mode):
        if mode == "soft":
            return self._grid(self.probs())
        return self._grid(F.one_hot(self.probs().argmax(-1), self.vocab).to(self.param.dtype))

    def _grid(self, x):  # [B, h·w, V] -> [B, V, h, w]
        h, w = self.grid
        return x.transpose(1, 2).reshape(x.shape[0], self.vocab, h, w)


class Softmax(Categorical):
    def relax(self, generators):
        return self._grid(self.probs())


class ParitySoftmax(Latent):
    noisy = False

    def grouped(self, generators=None) -> torch.Tensor:
        """Logits as [B, V/2, 2·h·w]: normalising dim 1 is Delta's parity-split softmax."""
        b = self.param.shape[0]
        x = (self.beta * self.logits()).reshape(b, self.vocab // 2, -1)
        if self.noisy and generators is not None:
            x = x + gumbel_noise(x.shape[1:], generators, x.device)
        return x

    def relax(self, generators):
        return self.grouped(generators).softmax(1).view(self.param.shape)

    def display(self, mode):
        x = self.grouped()
        if mode == "soft":
            return x.softmax(1).view(self.param.shape)
        # "Sharpie": an enormous inverse temperature, i.e. the argmax of each group: two codes per position.
        return F.one_hot(x.argmax(1), self.vocab // 2).transpose(1, 2).to(x.dtype).reshape(self.param.shape)


class ParityGumbel(ParitySoftmax):
    noisy = True


class SpatialGumbel(Latent):
    def relax(self, generators):
        b = self.param.shape[0]
        x = (self.beta * self.logits()).reshape(b, self.vocab, -1)
        x = x + gumbel_noise(x.shape[1:], generators, x.device)
        return x.softmax(-1).view(self.param.shape)

    def display(self, mode):
        b = self.param.shape[0]
        return (self.beta * self.logits()).reshape(b, self.vocab, -1).softmax(-1).view(self.param.shape)


class ZQuantize(Latent):
    """Crowson's z+quantize (docs/methods.md §4): z [B, e_dim, h, w] starts on random codebook
    vectors; each step decodes its nearest code vectors (identity straight-through gradient),
    and after each step z is clamped per channel to the codebook's [min, max] box.

    ``--init-weight w`` (the base class's :meth:`Latent.penalty`) pulls toward the *initial* z
    as in the notebook; nerdyrodent's decaying pull toward zero (docs/methods.md §6) is not reproduced.
    """

    def initial(self, cfg, generators, decoder):
        codebook = decoder.codebook.detach().float()  # check_latent: a zquantize decoder has one
        self.register_buffer("codebook", codebook, persistent=False)  # [V, e_dim]
        self.register_buffer("z_min", codebook.min(0).values.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("z_max", codebook.max(0).values.view(1, -1, 1, 1), persistent=False)
        h, w = self.grid
        if cfg.init_image:  # Crowson: z starts as the VQGAN's (quantized) encoding of the image
            z = encode_init_image(cfg, decoder, self.grid, len(generators), "z").to(codebook)
        elif cfg.init_noise:
            z = encode_init_noise(cfg, decoder, self.grid, generators, "z").to(codebook)
        else:
            codes = [draw_codes(cfg, self.vocab, h * w, g, high=self.vocab) for g in generators]
            z = torch.stack([codebook[c.to(codebook.device)].T.reshape(-1, h, w) for c in codes])
        return z

    def relax(self, generators):
        return vector_quantize(self.param, self.codebook)

    def decode(self, decoder, x, noise=None):
        return decoder.decode_z(x)  # z, not code weights (a VQGAN has no pixel noise)

    def display(self, mode):
        # "soft" shows the unquantized z; the notebook's snapshot (and any other mode) its quantized decode.
        return self.param if mode == "soft" else vector_quantize(self.param, self.codebook)

    def end_step(self):
        super().end_step()
        with torch.no_grad():
            self.param.clamp_(self.z_min, self.z_max)


LATENT_CLASSES = {
    "categorical": Categorical,
    "parity-softmax": ParitySoftmax,
    "parity-gumbel": ParityGumbel,
    "spatial-gumbel": SpatialGumbel,
    "softmax": Softmax,
    "zquantize": ZQuantize,
}


def randn_logits(cfg: RunConfig, vocab: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    return cfg.init_scale * torch.randn(vocab, h, w, generator=g)  # the first Aleph2Image


def uniform_logits(cfg: RunConfig, vocab: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    return torch.zeros(vocab, h, w)  # every code equally likely


def onehot_logits(cfg: RunConfig, vocab: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """``init_scale`` on one random code per position (Delta: np.random.randint(8191), codes 0..V-2),
    or one of ``cfg.init_codes`` (Gamma)."""
    x = torch.zeros(vocab, h * w)
    codes = draw_codes(cfg, vocab, h * w, g, high=vocab - 1)
    x[codes, torch.arange(h * w)] = cfg.init_scale
    return x.view(vocab, h, w)


INIT_LOGITS = {"randn": randn_logits, "onehot": onehot_logits, "onehot-codes": onehot_logits, "uniform": uniform_logits}


def init_logits(cfg: RunConfig, vocab: int, grid: tuple[int, int], generators) -> torch.Tensor:
    """Initial logits [B, V, h, w], each run from its own generator."""
    return torch.stack([INIT_LOGITS[cfg.init](cfg, vocab, *grid, g) for g in generators])


def encode_init_image(cfg: RunConfig, decoder, grid: tuple[int, int], batch: int, space: str = "codes") -> torch.Tensor:
    """Crowson's init_image: the image resized to the output (Lanczos) and encoded, the same
    for every run: the dVAE encoder's logits [B, V, h, w] (``space`` "codes") or the VQGAN's
    quantized z [B, e_dim, h, w] ("z")."""
    from PIL import Image


    encode = decoder.encode if space == "z" else decoder.encode_logits  # check_latent: the decoder has it
    h, w = grid
    f = decoder.downsample
    image = load_image(cfg.init_image, what="--init-image").resize((w * f, h * f), Image.LANCZOS)
    with torch.no_grad():
        x = encode(pil_to_tensor(image)).float().cpu()
    return x.expand(batch, *x.shape[1:]).clone()


def draw_codes(cfg: RunConfig, vocab: int, n: int, generator: torch.Generator, high: int) -> torch.Tensor:
    """n code indices for a one-hot start: from ``cfg.init_codes`` (onehot-codes, modulo the
    vocabulary) or uniform over 0..high-1."""
    if cfg.init == "onehot-codes":
        pool = torch.tensor([c % vocab for c in cfg.init_codes])
        return pool[torch.randint(0, len(pool), (n,), generator=generator)]
    return torch.randint(0, high, (n,), generator=generator)


def check_latent(cfg: RunConfig, vocab: int, decoder=None) -> None:
    """Raise ConfigError if ``cfg``'s latent does not suit the decoder (checked before any file is written)."""
    name = repr(getattr(decoder, "name", decoder))
    codebook = isinstance(decoder, CodebookDecoder)
    if cfg.latent == "zquantize" and not codebook:
        raise ConfigError(f"--latent zquantize optimises a VQGAN latent and needs a decoder with a codebook, not {name}: "
                          "pass --decoder shapes-vqgan, vqgan-imagenet-f16-16384 or a taming CONFIG.yaml")
    if (cfg.init_image or cfg.init_noise) and cfg.latent != "zquantize":  # (a codebook decoder encodes images into z)
        if not isinstance(decoder, LogitEncoder):
            hint = "for a VQGAN use --latent zquantize" if codebook else "use a dVAE with its encoder, or a VQGAN"
            flag = "--init-image" if cfg.init_image else "--init-noise"
            raise ConfigError(f"{flag} needs a decoder that encodes images (encode_logits), which {name} lacks: {hint}")
        decoder.check_encoder()  # a dVAE without its encoder, or whose encoder.pkl is missing: refused up front
    if cfg.pyramid and not issubclass(LATENT_CLASSES[cfg.latent], Categorical):
        raise ConfigError(f"--pyramid adds coarse grids to per-position logits: use it with --latent categorical or softmax, "
                          f"not {cfg.latent}")
    if cfg.latent.startswith("parity") and vocab % 2:
        raise ConfigError(f"--latent {cfg.latent} splits codes by parity and needs an even vocabulary, got {vocab}")


def make_latent(cfg: RunConfig, vocab: int, grid: tuple[int, int], generators, bias=None, *, decoder=None) -> Latent:
    """The latent of ``cfg.latent``; ``decoder`` is needed by those living in its latent space (zquantize)."""
    check_latent(cfg, vocab, decoder)
    return LATENT_CLASSES[cfg.latent](cfg, vocab, grid, generators, bias, decoder=decoder)
