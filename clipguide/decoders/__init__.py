"""Discrete decoders behind one small interface.

A decoder turns a grid of code weights ``[B, V, h, w]`` (one-hot or soft) into
pixels ``[B, 3, h·f, w·f]`` on the [0, 1] scale, *unclamped* (the loop clamps,
with or without Crowson's gradient-preserving clamp).  Adapters hold only the
inference modules: no Lightning, no training losses.  :class:`DalleDecoder` is here;
the taming VQGAN adapter is :class:`clipguide.decoders.vqgan.VQGANDecoder`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, WeightsError
from ..ops import cast_copy

PACKAGE_DIR = Path(__file__).resolve().parent.parent

VQGAN_CACHE = "vqgan"  # cache subdirectory of the taming files, saved as <registry name>.yaml / .ckpt


def _taming(about: str, config_url: str, checkpoint_url: str, config_sha256=None, checkpoint_sha256=None) -> dict:
    """A registry entry for a taming .yaml + .ckpt pair.  sha256 None: no published digest;
    the one seen on first download is recorded beside the file and enforced from then on."""
    return {"format": "taming", "about": about, "files": {
        "config": {"url": config_url, "sha256": config_sha256},
        "checkpoint": {"url": checkpoint_url, "sha256": checkpoint_sha256}}}


# Registry of named decoders: data, not code paths.
DECODERS = {
    "dalle": {"format": "dall_e-pickle", "about": "OpenAI DALL-E dVAE (8192 codes, f=8), downloaded from cdn.openai.com"},
    "shapes-dvae": {"format": "json", "path": "shapes/models/shapes-dvae.json", "about": "shapes-world dVAE (dall_e architecture), shipped"},
    "shapes-vqgan": {"format": "json", "path": "shapes/models/shapes-vqgan.json", "about": "shapes-world VQGAN (taming architecture), shipped"},
    "vqgan-imagenet-f16-1024": _taming(
        "taming VQGAN, ImageNet, f=16, 1024 codes (Crowson's notebook default)",
        "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
        "https://heibox.uni-heidelberg.de/d/8088892a516d4e3baf92/files/?p=%2Fckpts%2Flast.ckpt&dl=1"),
    "vqgan-imagenet-f16-16384": _taming(
        "taming VQGAN, ImageNet, f=16, 16384 codes (nerdyrodent's default)",
        "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
        "https://heibox.uni-heidelberg.de/d/a7530b09fed84f80a887/files/?p=%2Fckpts%2Flast.ckpt&dl=1"),
    "vqgan-gumbel-f8-8192": _taming(
        "taming Gumbel-quantized VQGAN, OpenImages, f=8, 8192 codes",
        "https://heibox.uni-heidelberg.de/d/2e5662443a6b4307b470/files/?p=%2Fconfigs%2Fmodel.yaml&dl=1",
        "https://heibox.uni-heidelberg.de/d/2e5662443a6b4307b470/files/?p=%2Fckpts%2Flast.ckpt&dl=1"),
    # The WikiArt models: the pixray project's v1.7.1 GitHub release assets, URLs as in
    # github.com/pixray/pixray, file vqgan.py (vqgan_config_table / vqgan_checkpoint_table, commit
    # 30d7aff "Updated vqgan_wikiart model downloads").  The older host, mirror.io.community, is
    # reported gone: nerdyrodent/VQGAN-CLIP's download_models.sh dropped it (commit c350803) and
    # pixray keeps it only as a fallback entry ("wikiart_1024m", "wikiart_16384m2").
    "vqgan-wikiart-f16-1024": _taming(
        "VQGAN fine-tuned on WikiArt, f=16, 1024 codes (community model)",
        "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_1024.yaml",
        "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_1024.ckpt"),
    "vqgan-wikiart-f16-16384": _taming(
        "VQGAN fine-tuned on WikiArt, f=16, 16384 codes (community model)",
        "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_16384.yaml",
        "https://github.com/pixray/pixray/releases/download/v1.7.1/vqgan_wikiart_16384.ckpt"),
    "vqgan-coco": _taming(
        "first stage of taming's COCO Net2Net transformer (8.4 GB checkpoint)",
        "https://dl.nmkd.de/ai/clip/coco/coco.yaml", "https://dl.nmkd.de/ai/clip/coco/coco.ckpt"),
    "vqgan-faceshq": _taming(
        "first stage of taming's FacesHQ Net2Net transformer",
        "https://drive.google.com/uc?export=download&id=1fHwGx_hnBtC8nsq7hesJvs-Klv-P0gzT",
        "https://app.koofr.net/content/links/a04deec9-0c59-4673-8b37-3d696fe63a5d/files/get/last.ckpt"
        "?path=%2F2020-11-13T21-41-45_faceshq_transformer%2Fcheckpoints%2Flast.ckpt"),
    "vqgan-sflckr": _taming(
        "first stage of taming's S-FLCKR Net2Net transformer (landscapes)",
        "https://heibox.uni-heidelberg.de/d/73487ab6e5314cb5adba/files/?p=%2Fconfigs%2F2020-11-09T13-31-51-project.yaml&dl=1",
        "https://heibox.uni-heidelberg.de/d/73487ab6e5314cb5adba/files/?p=%2Fcheckpoints%2Flast.ckpt&dl=1"),
}


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
            from ..weights import DALLE_FILES

            raise WeightsError(f"--init-image needs the dVAE encoder {self.encoder_source}, which does not exist: put "
                               f"OpenAI's encoder.pkl ({DALLE_FILES['encoder']['url']}) in {self.encoder_source.parent}, "
                               "beside the decoder.pkl, or use --decoder dalle, which downloads both")

    def load_encoder(self) -> torch.nn.Module:
        """The encoder, loaded from ``encoder_source`` on first use (fetched into the cache if need be,
        through the same restricted unpickler and sha256 checks as decoder.pkl), on the decoder's device."""
        if self.encoder is None:
            from . import dalle_files

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


