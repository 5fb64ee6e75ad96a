"""Torch devices: ``auto`` resolved to the best one present, and a clear error for one that is not."""

from __future__ import annotations

import torch

from ..errors import ConfigError

AUTO = "auto"


def resolve_device(device: str) -> str:
    """``device`` itself, or for ``auto`` the best device present: CUDA, then Apple's MPS, then the CPU."""
    if device != AUTO:
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def check_device(device: str) -> str:
    """The resolved ``device``; a device this machine lacks is a ConfigError naming what is available."""
    device = resolve_device(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for CUDA but no CUDA GPU is available here: use --device auto or cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device} asked for Apple's MPS, which is not available here: use --device auto or cpu")
    return device
