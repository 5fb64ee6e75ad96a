"""Loading OpenAI's DALL-E dVAE (Ramesh et al. 2021) from its published files.

``decoder.pkl`` / ``encoder.pkl`` are whole ``dall_e`` modules pickled with torch 1.7.
Three things go wrong when they are loaded naively on a current torch (docs/methods.md §7):

* ``dall_e.load_model`` is a bare ``torch.load``: arbitrary code execution for an
  untrusted file, and an UnpicklingError under torch >= 2.6 (``weights_only=True``).
  Here the pickle may only name the dall_e classes and a few torch building blocks.
* their ``nn.Upsample`` modules predate ``recompute_scale_factor`` (torch 1.11), so
  forward raises AttributeError; the missing attribute is restored.
* dall_e's ``requires_grad=False`` field does not freeze anything (its weights are
  ``nn.Parameter`` objects, trainable by default): weight gradients would cost ~50% more
  FLOPs per step, so modules are frozen with ``requires_grad_(False)`` and ``eval()``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dall_e.decoder import Decoder, DecoderBlock
from dall_e.encoder import Encoder, EncoderBlock
from dall_e.utils import Conv2d
from torch import nn

from ..errors import ConfigError, WeightsError
from . import safeload, weights

# Everything a dall_e pickle may name besides safeload.TENSOR_GLOBALS.  Encoder and
# decoder classes are both admitted so a swapped file gets the clear "wrong class" error.
DALLE_CLASSES = (
    Decoder, DecoderBlock, Encoder, EncoderBlock, Conv2d,
    nn.Sequential, nn.ReLU, nn.Identity, nn.Upsample, nn.MaxPool2d,
)


def load_dalle_decoder(path: str | Path | None = None, device="cpu") -> tuple[Decoder, str]:
    """OpenAI's dVAE decoder (frozen, eval) and the sha256 of its file.

    ``path`` None fetches ``decoder.pkl`` from cdn.openai.com into the cache.
    """
    return _load_pickled("decoder", Decoder, path, device)


def load_dalle_encoder(path: str | Path | None = None, device="cpu") -> tuple[Encoder, str]:
    """OpenAI's dVAE encoder (frozen, eval) and the sha256 of its file."""
    return _load_pickled("encoder", Encoder, path, device)


def load_dalle_safetensors(json_path: str | Path, device="cpu") -> tuple[Encoder, Decoder, str]:
    """A dall_e encoder/decoder pair stored as ``<name>.json`` (constructor kwargs under
    ``"encoder"``/``"decoder"``) + ``<name>.safetensors`` (keys ``encoder.*``/``decoder.*``).

    Returns (encoder, decoder, sha256 of the .safetensors file).
    """
    json_path = Path(json_path)
    cfg = _read_json(json_path)
    if cfg.get("kind") != "dall_e":
        raise ConfigError(f"{json_path} has kind {cfg.get('kind')!r}, not 'dall_e': pass a dVAE model .json")
    tensors_path = json_path.with_suffix(".safetensors")
    if not tensors_path.is_file():
        raise WeightsError(f"{tensors_path} is missing (the weights of {json_path.name}): put it beside the .json")
    state = safeload.load_safetensors(tensors_path)
    encoder = _from_state(Encoder, cfg.get("encoder", {}), state, "encoder.", json_path)
    decoder = _from_state(Decoder, cfg.get("decoder", {}), state, "decoder.", json_path)
    return freeze(encoder).to(device), freeze(decoder).to(device), weights.sha256_file(tensors_path)


def freeze(module: nn.Module) -> nn.Module:
    """Inference mode: no parameter gradients (gradients still flow to the inputs)."""
    return module.eval().requires_grad_(False)


def repair_upsample(module: nn.Module) -> nn.Module:
    """Give ``nn.Upsample`` modules pickled by torch < 1.11 their missing
    ``recompute_scale_factor`` (None, the default), which forward reads."""
    for m in module.modules():
        if isinstance(m, nn.Upsample) and "recompute_scale_factor" not in m.__dict__:
            m.recompute_scale_factor = None
    return module


def fetch_dalle_file(kind: str, url: str | None = None) -> Path:
    """The cached copy of OpenAI's ``kind``.pkl ("decoder" or "encoder"), downloaded from ``url``
    (default: the registry's) on first use; its sha256 is recorded then and checked on every use."""
    entry = weights.DALLE_FILES[kind]
    return weights.fetch(url or entry["url"], subdir="dalle", sha256=entry["sha256"])


def _load_pickled(kind: str, cls: type, path, device) -> tuple[nn.Module, str]:
    if path is None:
        path = fetch_dalle_file(kind)
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"dVAE {kind} file {path} does not exist: check the path, or omit it to download {kind}.pkl")
    module = safeload.load_pickle_module(path, DALLE_CLASSES, map_location=device)
    if not isinstance(module, cls):
        raise WeightsError(
            f"{path} holds a {type(module).__name__}, not a dall_e {cls.__name__}: pass OpenAI's {kind}.pkl"
        )
    return freeze(repair_upsample(module)).to(device), weights.sha256_file(path)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"model config {path} does not exist: check the path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): fix or regenerate it") from None


def _from_state(cls: type, kwargs: dict, state: dict, prefix: str, source: Path) -> nn.Module:
    """Build ``cls(**kwargs)`` and load the ``prefix``-ed tensors into it, strictly."""
    # requires_grad=True crashes dall_e's init (in-place init of a leaf); device is a runtime choice.
    kwargs = {k: v for k, v in kwargs.items() if k not in ("requires_grad", "device")}
    try:
        module = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: invalid dall_e {cls.__name__} settings {kwargs} ({e})") from None
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        weights_file = source.with_suffix(".safetensors")
        raise WeightsError(f"{weights_file} does not fit the {cls.__name__} in {source.name}: {detail}") from None
    return module
