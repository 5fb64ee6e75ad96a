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


class Compiled:
    """A model whose forward methods run through ``torch.compile`` (``--compile``; Ansel et al. 2024,
    "PyTorch 2"); every other attribute is the model's own, so it passes for the model everywhere."""

    def __init__(self, model, methods: tuple[str, ...]):
        self._model = model
        for name in methods:
            if callable(getattr(model, name, None)):
                setattr(self, name, torch.compile(getattr(model, name)))

    def __getattr__(self, name):
        return getattr(self._model, name)


def compiled(model, methods: tuple[str, ...], on: bool):
    """``model`` with ``methods`` compiled when ``on``, else ``model`` itself (None stays None)."""
    return Compiled(model, methods) if on and model is not None else model


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """``tensors`` on the CPU, read from their device with one synchronisation: asynchronous copies
    (into pinned memory for CUDA), then one wait.  CPU tensors are returned as they are."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is None:
        return list(tensors)
    out = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.accelerator.synchronize(device)  # the copies above are queued on the device's stream
    return out


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
