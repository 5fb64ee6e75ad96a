"""Kornia's differentiable augmentations of the cutouts, by nerdyrodent's two-letter names.

nerdyrodent's VQGAN-CLIP ``generate.py`` (docs/methods.md §6) passes its cutouts through a chain of
Kornia augmentations chosen with ``-aug``; ``--augments`` takes the same names, in the same order
and with the same parameters (:data:`AUGMENTS`).  Kornia is an optional dependency
(``pip install 'clipguide[kornia]'``), imported only when a run asks for augmentations.

Reproducibility: Kornia draws its parameters from torch's global generators and has no per-call
generator (its documentation says so; a ``generator=`` argument raises).  :func:`augment` therefore
draws one 63-bit seed from the run's own generator, forks the global RNG, seeds it with that
number, applies the chain and restores the global RNG: the augmentations of a run depend on its
seed and step only, not on the other runs of its batch nor on the caller's global RNG.
"""

from __future__ import annotations

import functools
import threading

import torch

from ..errors import ConfigError

CUT = "cut"  # stands for the cutout side (RandomCrop and RandomResizedCrop keep the cutouts at CLIP's size)

# name -> (Kornia class, keyword arguments): generate.py's MakeCutouts ("latest" cut method).  "Ji" is
# Kornia 0.5.4's ColorJitter (the version nerdyrodent pins), which later Kornia renamed ColorJiggle (its
# ColorJitter now follows torchvision's formulas instead: docs/methods.md §7.8).
AUGMENTS = {
    "Ji": ("ColorJiggle", dict(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1, p=0.7)),
    "Sh": ("RandomSharpness", dict(sharpness=0.3, p=0.5)),
    "Gn": ("RandomGaussianNoise", dict(mean=0.0, std=1.0, p=0.5)),
    "Pe": ("RandomPerspective", dict(distortion_scale=0.7, p=0.7)),
    "Ro": ("RandomRotation", dict(degrees=15, p=0.7)),
    "Af": ("RandomAffine", dict(degrees=15, translate=0.1, shear=5, p=0.7, padding_mode="zeros", keepdim=True)),
    "Et": ("RandomElasticTransform", dict(p=0.7)),
    "Ts": ("RandomThinPlateSpline", dict(scale=0.8, same_on_batch=True, p=0.7)),
    "Cr": ("RandomCrop", dict(size=CUT, pad_if_needed=True, padding_mode="reflect", p=0.5)),
    "Er": ("RandomErasing", dict(scale=(0.1, 0.4), ratio=(0.3, 1 / 0.3), same_on_batch=True, p=0.7)),
    "Re": ("RandomResizedCrop", dict(size=CUT, scale=(0.1, 1), ratio=(0.75, 1.333), cropping_mode="resample", p=0.5)),
}

# The fork of the global RNG is process-wide: one augmented batch at a time, so that two runs optimised in
# threads of one process cannot reseed the global RNG between each other's seeding and Kornia's draws.
_GLOBAL_RNG = threading.Lock()


def check_augments(names) -> None:
    """Raise ConfigError for an unknown name (no Kornia needed: configs are checked without it)."""
    bad = [n for n in names if n not in AUGMENTS]
    if bad:
        raise ConfigError(f"--augments {bad[0]!r} is not one of {', '.join(AUGMENTS)} (nerdyrodent's -aug names)")


def require_kornia():
    """kornia.augmentation, or a one-line ConfigError naming the extra that installs it."""
    try:
        import kornia.augmentation as K
    except ImportError as e:
        raise ConfigError(f"--augments needs Kornia ({e.msg}): pip install 'clipguide[kornia]'") from None
    return K


@functools.lru_cache(maxsize=32)
def chain(names: tuple[str, ...], cut_size: int) -> torch.nn.Sequential:
    """The Kornia modules of ``names``, in order, for cutouts of side ``cut_size``."""
    K = require_kornia()
    check_augments(names)
    mods = []
    for name in names:
        cls, kw = AUGMENTS[name]
        mods.append(getattr(K, cls)(**{k: (cut_size, cut_size) if v == CUT else v for k, v in kw.items()}))
    return torch.nn.Sequential(*mods)


def augment(cuts: torch.Tensor, names: tuple[str, ...], g: torch.Generator) -> torch.Tensor:
    """``cuts`` [N, 3, S, S] through the chain of ``names``, with Kornia's draws seeded by one draw of ``g``.

    The chain runs in float32 (some Kornia transforms solve linear systems that bf16 lacks) and the
    result returns in the cutouts' dtype; gradients flow to ``cuts`` through every augmentation."""
    modules = chain(tuple(names), cuts.shape[-1])
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g))
    cuda = cuts.device.type == "cuda"
    index = (cuts.device.index if cuts.device.index is not None else torch.cuda.current_device()) if cuda else None
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)  # Kornia samples its parameters on the CPU by default
        if cuda:  # and a transform that draws on the image's device draws from that device's generator
            torch.cuda.default_generators[index].manual_seed(seed)
        out = modules(cuts.float())
    return out.to(cuts.dtype)
