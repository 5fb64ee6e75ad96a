"""Random cutouts: what CLIP sees of the image at each step.

``crowson`` is Crowson's MakeCutouts (sizes ``u**cut_pow`` between the CLIP input
size and the image side, Lanczos-filtered resize); ``uniform`` and ``normal`` are
Aleph2Image's size laws (fractions of the side, bilinear resize, shared noise);
``pooled`` is nerdyrodent's "latest" MakeCutouts (every cutout the whole image, pooled to CLIP's
size, made different by Kornia augmentations, :mod:`.augments`).  Every draw comes from the run's own generator, so a run's cutouts do not depend
on which other runs share its batch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .augments import augment
from .ops import clamp_with_grad, resample

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig


def crowson_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """Crowson's MakeCutouts: u^cut_pow between CLIP's input size and the whole side (docs/methods.md §1)."""
    lo = min(side, cut_size)
    u = torch.rand(cfg.cutn, generator=g, dtype=torch.float64)
    return u**cfg.cut_pow * (side - lo) + lo


def uniform_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """Aleph2Image Delta: a uniform fraction of the side in ``cut_range`` (lo, hi) (docs/methods.md §5.1)."""
    lo, hi = cfg.cut_range
    return side * (lo + (hi - lo) * torch.rand(cfg.cutn, generator=g, dtype=torch.float64))


def normal_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """The first Aleph2Image: a normal fraction (mean, std) clipped to (lo, hi) (docs/methods.md §5.2)."""
    mean, std, lo, hi = cfg.cut_range
    return side * (mean + std * torch.randn(cfg.cutn, generator=g, dtype=torch.float64)).clamp(lo, hi)


def whole_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """nerdyrodent's generate.py: every cutout is the whole image (docs/methods.md §6); draws nothing."""
    return torch.full((cfg.cutn,), float(side), dtype=torch.float64)


@dataclass(frozen=True)
class SizeLaw:
    """How a cutout law draws its sizes, and whether its offsets may reach the last pixel (Crowson's
    ``randint(0, side - size + 1)``) or stop one short (the notebooks' exclusive bound)."""

    draw: Callable[..., torch.Tensor]
    inclusive: int
    range_numbers: int  # how many numbers ``cut_range`` needs


SIZE_LAWS = {
    "crowson": SizeLaw(crowson_sizes, 1, 0),
    "uniform": SizeLaw(uniform_sizes, 0, 2),
    "normal": SizeLaw(normal_sizes, 0, 4),
    "pooled": SizeLaw(whole_sizes, 1, 0),
}


def draw_sizes(cfg: RunConfig, side: int, cut_size: int, g: torch.Generator) -> list[int]:
    """Side lengths of ``cfg.cutn`` square cutouts of a ``side``-pixel image, by ``cfg.cut``'s law."""
    sizes = SIZE_LAWS[cfg.cut].draw(cfg, side, cut_size, g)
    return [max(1, min(side, int(s))) for s in sizes.tolist()]