def resolve_shipped(rel: str) -> Path:
    return PACKAGE_DIR / rel


def load_decoder(spec: str, device: str = "cpu"):
    """A decoder from a registry name (``dalle``, ``shapes-dvae``, ``vqgan-imagenet-f16-16384``, ...)
    or a file: ``decoder.pkl`` as published by OpenAI (for --init-image, ``encoder.pkl`` beside it), a
    model ``.json`` + ``.safetensors``, a taming ``CONFIG.yaml`` (checkpoint: ``CONFIG.ckpt`` beside it)
    or ``CONFIG.yaml:CHECKPOINT.ckpt``."""
    from . import dalle_files

    entry = DECODERS.get(spec)
    path = Path(spec).expanduser()
    if entry is not None and entry["format"] == "json":
        path, entry = resolve_shipped(entry["path"]), None
    if entry is not None and entry["format"] == "taming":
        return _load_registry_vqgan(spec, entry, device)
    if entry is not None:  # dalle; its encoder.pkl is fetched by the first encode (--init-image) only
        from ..weights import DALLE_FILES

        module, sha = dalle_files.load_dalle_decoder(None, device)
        return DalleDecoder(module, name=spec, sha256=sha, encoder_source=DALLE_FILES["encoder"]["url"])
    if path.suffix == ".pkl":  # the encoder, for --init-image only: encoder.pkl in the same folder
        module, sha = dalle_files.load_dalle_decoder(path, device)
        return DalleDecoder(module, name=path.name, sha256=sha, encoder_source=path.with_name("encoder.pkl"))
    if path.suffix == ".json":
        return _load_json_decoder(path, device)
    taming_files = taming_paths(spec)
    if taming_files is not None:
        from .vqgan import load_taming

        return load_taming(*taming_files, device=device)
    known = ", ".join(DECODERS)
    raise ConfigError(f"unknown decoder {spec!r}: use one of {known}, a decoder.pkl, a model .json file, "
                      "a taming CONFIG.yaml (with CONFIG.ckpt beside it) or CONFIG.yaml:CHECKPOINT.ckpt")


def taming_paths(spec: str) -> tuple[Path, Path] | None:
    """(config, checkpoint) of a ``CONFIG.yaml`` spec (checkpoint: the same name with ``.ckpt``)
    or a ``CONFIG.yaml:CHECKPOINT`` spec; None for anything else."""
    m = re.fullmatch(r"(.+\.ya?ml)(?::(.+))?", spec)
    if m is None:
        return None
    config = Path(m[1]).expanduser()
    return config, Path(m[2]).expanduser() if m[2] else config.with_suffix(".ckpt")


def taming_cache_paths(name: str) -> tuple[Path, Path]:
    """Where the config and checkpoint of registry entry ``name`` are cached."""
    from ..weights import cache_dir

    folder = cache_dir() / VQGAN_CACHE
    return folder / f"{name}.yaml", folder / f"{name}.ckpt"


def _load_registry_vqgan(name: str, entry: dict, device: str):
    """Fetch (or find in the cache) a registry VQGAN's two files and load them."""
    from .. import weights
    from .vqgan import load_taming

    files = entry["files"]
    config, checkpoint = (weights.fetch(files[kind]["url"], subdir=VQGAN_CACHE, filename=cached.name,
                                        sha256=files[kind]["sha256"])
                          for kind, cached in zip(("config", "checkpoint"), taming_cache_paths(name)))
    return load_taming(config, checkpoint, name=name, device=device)


def _load_json_decoder(path: Path, device: str):
    from . import dalle_files
    from ..errors import WeightsError

    if not path.is_file():
        raise WeightsError(f"decoder config {path} does not exist: check the path (shipped models: clipguide train-shapes rebuilds them)")
    info = dalle_files._read_json(path)
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind == "dall_e":
        encoder, module, sha = dalle_files.load_dalle_safetensors(path)
        dec = DalleDecoder(module, name=path.stem, sha256=sha, encoder=encoder)
        return dec.to(device)
    if kind == "taming":
        from .vqgan import load_json

        return load_json(path, device)
    raise ConfigError(f"decoder config {path} has kind {kind!r}; supported here: dall_e, taming")
