"""Random cutouts: what CLIP sees of the image at each step.

``crowson`` is Crowson's MakeCutouts (sizes ``u**cut_pow`` between the CLIP input
size and the image side, Lanczos-filtered resize); ``uniform`` and ``normal`` are
Aleph2Image's size laws (fractions of the side, bilinear resize, shared noise).
Every draw comes from the run's own generator, so a run's cutouts do not depend
on which other runs share its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import RunConfig
from .ops import resample


def draw_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> list[int]:
    """Side lengths of ``cfg.cutn`` square cutouts of a ``side``-pixel image."""
    n = cfg.cutn
    if cfg.cut == "crowson":
        lo = min(side, cut_size)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        sizes = u**cfg.cut_pow * (side - lo) + lo
    elif cfg.cut == "uniform":
        lo, hi = cfg.cut_range
        sizes = side * (lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
    else:  # normal
        mean, std, lo, hi = cfg.cut_range
        frac = (mean + std * torch.randn(n, generator=g, dtype=torch.float64)).clamp(lo, hi)
        sizes = side * frac
    return [max(1, min(side, int(s))) for s in sizes.tolist()]


def cut_run(image: torch.Tensor, cfg: RunConfig, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """Cutouts of one image [3, H, W] -> [cutn, 3, cut_size, cut_size]."""
    side = min(image.shape[-2:])
    sizes = draw_sizes(cfg, side, cut_size, g)
    whole = round(cfg.cut_whole * len(sizes))
    sizes[len(sizes) - whole :] = [side] * whole  # views of the whole image keep the composition in sight
    # Crowson draws offsets inclusive of (side - size); Aleph2Image's randint excludes it.
    inclusive = 1 if cfg.cut == "crowson" else 0
    # Offsets per axis (y, x), as Crowson's MakeCutouts: image prompts keep their aspect ratio.
    h, w = image.shape[-2:]
    spans = torch.tensor([[max(h - s + inclusive, 1), max(w - s + inclusive, 1)] for s in sizes], dtype=torch.float64)
    offs = (torch.rand(len(sizes), 2, generator=g, dtype=torch.float64) * spans).long().tolist()
    flips = torch.rand(len(sizes), generator=g) < 0.5 if cfg.cut_flip else [False] * len(sizes)
    cuts = []
    for s, (oy, ox), flip in zip(sizes, offs, flips):
        crop = image[None, :, oy : oy + s, ox : ox + s]
        if cfg.cut_resample == "lanczos":
            crop = resample(crop, cut_size)
        else:
            crop = F.interpolate(crop, size=(cut_size, cut_size), mode="bilinear", align_corners=False)
        cuts.append(crop.flip(-1) if flip else crop)
    cuts = torch.cat(cuts)
    if cfg.cut_affine:
        cuts = random_affine(cuts, cfg.cut_affine, g)
    if cfg.cut_noise:
        # One scalar strength per run and step, shared by its cutouts (Aleph2Image Delta).
        r = torch.rand((), generator=g).item()
        noise = torch.randn(cuts.shape, generator=g).to(cuts.device)
        cuts = cuts + cfg.cut_noise * r * noise
    return cuts


def random_affine(cuts: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    """Rotate each cutout by up to ±``degrees`` and shift it by up to ``degrees``/3 % of its side
    (border padding): augmentations make adversarial textures that fool CLIP from one exact
    view much less rewarding than an image CLIP recognises from every view."""
    n = cuts.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * degrees / 150  # grid units: 2 = the whole side
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(cuts), list(cuts.shape), align_corners=False)
    return F.grid_sample(cuts, grid, padding_mode="border", align_corners=False)


def make_cutouts(images: torch.Tensor, cfg: RunConfig, cut_size: int, generators) -> torch.Tensor:
    """Cutouts of a batch [B, 3, H, W] -> [B * cutn, 3, cut_size, cut_size], run-major."""
    return torch.cat([cut_run(img, cfg, cut_size, g) for img, g in zip(images, generators)])
