"""From latent to pixels: the relaxation, the decoder, the output noise and the clamp.

The loop renders the latent each step (:meth:`Renderer.pixels`, in the autograd graph) and for
snapshots (:meth:`Renderer.display`, deterministic).  What the latent's value means to the
decoder (code weights, or VQGAN z) is the latent's concern (:meth:`Latent.decode`).
"""

from __future__ import annotations

import torch

from .latents import Latent
from .ops import clamp_with_grad, laplace_noise
from .state import display_seed, make_generators


class Renderer:
    """The pixels of ``latent`` through ``decoder`` (already cast to the run's precision)."""

    def __init__(self, cfg, decoder, latent: Latent, seeds):
        self.cfg, self.decoder, self.latent, self.seeds = cfg, decoder, latent, seeds

    def noise(self, gens, shape):
        """Crowson's Laplace output noise (dVAE presets), one draw per run from its generator, or None."""
        if not self.cfg.noise_scale:
            return None
        return self.cfg.noise_scale * laplace_noise(shape, gens, self.cfg.device)

    def decode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] of a value ``x`` of the latent, differentiable in it: Crowson's
        ClampWithGrad keeps the gradient of pixels pushed past the range (docs/methods.md §1)."""
        x = self.latent.decode(self.decoder, x, noise)
        return clamp_with_grad(x, 0, 1) if self.cfg.clamp_grad else x.clamp(0, 1)

    def render(self, gens, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(relaxed value, pixels) of the latent at ``step`` (its draws, and the output noise, from ``gens``)."""
        width, height = self.cfg.dims()
        self.latent.step = step  # a coarse-to-fine latent lets its levels learn by the step
        codes = self.latent.relax(gens)
        return codes, self.decode(codes, self.noise(gens, (3, height, width)))

    @torch.no_grad()
    def display(self, step: int) -> torch.Tensor:
        """The snapshot at ``step``, [B, 3, H, W] on the CPU: the latent's display decode (its moving
        average when on), with noise seeded by (run seed, step) when ``display_noise``."""
        cfg = self.cfg
        with self.latent.averaged():
            codes = self.latent.display(cfg.display)
        noise = None
        if cfg.display_noise and cfg.noise_scale:
            width, height = cfg.dims()
            noise = self.noise(make_generators(display_seed(s, step) for s in self.seeds), (3, height, width))
        return self.latent.decode(self.decoder, codes, noise).clamp(0, 1).float().cpu()
