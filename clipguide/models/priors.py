"""The prior registry and loader: names and files -> token priors (:class:`~clipguide.engine.interfaces.TokenPrior`).

clipguide's own priors are a ``.json`` (architecture) + ``.safetensors`` (weights) pair, like its
decoders; taming-transformers' Net2Net transformers load from their ``CONFIG.yaml`` + checkpoint
(:mod:`clipguide.models.net2net`).  Which loader reads what is data: :data:`FILE_FORMATS`.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file

from ..errors import ConfigError, WeightsError
from ..paths import PACKAGE_DIR
from .dalle_files import _read_json
from .net2net import load_net2net_prior
from .prior import GridPrior, TokenGPT, config_of
from .vqgan import check_keys
from .weights import sha256_file

PRIORS = {  # registry: name -> the shipped model, and the decoder whose codes it models
    "shapes-prior": {"path": "shapes/models/shapes-prior.json", "decoder": "shapes-dvae",
                     "about": "shapes-world token prior (autoregressive transformer over shapes-dvae's 16x16 codes), shipped"},
}


def load_prior(spec: str, device: str = "cpu"):
    """A token prior from a registry name (``shapes-prior``) or a file: a prior ``.json`` (weights in the
    sibling ``.safetensors``) or a taming Net2Net ``CONFIG.yaml`` (checkpoint ``CONFIG.ckpt`` beside it,
    or ``CONFIG.yaml:CHECKPOINT.ckpt``; a class-conditional one with ``#CLASS`` after it)."""
    if spec in PRIORS:
        return load_json_prior(PACKAGE_DIR / PRIORS[spec]["path"], device, name=spec)
    for pattern, load in FILE_FORMATS:
        if re.fullmatch(pattern, spec):
            return load(spec, device)
    raise ConfigError(f"unknown prior {spec!r}: use one of {', '.join(PRIORS)}, a prior .json file or a taming "
                      "Net2Net CONFIG.yaml (with CONFIG.ckpt beside it) or CONFIG.yaml:CHECKPOINT.ckpt")


def load_json_prior(path: str | Path, device: str = "cpu", name: str | None = None) -> GridPrior:
    """clipguide's prior format: ``NAME.json`` ({"kind": "token_gpt", "config": {...}}) + ``NAME.safetensors``."""
    path = Path(path).expanduser()
    meta = _read_json(path)
    if not isinstance(meta, dict) or meta.get("kind") != "token_gpt":
        raise ConfigError(f"{path} is not a token prior (kind {meta.get('kind') if isinstance(meta, dict) else None!r}, "
                          "not 'token_gpt'): pass a prior .json")
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise WeightsError(f"{weights} is missing (the weights of {path.name}): put it beside the .json"
                           + (" or rebuild it with `clipguide train-shapes --only prior,priorft`" if name == "shapes-prior" else ""))
    model = TokenGPT(config_of(meta))
    state = load_file(str(weights))
    check_keys(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, weights, path)
    model.load_state_dict(state, strict=True)
    return GridPrior(model, name or path.stem, sha256_file(weights)).to(device)


def _load_net2net(spec: str, device: str):
    """``CONFIG.yaml[:CHECKPOINT.ckpt][#CLASS]``: a class-conditional transformer takes its class after ``#``."""
    path, _, label = spec.partition("#")
    return load_net2net_prior(path, device=device, class_label=int(label) if label else None)


FILE_FORMATS = (  # spec pattern -> loader(spec, device), tried in order after the registry
    (r".+\.json", load_json_prior),
    (r".+\.ya?ml(?::.+)?(?:#\d+)?", _load_net2net),
)
