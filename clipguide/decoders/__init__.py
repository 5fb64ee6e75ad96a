"""Discrete decoders behind one small interface.

A decoder turns a grid of code weights ``[B, V, h, w]`` (one-hot or soft) into
pixels ``[B, 3, h·f, w·f]`` on the [0, 1] scale, *unclamped* (the loop clamps,
with or without Crowson's gradient-preserving clamp).  Adapters hold only the
inference modules: no Lightning, no training losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# Registry of named decoders: data, not code paths.
DECODERS = {
    "dalle": {"format": "dall_e-pickle", "about": "OpenAI DALL-E dVAE (8192 codes, f=8), downloaded from cdn.openai.com"},
    "shapes-dvae": {"format": "json", "path": "shapes/models/shapes-dvae.json", "about": "shapes-world dVAE (dall_e architecture), shipped"},
}


@dataclass(eq=False)
class DalleDecoder:
    """OpenAI's dVAE decoder (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation").

    The decoder outputs a logit-Laplace distribution: channels 0-2 are the
    location and 3-5 the log-scale.  Pixels are sigmoid(loc [+ Laplace noise]),
    then ``unmap_pixels`` without its clamp: (x - 0.1) / 0.8.
    """

    module: torch.nn.Module
    name: str
    sha256: str | None = None
    encoder: torch.nn.Module | None = None
    downsample: int = 8
    logit_laplace_eps: float = 0.1
    extra: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    def decode(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, V, h, w] -> pixels [B, 3, 8h, 8w]; ``noise``: standard Laplace noise
        already multiplied by the noise scale, shape [B, 3, 8h, 8w] (reparameterised sample)."""
        out = self.module(codes.float()).float()  # dall_e runs fp16 on CUDA: back to fp32
        loc = out[:, :3]
        if noise is not None:
            loc = loc + out[:, 3:6].exp() * noise
        eps = self.logit_laplace_eps
        return (torch.sigmoid(loc) - eps) / (1 - 2 * eps)

    def to(self, device) -> "DalleDecoder":
        self.module.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "downsample": self.downsample}


def resolve_shipped(rel: str) -> Path:
    return PACKAGE_DIR / rel


def load_decoder(spec: str, device: str = "cpu"):
    """A decoder from a registry name (``dalle``, ``shapes-dvae``) or a file
    (``decoder.pkl`` as published by OpenAI, or a model ``.json`` + ``.safetensors``)."""
    from . import dalle_files

    entry = DECODERS.get(spec)
    path = Path(spec).expanduser()
    if entry is not None and entry["format"] == "json":
        path, entry = resolve_shipped(entry["path"]), None
    if entry is not None:  # dalle
        module, sha = dalle_files.load_dalle_decoder(None, device)
        return DalleDecoder(module, name=spec, sha256=sha)
    if path.suffix == ".pkl":
        module, sha = dalle_files.load_dalle_decoder(path, device)
        return DalleDecoder(module, name=path.name, sha256=sha)
    if path.suffix == ".json":
        return _load_json_decoder(path, device)
    known = ", ".join(DECODERS)
    raise ConfigError(f"unknown decoder {spec!r}: use one of {known}, a decoder.pkl, or a model .json file")


def _load_json_decoder(path: Path, device: str):
    from . import dalle_files
    from ..errors import WeightsError

    if not path.is_file():
        raise WeightsError(f"decoder config {path} does not exist: check the path (shipped models: clipguide train-shapes rebuilds them)")
    kind = json.loads(path.read_text()).get("kind")
    if kind == "dall_e":
        encoder, module, sha = dalle_files.load_dalle_safetensors(path)
        dec = DalleDecoder(module, name=path.stem, sha256=sha, encoder=encoder)
        return dec.to(device)
    raise ConfigError(f"decoder config {path} has kind {kind!r}; supported here: dall_e")
