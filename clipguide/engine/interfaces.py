"""The interfaces the engine needs from its models, declared once.

The engine never imports a model: the DALL-E dVAE and taming VQGAN adapters
(:mod:`clipguide.models`) implement these protocols, and so can a new decoder or guide
without touching the loop.  Optional abilities (a codebook, an image encoder) are
protocols of their own, checked with ``isinstance``; the latents say which they need.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Decoder(Protocol):
    """Turns a grid of code weights [B, V, h, w] (one-hot or soft) into pixels [B, 3, h·f, w·f] on
    the [0, 1] scale, unclamped (the loop clamps)."""

    name: str
    sha256: str | None  # of the weights, recorded with every run

    @property
    def vocab_size(self) -> int: ...  # V, the number of codes

    @property
    def downsample(self) -> int: ...  # f, pixels per code along each side

    def decode(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def cast(self, dtype: torch.dtype) -> "Decoder": ...  # a copy computing in dtype (itself if it already does)

    def describe(self, encoder: bool = False) -> dict: ...  # the record of a run's decoder (compared on resume)

    def blacklisted_codes(self) -> list[int]: ...  # codes Crowson's --blacklist gives a -100 logit bias


@runtime_checkable
class CodebookDecoder(Decoder, Protocol):
    """A VQGAN: code vectors [V, e_dim], and decoding of a latent z [B, e_dim, h, w] (z+quantize)."""

    @property
    def codebook(self) -> torch.Tensor: ...

    def decode_z(self, z: torch.Tensor) -> torch.Tensor: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # [B, 3, H, W] in [0, 1] -> quantized z


@runtime_checkable
class LogitEncoder(Protocol):
    """A dVAE with its encoder: images -> code logits [B, V, h, w] (Crowson's init image)."""

    def encode_logits(self, images: torch.Tensor) -> torch.Tensor: ...

    def check_encoder(self) -> None: ...  # raise the one-line error encoding would meet, loading nothing


@runtime_checkable
class GuideModel(Protocol):
    """A CLIP (or an ensemble of them): images and texts into one embedding space."""

    name: str
    sha256: str | None  # of the weights (an ensemble joins its members'), recorded with every run
    image_size: int  # the side of the square views it embeds

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...  # [N, 3, S, S] in [0, 1] -> [N, D]

    def encode_text(self, texts) -> torch.Tensor: ...  # [N, D]

    def cast(self, dtype: torch.dtype) -> "GuideModel": ...


@runtime_checkable
class TokenPrior(Protocol):
    """An unconditional model of a decoder's code grids (it never sees text: CLIP does that)."""

    name: str
    sha256: str | None

    @property
    def vocab_size(self) -> int: ...  # the decoder's V

    @property
    def grid(self) -> tuple[int, int]: ...  # (h, w) of the grids it models

    # -> codes [n, h, w] (int64); prefix [n, k]: the first k codes in raster order are given, the rest drawn
    def sample(self, n: int, generator: torch.Generator, prefix: torch.Tensor | None = None) -> torch.Tensor: ...

    def log_prob(self, x: torch.Tensor) -> torch.Tensor: ...  # codes [n, h, w] or code weights [n, V, h, w] -> [n]

    def describe(self) -> dict: ...  # the record of a run's prior (compared on resume)
