"""One-call generation: presets + models + loop + optional snapshots on disk."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .checkpoint import DEFAULT_EVERY, Checkpointer
from .config import RunConfig
from .errors import ConfigError
from .optimise import Result, optimise
from .presets import DEFAULT_PRESET, get_preset
from .snapshots import Snapshotter


def check_device(device: str) -> None:
    """Refuse a device this machine lacks, naming what is available."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA but no CUDA GPU is available here: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")


@functools.lru_cache(maxsize=4)
def cached_clip(spec: str, device: str, precision: str = "fp32"):
    """A CLIP, loaded once per process, device and precision.  A bf16 one keeps no fp32 image
    tower (its text tower stays fp32): ~350 MB less for ViT-B/32."""
    from .clip import load_clip
    from .optimise import DTYPES

    return load_clip(spec, device=device).cast(DTYPES[precision], in_place=True)


@functools.lru_cache(maxsize=4)
def cached_decoder(spec: str, device: str, precision: str = "fp32"):
    """A decoder, loaded once per process, device and precision (a bf16 one keeps no fp32 copy)."""
    from .decoders import load_decoder
    from .optimise import DTYPES

    return load_decoder(spec, device=device).cast(DTYPES[precision])


def load_models(cfg: RunConfig):
    """(decoder, clip) for a config, loaded once per process, device and precision."""
    check_device(cfg.device)
    return (cached_decoder(cfg.decoder, cfg.device, cfg.precision),
            cached_clip(cfg.clip, cfg.device, cfg.precision))


def describe_models(decoder, clip) -> dict:
    return {
        "decoder": decoder.describe(),
        "clip": {"name": clip.name, "sha256": getattr(clip, "sha256", None), "image_size": clip.image_size},
    }


def make_config(prompts, preset: str = DEFAULT_PRESET, **overrides) -> RunConfig:
    """A preset's config with the given fields replaced (``None`` values keep the preset's)."""
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return get_preset(preset).replace(prompts=prompts, **changes)


def generate(prompt, preset: str = DEFAULT_PRESET, steps: int | None = None, snapshots=None, seed: int | None = None,
             out_dir: str | Path | None = None, callback=None, overwrite: bool = False, output_filter=None,
             scorer=None, checkpoint_every: int = DEFAULT_EVERY, **overrides) -> Result:
    """Generate images for ``prompt`` (a string, or a list for a batch) with a preset.

    ``snapshots`` are steps to keep (e.g. ``(100, 600, 4000)``); with ``out_dir``
    they are also written as PNGs with a manifest and a contact sheet, screened by
    ``output_filter`` and scored by ``scorer`` when given (see :class:`Snapshotter`; the
    returned images are never filtered), and a checkpoint every ``checkpoint_every`` steps and
    at every snapshot, from which :func:`clipguide.resume` continues the run after a crash.
    Other keyword arguments override :class:`RunConfig` fields.
    """
    cfg = make_config(prompt, preset, steps=steps, snapshots=snapshots, seed=seed, **overrides)
    decoder, clip = load_models(cfg)
    callbacks = [callback] if callable(callback) else list(callback or [])
    saver = None
    if out_dir is not None:
        saver = Snapshotter(out_dir, cfg, describe_models(decoder, clip), preset=preset, overwrite=overwrite,
                            output_filter=output_filter, scorer=scorer)
        keeper = Checkpointer(out_dir, checkpoint_every, models=saver.manifest["models"], preset=preset)
        callbacks += [saver, keeper]
    result = optimise(cfg, decoder, clip, callbacks)
    if saver is not None:
        saver.finish(result)
        keeper.finish(result)
    return result
