"""Taming-transformers VQGAN (Esser, Rombach & Ommer 2021, "Taming Transformers for
High-Resolution Image Synthesis") behind clipguide's decoder interface.

Only inference modules are built, straight from ``taming.modules``: the decoder,
``post_quant_conv`` and the quantizer, plus the encoder and ``quant_conv`` the first
time an image is encoded.  ``taming.models`` is never imported: it imports
pytorch_lightning at module level (broken on Lightning 2.x, peers.md pain 1), and its
``VQModel`` builds the training loss, whose LPIPS downloads VGG16 (docs/methods.md §7.5).

Two file formats:

* a taming ``.yaml`` + Lightning ``.ckpt`` pair: ``VQModel``, ``GumbelVQ``, or the first
  stage of a ``Net2NetTransformer`` (its ``first_stage_config`` and ``first_stage_model.*``
  keys).  The checkpoint is unpickled by :mod:`clipguide.models.safeload`, so nothing in the file
  runs (Lightning's callback classes become inert placeholders), and its keys are checked
  strictly.  ``loss.*`` and a Net2Net's transformer and conditioning stage are dropped on
  purpose; any other missing or extra key is an error.
* clipguide's own: ``<name>.json`` (``{"kind": "taming", "ddconfig", "n_embed",
  "embed_dim"}``) + ``<name>.safetensors`` with the same module keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..engine.ops import cast_copy, vector_quantize
from ..errors import ConfigError, WeightsError
from . import safeload, weights
from .dalle_files import _read_json

# taming class (last part of a config's ``target``) -> quantizer it builds
QUANTIZERS = {"VQModel": "vq", "GumbelVQ": "gumbel"}
# wrapper class -> key prefix of its first-stage autoencoder in the checkpoint
FIRST_STAGE_PREFIX = {"Net2NetTransformer": "first_stage_model."}
DECODE_PARTS = ("decoder", "post_quant_conv", "quantize")
ENCODE_PARTS = ("encoder", "quant_conv")  # loaded only when an image is encoded
ALL_PARTS = DECODE_PARTS + ENCODE_PARTS
IGNORED_PREFIXES = ("loss.",)  # LPIPS + discriminator weights: training only


@dataclass(frozen=True)
class TamingConfig:
    """The autoencoder architecture of a taming config; training settings are not kept."""

    quantizer: str  # "vq" (VectorQuantizer2) or "gumbel" (GumbelQuantize)
    ddconfig: dict  # Encoder/Decoder keyword arguments
    n_embed: int  # codebook size V
    embed_dim: int  # code vector size e_dim
    prefix: str = ""  # where the autoencoder's keys live in the checkpoint
    source: str = ""  # the config file, for messages


def read_yaml_config(path: Path) -> TamingConfig:
    """The VQGAN in a taming ``.yaml`` (``model.target`` / ``model.params``), read with
    ``yaml.safe_load``: a config names classes but nothing here imports them."""
    import yaml

    if not path.is_file():
        raise WeightsError(f"VQGAN config {path} does not exist: check the path")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(f"{path} is not a readable YAML config ({detail}): pass the taming model .yaml") from None
    cls, params = _target(raw.get("model") if isinstance(raw, dict) else None, path)
    prefix = FIRST_STAGE_PREFIX.get(cls, "")
    if prefix:
        cls, params = _target(params.get("first_stage_config"), path)
    if cls not in QUANTIZERS:
        raise ConfigError(
            f"{path} describes a {cls}, not a taming VQModel, GumbelVQ or Net2NetTransformer: pass a VQGAN config"
        )
    if params.get("remap"):
        raise ConfigError(f"{path} remaps codebook indices (remap: {params['remap']}), which clipguide does not support")
    return _architecture(QUANTIZERS[cls], params, prefix, path)


def read_json_config(path: Path) -> TamingConfig:
    """The VQGAN in a clipguide model ``.json`` (kind "taming")."""

    cfg = _read_json(path)
    if cfg.get("kind") != "taming":
        raise ConfigError(f"{path} has kind {cfg.get('kind')!r}, not 'taming': pass a VQGAN model .json")
    return _architecture("vq", cfg, "", path)


def _target(node, path: Path) -> tuple[str, dict]:
    """(class name, params) of a ``{target: dotted.Class, params: {...}}`` config node."""
    if not isinstance(node, dict) or not isinstance(node.get("target"), str):
        raise ConfigError(f"{path} has no model target: pass a taming model .yaml (model: target: ..., params: ...)")
    params = node.get("params")
    return node["target"].rsplit(".", 1)[-1], params if isinstance(params, dict) else {}


def _architecture(quantizer: str, params: dict, prefix: str, path: Path) -> TamingConfig:
    try:
        ddconfig, n_embed, embed_dim = dict(params["ddconfig"]), int(params["n_embed"]), int(params["embed_dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} lacks a VQGAN architecture ({type(e).__name__}: {e}): "
                          "it needs ddconfig, n_embed and embed_dim") from None
    return TamingConfig(quantizer, ddconfig, n_embed, embed_dim, prefix, str(path))


def build_parts(cfg: TamingConfig, parts=ALL_PARTS, device=None) -> dict[str, nn.Module]:
    """The named taming modules of ``cfg``, randomly initialised (``device="meta"``: shapes
    only, no memory and no init cost; weights are then assigned from a checkpoint)."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

    dd, z = cfg.ddconfig, cfg.ddconfig.get("z_channels")

    def quantizer():
        if cfg.quantizer == "gumbel":
            return GumbelQuantize(z, cfg.embed_dim, n_embed=cfg.n_embed)
        return VectorQuantizer2(cfg.n_embed, cfg.embed_dim, beta=0.25)  # beta: training only

    makers = {
        "decoder": lambda: Decoder(**dd),
        "post_quant_conv": lambda: nn.Conv2d(cfg.embed_dim, z, 1),
        "quantize": quantizer,
        "encoder": lambda: Encoder(**dd),
        "quant_conv": lambda: nn.Conv2d(z, cfg.embed_dim, 1),
    }
    place = torch.device(device) if device else contextlib.nullcontext()
    # taming's Decoder prints the latent shape when built: keep stdout for the user's output.
    with place, contextlib.redirect_stdout(io.StringIO()):
        try:
            return {p: makers[p]() for p in parts}
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
            raise ConfigError(f"{cfg.source}: invalid VQGAN ddconfig {dd} ({type(e).__name__}: {e}): "
                              "fix the config or pass the one that came with the checkpoint") from None


