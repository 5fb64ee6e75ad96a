"""The zoom video (nerdyrodent's ``-zvid`` and ``zoom.sh``): every ``zoom_every`` steps the run's
image is zoomed in about its centre, shifted, and encoded back through the decoder's encoder as
the new starting latent, so that the snapshots of one run become the frames of a zoom into it.

Where: after update k with (k + 1) % N == 0, so step N·m (what callbacks and snapshots see after
N·m updates) is the first image of a new segment: the zoomed re-encoding of the image optimised
for N steps.  The rule depends on k alone, not on ``--steps``: a run of k steps is the first k
steps of a longer one, and a resume that changes ``--steps`` continues the same computation.

What: the display image (what a snapshot shows), cropped to 1/scale of its side about the centre
and resized back (bilinear, edges replicated when zooming out), then shifted by whole pixels,
wrapping around as ``ImageChops.offset`` does in nerdyrodent's generate.py.  No randomness: a
zoom is a function of the latent, so a checkpoint anywhere in a zoom sequence resumes bit for bit.

The optimiser is reset to its freshly made state at each zoom, as nerdyrodent re-creates it: its
moments (Adam's running gradient averages, per code and position) describe the latent before the
zoom, whose content has moved, so kept moments would push each position by the history of
another.  The latent's init anchor and moving average restart at the zoomed latent too
(:meth:`Latent.restart`), as nerdyrodent's ``z_orig`` does.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .interfaces import CodebookDecoder, LogitEncoder


def zoom_image(images: torch.Tensor, scale: float, shift: tuple[int, ...] = ()) -> torch.Tensor:
    """``images`` [B, C, H, W] zoomed in by ``scale`` about the centre (a crop of 1/scale of each side
    resized back; below 1 zooms out, edges replicated), then shifted by (dx, dy) whole pixels, wrapping."""
    if scale != 1:
        b = images.shape[0]
        theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]], dtype=images.dtype).expand(b, 2, 3)
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if shift and any(shift):
        dx, dy = shift
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))  # ImageChops.offset: content moves right, down
    return images


def check_zoom(cfg, decoder) -> None:
    """Raise ConfigError when ``cfg`` zooms but the decoder cannot encode the zoomed image into the latent."""
    if not cfg.zoom_every:
        return
    name = repr(getattr(decoder, "name", decoder))
    if cfg.latent == "zquantize":
        if not isinstance(decoder, CodebookDecoder):  # (check_latent refuses this first)
            raise ConfigError(f"--zoom-every re-encodes the image, and {name} cannot encode into z")
        return
    if not isinstance(decoder, LogitEncoder):
        hint = "for a VQGAN use --latent zquantize" if isinstance(decoder, CodebookDecoder) else \
            "use a dVAE with its encoder (e.g. shapes-dvae), or a VQGAN with --latent zquantize"
        raise ConfigError(f"--zoom-every re-encodes the zoomed image into the latent, which needs a decoder that "
                          f"encodes images (encode_logits); {name} lacks one: {hint}")
    decoder.check_encoder()


class Zoom:
    """The zoom of a loop: call it after every update; it acts after those that end a segment."""

    def __init__(self, cfg, decoder, renderer, optimiser: torch.optim.Optimizer):
        check_zoom(cfg, decoder)
        self.every, self.scale, self.shift = cfg.zoom_every, cfg.zoom_scale, tuple(cfg.zoom_shift)
        self.decoder, self.renderer = decoder, renderer  # the decoder as loaded: its encoder, in fp32
        self.encode = decoder.encode if cfg.latent == "zquantize" else decoder.encode_logits
        # The optimiser as made, before any step: deep-copied again at each reset, since loading a
        # state dict may keep its tensors, which a stateful-from-birth optimiser (Adagrad) updates in place.
        self.fresh = copy.deepcopy(optimiser.state_dict())

    def __call__(self, latent, optimiser: torch.optim.Optimizer, k: int) -> bool:
        """After update ``k``: zoom and re-encode when (k + 1) % every == 0; whether it did."""
        if (k + 1) % self.every:
            return False
        image = self.renderer.display(k + 1)  # what the snapshot of step k + 1 would show without the zoom
        with torch.no_grad():
            start = self.encode(zoom_image(image, self.scale, self.shift)).float()
        latent.restart(start)
        optimiser.load_state_dict(copy.deepcopy(self.fresh))
        return True


def make_zoom(cfg, decoder, renderer, optimiser) -> Zoom | None:
    """The loop's zoom, or None when ``cfg.zoom_every`` is 0 (off)."""
    return Zoom(cfg, decoder, renderer, optimiser) if cfg.zoom_every else None
