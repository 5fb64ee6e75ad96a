"""Init noise (nerdyrodent's ``-in pixels|gradient``): a run starts from the decoder's encoding of a
random image, as ``--init-image`` starts from an image's.

Each run draws its image from its own generator, first of everything it draws, so the image is a
function of the run's seed alone (same seed, same image; the global RNG is never touched), and each
run of a batch starts from its own.  nerdyrodent draws from numpy's unseeded global RNG (its noise
starts are not reproducible) and one image per invocation.

* ``pixels``: every channel of every pixel uniform in 0..255 (nerdyrodent: 0..254, ``randint(0, 255)``).
* ``gradient``: a linear ramp per channel, as nerdyrodent's ``random_gradient_image``: red left to right
  from 0 to a random level in 1..254, green top to bottom from 0 to one in 2..254, blue top to bottom
  from a level in 0..254 to one in 3..127 (its ranges), truncated to whole levels.

Both are made at the output size (nerdyrodent makes them at ``-s`` and resizes them to the token
grid's size, Lanczos; its pixel array is also transposed for a non-square size).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the config imports the engine's tables of names
    from ..config import RunConfig


def _level(generator: torch.Generator, lo: int, hi: int) -> float:
    """A whole level in lo..hi-1 (numpy's randint convention, nerdyrodent's ranges)."""
    return float(torch.randint(lo, hi, (1,), generator=generator))


def pixel_noise(generator: torch.Generator, width: int, height: int) -> torch.Tensor:
    """Uniform random pixels, [3, H, W] uint8."""
    return torch.randint(0, 256, (3, height, width), generator=generator).to(torch.uint8)


def gradient_image(generator: torch.Generator, width: int, height: int) -> torch.Tensor:
    """Random colour ramps (red across, green and blue down), [3, H, W] uint8."""
    red_stop, green_stop = _level(generator, 1, 255), _level(generator, 2, 255)
    blue_start, blue_stop = _level(generator, 0, 255), _level(generator, 3, 128)
    across = torch.linspace(0.0, red_stop, width, dtype=torch.float64).expand(height, width)
    green = torch.linspace(0.0, green_stop, height, dtype=torch.float64)[:, None].expand(height, width)
    blue = torch.linspace(blue_start, blue_stop, height, dtype=torch.float64)[:, None].expand(height, width)
    return torch.stack([across, green, blue]).floor().to(torch.uint8)  # truncated, as numpy's uint8 cast


INIT_NOISES = {"pixels": pixel_noise, "gradient": gradient_image}  # RunConfig.init_noise -> image maker


def noise_image(kind: str, generator: torch.Generator, width: int, height: int) -> torch.Tensor:
    """The init-noise image ``kind`` drawn from ``generator``: [3, H, W] uint8."""
    return INIT_NOISES[kind](generator, width, height)


def encode_init_noise(cfg: RunConfig, decoder, grid: tuple[int, int], generators, space: str = "codes") -> torch.Tensor:
    """Each run's noise image at the output size, encoded as ``--init-image`` encodes its image: the dVAE
    encoder's logits [B, V, h, w] (``space`` "codes") or the VQGAN's quantized z [B, e_dim, h, w] ("z").
    One image at a time, so a run's start does not depend on the batch it is in."""
    encode = decoder.encode if space == "z" else decoder.encode_logits  # check_latent: the decoder has it
    h, w = grid
    f = decoder.downsample
    out = []
    with torch.no_grad():
        for g in generators:
            image = noise_image(cfg.init_noise, g, w * f, h * f)
            out.append(encode((image.float() / 255.0)[None]).float().cpu())
    return torch.cat(out)


def noise_record(kind: str, seed: int, width: int, height: int) -> dict:
    """What a manifest records of a run's generated start: its kind, the seed whose generator draws it
    first, its size and the sha256 of its pixels (H x W x RGB bytes), so that it can be made again and checked."""
    image = noise_image(kind, torch.Generator().manual_seed(int(seed)), width, height)
    digest = hashlib.sha256(image.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()
    return {"kind": kind, "seed": int(seed), "size": [width, height], "sha256": digest}