def expected_shapes(cfg: TamingConfig) -> dict[str, tuple]:
    """Every key the checkpoint must hold for ``cfg`` (all five parts) and its shape."""
    return {f"{p}.{k}": tuple(v.shape) for p, m in build_parts(cfg, device="meta").items()
            for k, v in m.state_dict().items()}


def autoencoder_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The autoencoder's tensors of a checkpoint: keys under ``prefix`` (stripped), without
    the training loss; a Net2Net's transformer and conditioning stage lie outside the prefix."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix):]: state[k] for k in keys if not k[len(prefix):].startswith(IGNORED_PREFIXES)}


def check_keys(state: dict, expected: dict, checkpoint, config) -> None:
    """Refuse a checkpoint that does not hold exactly the architecture's tensors (strict,
    unlike taming's ``init_from_ckpt``, which silently skips whatever does not match)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k} {list(state[k].shape)} vs {list(expected[k])}" for k in sorted(set(state) & set(expected))
                if tuple(state[k].shape) != expected[k]]
    problems = [_listing(n, what) for n, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                   (reshaped, "of another shape (checkpoint vs config)")) if n]
    if problems:
        raise WeightsError(f"checkpoint {checkpoint} does not fit config {config}: {'; '.join(problems)}: "
                           "pass the config that came with this checkpoint (a wrong config/checkpoint pair?)")


def _listing(keys: list, what: str, shown: int = 3) -> str:
    more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {what} key(s) ({', '.join(keys[:shown])}{more})"


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a (Lightning) ``.ckpt``, refusing any code in the pickle."""
    if not path.is_file():
        raise WeightsError(f"VQGAN checkpoint {path} does not exist: put it beside its config "
                           "(same name, .ckpt) or pass CONFIG.yaml:CHECKPOINT.ckpt")
    if path.suffix == ".safetensors":
        return safeload.load_safetensors(path)
    # mmap: the optimizer states and loss weights in a 1 GB checkpoint are never read.
    return safeload.load_checkpoint_tensors(path, inert=safeload.LIGHTNING_BOOKKEEPING, mmap=True)