def cut_run(image: torch.Tensor, cfg: RunConfig, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """Cutouts of one image [3, H, W] -> [cutn, 3, cut_size, cut_size]."""
    if cfg.cut_roll:  # DeepDream's random jitter (Mordvintsev et al. 2015), wrapping round
        shift = torch.randint(-cfg.cut_roll, cfg.cut_roll + 1, (2,), generator=g).tolist()
        image = torch.roll(image, shift, (-2, -1))
    cuts = pooled_views(image, cfg.cutn, cut_size) if cfg.cut == "pooled" else crops(image, cfg, cut_size, g)
    if cfg.cut_affine:
        cuts = random_affine(cuts, cfg.cut_affine, g)
    if cfg.augments:  # after the crops and before the noise, as nerdyrodent's MakeCutouts
        cuts = augment(cuts, cfg.augments, g)
    if cfg.cut_noise:
        # One strength per run and step shared by its cutouts (Aleph2Image Delta), or one per cutout
        # (nerdyrodent's MakeCutouts: U(0, 0.1) each), times Gaussian noise.
        r = torch.rand(len(cuts), 1, 1, 1, generator=g).to(cuts) if cfg.cut_noise_each else torch.rand((), generator=g).item()
        noise = torch.randn(cuts.shape, generator=g).to(cuts.device)
        cuts = cuts + cfg.cut_noise * r * noise
    return clamp_with_grad(cuts, 0, 1) if cfg.cut_clamp else cuts


def crops(image: torch.Tensor, cfg: RunConfig, cut_size: int, g: torch.Generator) -> torch.Tensor:
    """The random square crops of ``cfg.cut``'s size law, resized to ``cut_size``.  Sizes are of the short
    side (Crowson's ``max_size = min(sideX, sideY)``) and offsets are drawn per axis, so on a non-square
    image the crops, the whole views (the short side's square) and their zoomed-out versions range
    over the long axis too; a view of all of a non-square image, squashed to a square, is ``pooled``'s."""
    side = min(image.shape[-2:])
    sizes = draw_sizes(cfg, side, cut_size, g)
    whole = round(cfg.cut_whole * len(sizes))
    sizes[len(sizes) - whole :] = [side] * whole  # views of the whole image keep the composition in sight
    if whole and cfg.cut_mirror:
        zoom = 1 + cfg.cut_mirror * torch.rand(whole, generator=g, dtype=torch.float64)
        sizes[len(sizes) - whole :] = [int(side * z) for z in zoom.tolist()]
    offs = draw_offsets(image.shape[-2:], sizes, SIZE_LAWS[cfg.cut].inclusive, g)
    flips = (torch.rand(len(sizes), generator=g) < 0.5).tolist() if cfg.cut_flip else [False] * len(sizes)
    return crop_resize(image, sizes, offs, flips, cut_size, cfg.cut_resample)


def pooled_views(image: torch.Tensor, cutn: int, cut_size: int) -> torch.Tensor:
    """nerdyrodent's "latest" MakeCutouts (docs/methods.md §6): ``cutn`` copies of the whole image pooled to
    ``cut_size`` as the mean of adaptive average and max pooling; only the augmentations and the noise
    that follow make them differ.  Max pooling keeps thin bright strokes that averaging would wash out.  A
    non-square image is pooled to the square whole (squashed, as nerdyrodent's adaptive pooling does)."""
    pooled = (F.adaptive_avg_pool2d(image[None], cut_size) + F.adaptive_max_pool2d(image[None], cut_size)) / 2
    return pooled.expand(cutn, -1, -1, -1)


def draw_offsets(shape, sizes: list[int], inclusive: int, g: torch.Generator) -> list[list[int]]:
    """Top-left corners (y, x) of square cutouts, per axis as Crowson's MakeCutouts (image prompts keep
    their aspect ratio).  Crowson draws offsets inclusive of (side - size), Aleph2Image's randint
    excludes it (``inclusive`` 1 or 0).  A cutout larger than the image (``cut_mirror``) starts
    between (side - size) and 0, so the image lies somewhere inside it."""
    h, w = shape
    low = torch.tensor([[min(h - s, 0), min(w - s, 0)] for s in sizes], dtype=torch.float64)
    spans = torch.tensor([[max(abs(h - s) + inclusive, 1), max(abs(w - s) + inclusive, 1)] for s in sizes], dtype=torch.float64)
    return (low + (torch.rand(len(sizes), 2, generator=g, dtype=torch.float64) * spans).floor()).long().tolist()


def crop_resize(image: torch.Tensor, sizes, offsets, flips, cut_size: int, method: str) -> torch.Tensor:
    """All square crops of [3, H, W] (side ``sizes[i]`` at ``offsets[i]`` = (y, x), mirrored where
    ``flips[i]``) resized to ``cut_size``, in two batched matmuls.

    Both resizes are separable linear maps, so crop i is ``Y_i @ image @ X_i.T`` with
    ``Y_i`` [cut, H] and ``X_i`` [cut, W]: the resize matrix of the crop's side placed at its
    offset.  One batched product replaces a Python loop of small per-crop kernels (forward
    and backward); the arithmetic is the same as ``resample``'s up to rounding order.
    """
    h, w = image.shape[-2:]
    dev = str(image.device)
    ys = torch.stack([_placed(resize_matrix(s, cut_size, method, image.dtype, dev), oy, h) for s, (oy, _) in zip(sizes, offsets)])
    xs = [_placed(resize_matrix(s, cut_size, method, image.dtype, dev), ox, w) for s, (_, ox) in zip(sizes, offsets)]
    xs = torch.stack([x.flip(0) if f else x for x, f in zip(xs, flips)])
    return ys[:, None] @ image[None] @ xs[:, None].transpose(-1, -2)


def _placed(matrix: torch.Tensor, offset: int, length: int) -> torch.Tensor:
    """[cut, s] resize matrix -> [cut, length], acting on samples offset..offset+s; samples
    outside 0..length-1 are read mirrored (reflect padding, as F.pad's "reflect")."""
    out = matrix.new_zeros(matrix.shape[0], length)
    if 0 <= offset and offset + matrix.shape[1] <= length:
        out[:, offset : offset + matrix.shape[1]] = matrix
        return out
    idx = torch.arange(offset, offset + matrix.shape[1]).abs()
    idx = torch.where(idx >= length, 2 * (length - 1) - idx, idx)
    return out.index_add_(1, idx.to(out.device), matrix)


@functools.lru_cache(maxsize=1024)
def resize_matrix(src: int, dst: int, method: str, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """[dst, src] matrix of the 1-D resize that ``method`` applies along each axis, found by
    resizing the identity: ``lanczos`` is ops.resample (Lanczos-2 low-pass, then bicubic),
    ``bilinear`` is F.interpolate's bilinear (Aleph2Image)."""
    basis = torch.eye(src, dtype=torch.float64).view(src, 1, src, 1)  # width 1: the other axis is untouched
    if method == "lanczos":
        out = resample(basis, dst)[:, 0, :, 0]
    else:
        out = F.interpolate(basis, size=(dst, 1), mode="bilinear", align_corners=False)[:, 0, :, 0]
    return out.T.to(device=device, dtype=dtype).contiguous()


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
