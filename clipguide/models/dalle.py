"""OpenAI's DALL-E dVAE as a clipguide decoder."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.ops import cast_copy
from ..errors import ConfigError, WeightsError
from ..paths import DATA_DIR
from . import dalle_files
from .weights import DALLE_FILES


@dataclass(eq=False)
class DalleDecoder:
    """OpenAI's dVAE decoder (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation").

    The decoder outputs a logit-Laplace distribution: channels 0-2 are the
    location and 3-5 the log-scale.  Pixels are sigmoid(loc [+ Laplace noise]),
    then ``unmap_pixels`` without its clamp: (x - 0.1) / 0.8.

    The encoder (``--init-image`` only) is ``encoder``, or, for OpenAI's files, where its own
    ``encoder.pkl`` lives (``encoder_source``): it is loaded on first use, so a run without an
    init image never downloads nor reads that 100+ MB file.
    """

    module: torch.nn.Module
    name: str
    sha256: str | None = None
    encoder: torch.nn.Module | None = None
    downsample: int = 8
    logit_laplace_eps: float = 0.1
    extra: dict = field(default_factory=dict)
    # Where the encoder is while ``encoder`` is None: a Path (encoder.pkl beside a local decoder.pkl) or a
    # str, the URL of the registry's encoder.pkl (fetched into the weights cache, sha256 recorded and
    # checked like decoder.pkl's).  None: ``encoder`` is all there is (a .json dVAE holds both).
    encoder_source: Path | str | None = None
    encoder_sha256: str | None = None  # of the encoder_source file, once loaded

    @property
    def vocab_size(self) -> int:
        return self.module.vocab_size

    def decode(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, V, h, w] -> pixels [B, 3, 8h, 8w]; ``noise``: standard Laplace noise
        already multiplied by the noise scale, shape [B, 3, 8h, 8w] (reparameterised sample)."""
        # channels_last: ~25% faster convolutions on CPU for the same arithmetic.
        x = codes.to(self.dtype).contiguous(memory_format=torch.channels_last)
        # dall_e's Decoder.forward only checks shape and dtype (float32 only); a cast copy calls its blocks.
        out = (self.module(x) if self.dtype == torch.float32 else self.module.blocks(x)).float()
        loc = out[:, :3]
        if noise is not None:
            loc = loc + out[:, 3:6].exp() * noise
        eps = self.logit_laplace_eps
        return (torch.sigmoid(loc) - eps) / (1 - 2 * eps)

    @torch.no_grad()
    def encode_logits(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> the encoder's code logits [B, V, H/8, W/8]
        (Crowson's init_image: ``encoder(map_pixels(x))`` become the initial logits)."""
        encoder = self.load_encoder()
        x = images.to(next(encoder.parameters()).device).float()
        eps = self.logit_laplace_eps
        return encoder((1 - 2 * eps) * x + eps).float()  # dall_e.map_pixels, then the encoder

    def check_encoder(self) -> None:
        """Raise the one-line error that encoding an image would meet (no encoder at all, or a local
        encoder.pkl that is missing) without loading or downloading anything (check_latent calls this
        before a run starts)."""
        if self.encoder is not None:
            return
        if self.encoder_source is None:
            raise ConfigError(f"decoder {self.name!r} was loaded without its dVAE encoder, which --init-image needs: "
                              "use a model .json with an encoder (e.g. shapes-dvae)")
        if isinstance(self.encoder_source, Path) and not self.encoder_source.is_file():

            raise WeightsError(f"--init-image needs the dVAE encoder {self.encoder_source}, which does not exist: put "
                               f"OpenAI's encoder.pkl ({DALLE_FILES['encoder']['url']}) in {self.encoder_source.parent}, "
                               "beside the decoder.pkl, or use --decoder dalle, which downloads both")

    def load_encoder(self) -> torch.nn.Module:
        """The encoder, loaded from ``encoder_source`` on first use (fetched into the cache if need be,
        through the same restricted unpickler and sha256 checks as decoder.pkl), on the decoder's device."""
        if self.encoder is None:

            self.check_encoder()
            src = self.encoder_source
            path = src if isinstance(src, Path) else dalle_files.fetch_dalle_file("encoder", src)
            device = next(self.module.parameters()).device
            self.encoder, self.encoder_sha256 = dalle_files.load_dalle_encoder(path, device)
        return self.encoder

    def __post_init__(self):
        self.module.to(memory_format=torch.channels_last)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> "DalleDecoder":
        """A copy computing in ``dtype`` (pixels still come out fp32): ``--precision bf16``.
        dall_e's convolutions cast their input to fp32 on CPU, so they become torch convolutions."""
        if dtype == self.dtype:
            return self
        return dataclasses.replace(self, module=cast_dalle_convs(self.module, dtype))  # the encoder (init images) stays

    def to(self, device) -> "DalleDecoder":
        self.module.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self

    def blacklisted_codes(self) -> list[int]:
        """Crowson's list of OpenAI dVAE codes that decode to artefacts (none for another vocabulary)."""
        return dalle_blacklist(self.vocab_size)

    def describe(self, encoder: bool = False) -> dict:
        """What identifies the decoder in a run's record (compared on resume).  ``encoder``: the run
        encodes an init image; an encoder in a file of its own (OpenAI's encoder.pkl) then adds that
        file's sha256 as "encoder_sha256", loading the encoder (an encoder stored with the decoder,
        a .json dVAE's, is already covered by "sha256").

        The key depends on the run's config alone (describe_models passes ``encoder``), never on whether
        the encoder happens to be loaded already: generation.cached_decoder shares one decoder between the
        runs of a process, so "add it once loaded" would give a plain run after an --init-image run a
        different record, and a resumed --init-image run (fresh process, encoder not loaded yet when
        checkpoint.open_run describes it) a mismatch.  This way a plain run's record is what it always
        was, and a resumed --init-image run, which encodes its init image again, records the same
        encoder sha256 and is refused if the file changed."""
        out = {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "downsample": self.downsample}
        if encoder and self.encoder_source is not None:
            self.load_encoder()
            out["encoder_sha256"] = self.encoder_sha256
        return out


def cast_dalle_convs(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of a dall_e module in ``dtype`` whose ``dall_e.utils.Conv2d`` layers (which cast their
    input back to fp32 on CPU) are equivalent ``nn.Conv2d`` layers."""
    from dall_e.utils import Conv2d

    module = cast_copy(module, dtype)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2d):
                conv = torch.nn.Conv2d(child.n_in, child.n_out, child.kw, padding=(child.kw - 1) // 2, device="meta")
                conv.weight, conv.bias = child.w, child.b
                setattr(parent, name, conv)
    return module.to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=None)
def _blacklist_file() -> dict:
    return json.loads((DATA_DIR / "dalle_code_blacklist.json").read_text())


def dalle_blacklist(vocab: int) -> list[int]:
    """Crowson's blacklist of 363 DALL-E codes (biased by -100); only meaningful for
    OpenAI's 8192-code decoder, so any other vocabulary gets none."""
    return _blacklist_file()["codes"] if vocab == 8192 else []