def load_parts(cfg: TamingConfig, parts, state: dict, device) -> dict[str, nn.Module]:
    """Frozen (eval, no parameter gradients) modules with their weights from ``state`` (keys checked)."""
    modules = build_parts(cfg, parts, device="meta")
    for name, module in modules.items():
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        module.load_state_dict(sub, strict=True, assign=True)  # assign: no second copy of the weights
        modules[name] = module.float().eval().requires_grad_(False).to(device)
    return modules


@dataclass(eq=False)
class VQGANDecoder:
    """A taming VQGAN's decoding half (docs/methods.md §3, §4).

    ``decode`` looks code weights [B, V, h, w] (one-hot or soft) up in the codebook and
    decodes them (codebook sampling); ``decode_z`` decodes latents [B, e_dim, h, w]
    (z+quantize).  Pixels are (x + 1) / 2, unclamped: the loop clamps.
    """

    config: TamingConfig
    decoder: nn.Module
    post_quant_conv: nn.Module
    quantize: nn.Module
    name: str
    sha256: str | None = None
    encoder_state: dict = field(default_factory=dict, repr=False)  # encoder.* / quant_conv.* until encode()
    _encoder: dict | None = field(default=None, repr=False)

    @classmethod
    def from_state(cls, cfg: TamingConfig, state: dict, *, name: str, sha256=None, device="cpu", source=None):
        """Check ``state`` (the autoencoder's keys) against ``cfg`` strictly and build the decoder."""
        check_keys(state, expected_shapes(cfg), source or "(in memory)", cfg.source or "(in memory)")
        encoder_state = {k: v for k, v in state.items() if k.split(".", 1)[0] in ENCODE_PARTS}
        return cls(cfg, **load_parts(cfg, DECODE_PARTS, state, device), name=name, sha256=sha256,
                   encoder_state=encoder_state)

    @property
    def vocab_size(self) -> int:
        return self.config.n_embed

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ddconfig["ch_mult"]) - 1)

    @property
    def e_dim(self) -> int:
        return self.config.embed_dim

    @property
    def codebook(self) -> torch.Tensor:
        """[V, e_dim]: GumbelQuantize keeps it in ``embed``, VectorQuantizer2 in ``embedding``."""
        table = self.quantize.embed if self.config.quantizer == "gumbel" else self.quantize.embedding
        return table.weight

    def decode(self, codes: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, V, h, w] -> pixels [B, 3, fh, fw]: code weights @ codebook, then ``decode_z``."""
        if noise is not None:
            raise ConfigError("--noise-scale samples the dVAE's Laplace pixel noise; a VQGAN decodes "
                              "deterministically: use --noise-scale 0")
        return self.decode_z(torch.einsum("bvhw,vd->bdhw", codes.to(self.codebook.dtype), self.codebook))

    def decode_z(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, e_dim, h, w] -> pixels [B, 3, fh, fw] on the [0, 1] scale (fp32), unclamped."""
        x = self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype))
        return (self.decoder(x).float() + 1) / 2

    def cast(self, dtype: torch.dtype) -> "VQGANDecoder":
        """A copy whose decoder computes in ``dtype`` (``--precision bf16``); the codebook and the
        nearest-code search stay fp32, so quantisation picks the same codes."""
        if dtype == self.post_quant_conv.weight.dtype:
            return self
        return dataclasses.replace(self, decoder=cast_copy(self.decoder, dtype),
                                   post_quant_conv=cast_copy(self.post_quant_conv, dtype))

    def quantize_z(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code vector at each position, straight-through (docs/methods.md §4)."""
        return vector_quantize(z, self.codebook)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> quantized z [B, e_dim, H/f, W/f] (for init images).

        The encoder is loaded on first use.  For a Gumbel VQGAN the code is the argmax of its
        logits: GumbelQuantize would add Gumbel noise from the global RNG even in eval mode.
        """
        if self._encoder is None:
            self._encoder = load_parts(self.config, ENCODE_PARTS, self.encoder_state, self.codebook.device)
        h = self._encoder["quant_conv"](self._encoder["encoder"](images.to(self.codebook) * 2 - 1))
        if self.config.quantizer == "gumbel":
            return self.codebook[self.quantize.proj(h).argmax(1)].movedim(-1, 1)
        return self.quantize_z(h)

    def modules(self) -> dict[str, nn.Module]:
        return {"decoder": self.decoder, "post_quant_conv": self.post_quant_conv, "quantize": self.quantize,
                **(self._encoder or {})}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All weights under the module keys of clipguide's ``.safetensors`` format."""
        out = {f"{p}.{k}": v for p, m in self.modules().items() for k, v in m.state_dict().items()}
        return {**self.encoder_state, **out}

    def to(self, device) -> "VQGANDecoder":
        for module in self.modules().values():
            module.to(device)
        return self

    def blacklisted_codes(self) -> list[int]:
        return []  # Crowson's blacklist names OpenAI dVAE codes; a VQGAN's codes are others

    def describe(self, encoder: bool = False) -> dict:
        """What identifies the decoder in a run's record; its encoder is in the same file (``encoder`` changes nothing)."""
        quantizer = {"vq": "VectorQuantizer2", "gumbel": "GumbelQuantize"}[self.config.quantizer]
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "downsample": self.downsample,
                "architecture": f"taming VQGAN ({quantizer}, e_dim {self.e_dim})"}


