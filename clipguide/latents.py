"""Latent parametrisations: the optimised token logits and their relaxation.

Each parametrisation turns its parameter into the decoder's input, a grid of
code weights ``[B, V, h, w]`` (one-hot, soft, or a mix), in two ways:
``relax`` for a training step (may sample, from the runs' own generators) and
``display`` for snapshots (deterministic).

* ``categorical``: straight-through categorical sampling (Crowson, methods.md §2):
  forward a sampled one-hot, backward through the softmax probabilities.
* ``softmax``: the plain per-position softmax over codes.
* ``parity-softmax``: Aleph2Image Delta's softmax (methods.md §5.1).  Its reshape
  of ``[V, h·w]`` to ``[h·w, V]`` normalises, at each position, the even and the
  odd codes separately (two softmaxes summing to 2).  Reproduced deliberately.
* ``parity-gumbel``: Aleph2Image Gamma: the same grouping with Gumbel noise.
* ``spatial-gumbel``: the first Aleph2Image: Gumbel-softmax over the spatial
  positions of each code (not over codes), a fresh sample every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import RunConfig
from .errors import ConfigError
from .ops import gumbel_noise, replace_grad


class Latent(torch.nn.Module):
    """Token logits of B independent runs on an h x w grid of V codes."""

    space = "codes"  # what relax/display return: code weights [B, V, h, w] ("z": decoder latents)

    def __init__(self, cfg: RunConfig, vocab: int, grid: tuple[int, int], generators, bias: torch.Tensor | None = None):
        super().__init__()
        self.vocab, self.grid = vocab, grid
        self.beta = float(cfg.temperature)  # inverse temperature ("hadies")
        self.decay, self.floor = cfg.temperature_decay, cfg.temperature_floor
        self.register_buffer("bias", bias if bias is not None else torch.zeros(vocab), persistent=False)
        self.param = torch.nn.Parameter(self.to_param(init_logits(cfg, vocab, grid, generators)))

    # layout: subclasses keep the parameter as the original notebooks did
    def to_param(self, logits: torch.Tensor) -> torch.Tensor:
        return logits  # [B, V, h, w]

    def logits(self) -> torch.Tensor:
        """[B, V, h, w] logits including the code bias."""
        return self.param + self.bias[:, None, None]

    def relax(self, generators) -> torch.Tensor:
        raise NotImplementedError

    def display(self, mode: str) -> torch.Tensor:
        raise NotImplementedError

    def penalty(self) -> torch.Tensor | None:
        """Per-run regulariser [B] added to the loss (e.g. a pull toward the initial latent), or None."""
        return None

    def end_step(self) -> None:
        """Anneal the inverse temperature (Aleph2Image Gamma: ÷1.01 per step, floor 1.5)."""
        if self.decay != 1.0:
            self.beta = max(self.beta / self.decay, self.floor)


class Categorical(Latent):
    def to_param(self, logits):
        return logits.flatten(2).transpose(1, 2).contiguous()  # [B, h·w, V] as in the notebook

    def logits(self):
        b, (h, w) = self.param.shape[0], self.grid
        return (self.param + self.bias).transpose(1, 2).reshape(b, self.vocab, h, w)

    def probs(self) -> torch.Tensor:
        return (self.beta * (self.param + self.bias)).softmax(-1)  # [B, h·w, V]

    def relax(self, generators):
        probs = self.probs()
        idx = torch.stack([torch.multinomial(p.detach().cpu(), 1, generator=g)[:, 0] for p, g in zip(probs, generators)])
        one_hot = F.one_hot(idx.to(probs.device), self.vocab).to(probs.dtype)
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
            x = x + torch.stack([gumbel_noise(x.shape[1:], g, x.device) for g in generators])
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
        x = x + torch.stack([gumbel_noise(x.shape[1:], g, x.device) for g in generators])
        return x.softmax(-1).view(self.param.shape)

    def display(self, mode):
        b = self.param.shape[0]
        return (self.beta * self.logits()).reshape(b, self.vocab, -1).softmax(-1).view(self.param.shape)


LATENT_CLASSES = {
    "categorical": Categorical,
    "softmax": Softmax,
    "parity-softmax": ParitySoftmax,
    "parity-gumbel": ParityGumbel,
    "spatial-gumbel": SpatialGumbel,
}


def init_logits(cfg: RunConfig, vocab: int, grid: tuple[int, int], generators) -> torch.Tensor:
    """Initial logits [B, V, h, w], each run from its own generator."""
    h, w = grid
    out = []
    for g in generators:
        if cfg.init == "randn":
            x = cfg.init_scale * torch.randn(vocab, h, w, generator=g)
        elif cfg.init == "uniform":
            x = torch.zeros(vocab, h, w)
        else:
            x = torch.zeros(vocab, h * w)
            if cfg.init == "onehot":
                # Delta draws np.random.randint(8191): codes 0..V-2.
                codes = torch.randint(0, vocab - 1, (h * w,), generator=g)
            else:
                pool = torch.tensor([c % vocab for c in cfg.init_codes])
                codes = pool[torch.randint(0, len(pool), (h * w,), generator=g)]
            x[codes, torch.arange(h * w)] = cfg.init_scale
            x = x.view(vocab, h, w)
        out.append(x)
    return torch.stack(out)


def make_latent(cfg: RunConfig, vocab: int, grid: tuple[int, int], generators, bias=None) -> Latent:
    if cfg.latent.startswith("parity") and vocab % 2:
        raise ConfigError(f"--latent {cfg.latent} splits codes by parity and needs an even vocabulary, got {vocab}")
    return LATENT_CLASSES[cfg.latent](cfg, vocab, grid, generators, bias)
