"""Models for a config, loaded once per process, device and precision."""

from __future__ import annotations

import functools

from ..config import RunConfig
from ..engine.devices import check_device
from ..engine.state import DTYPES
from .clip import load_clip
from .decoders import load_decoder
from .priors import load_prior


@functools.lru_cache(maxsize=4)
def cached_clip(spec: str, device: str, precision: str = "fp32"):
    """A CLIP, loaded once per process, device and precision.  A bf16 one keeps no fp32 image
    tower (its text tower stays fp32): ~350 MB less for ViT-B/32."""

    return load_clip(spec, device=device).cast(DTYPES[precision], in_place=True)


@functools.lru_cache(maxsize=4)
def cached_decoder(spec: str, device: str, precision: str = "fp32"):
    """A decoder, loaded once per process, device and precision (a bf16 one keeps no fp32 copy)."""

    return load_decoder(spec, device=device).cast(DTYPES[precision])


def load_models(cfg: RunConfig):
    """(decoder, clip) for a config, loaded once per process, device and precision."""
    device = check_device(cfg.device)
    return (cached_decoder(cfg.decoder, device, cfg.precision),
            cached_clip(cfg.clip, device, cfg.precision))


@functools.lru_cache(maxsize=4)
def cached_prior(spec: str, device: str):
    """A token prior, loaded once per process and device."""
    return load_prior(spec, device=device)


def load_prior_of(cfg: RunConfig):
    """The token prior ``cfg.prior`` names (loaded once per process and device), or None."""
    return cached_prior(cfg.prior, check_device(cfg.device)) if cfg.prior else None


def load_ranker_of(cfg: RunConfig):
    """The CLIP ``cfg.prior_clip`` names to rate the prior's proposals (loaded once per process, device and
    precision), or None: the run's own CLIP rates them."""
    return cached_clip(cfg.prior_clip, check_device(cfg.device), cfg.precision) if cfg.prior_clip else None