def load_taming(config_path, checkpoint_path=None, *, name: str | None = None, device="cpu") -> VQGANDecoder:
    """A VQGAN from a taming ``.yaml`` and its checkpoint (default: the ``.ckpt`` beside it)."""
    config_path = Path(config_path).expanduser()
    ckpt = Path(checkpoint_path).expanduser() if checkpoint_path else config_path.with_suffix(".ckpt")
    return _from_files(read_yaml_config(config_path), ckpt, name or config_path.stem, device)


def load_json(json_path, device="cpu") -> VQGANDecoder:
    """A VQGAN in clipguide's format: ``<name>.json`` + ``<name>.safetensors``."""
    json_path = Path(json_path)
    return _from_files(read_json_config(json_path), json_path.with_suffix(".safetensors"), json_path.stem, device)


def _from_files(cfg: TamingConfig, ckpt: Path, name: str, device) -> VQGANDecoder:
    state = autoencoder_tensors(read_tensors(ckpt), cfg.prefix)
    return VQGANDecoder.from_state(cfg, state, name=name, sha256=weights.sha256_file(ckpt), device=device, source=ckpt)


def write_json(decoder: VQGANDecoder, json_path, **meta) -> Path:
    """Save ``decoder`` in clipguide's format (``.json`` + ``.safetensors``): a one-off
    conversion of a Lightning checkpoint into a file that needs no unpickling at all."""
    from safetensors.torch import save_file

    if decoder.config.quantizer != "vq":
        raise ConfigError("clipguide's VQGAN .json format holds VectorQuantizer2 models; keep the Gumbel .yaml/.ckpt")
    json_path = Path(json_path)
    c = decoder.config
    json_path.write_text(json.dumps({"kind": "taming", "ddconfig": c.ddconfig, "n_embed": c.n_embed,
                                     "embed_dim": c.embed_dim, **meta}, indent=1) + "\n")
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, json_path.with_suffix(".safetensors"))
    return json_path
