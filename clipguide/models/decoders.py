"""The decoder registry and loader: names and files -> decoders.

A decoder implements :class:`clipguide.engine.interfaces.Decoder`: code weights ``[B, V, h, w]``
(one-hot or soft) in, pixels ``[B, 3, h·f, w·f]`` on the [0, 1] scale out, *unclamped* (the loop
clamps).  The adapters hold only inference modules, no Lightning and no training losses: the DALL-E
dVAE (:mod:`clipguide.models.dalle`) and taming's VQGAN (:mod:`clipguide.models.vqgan`).  Which
loader reads what is data: :data:`REGISTRY_FORMATS` for the registry's entries, :data:`FILE_FORMATS`
for files, :data:`JSON_KINDS` for clipguide's own model ``.json`` files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, WeightsError
from ..paths import PACKAGE_DIR
from . import dalle_files, vqgan, weights
from .dalle import DalleDecoder

VQGAN_CACHE = "vqgan"  # cache subdirectory of the taming files, saved as <registry name>.yaml / .ckpt


def _taming(about: str, config_url: str, checkpoint_url: str, config_sha256=None, checkpoint_sha256=None) -> dict:
    """A registry entry for a taming .yaml + .ckpt pair.  sha256 None: no published digest;
    the one seen on first download is recorded beside the file and enforced from then on."""
    return {"format": "taming", "kind": "vqgan", "about": about, "files": {
        "config": {"url": config_url, "sha256": config_sha256},
        "checkpoint": {"url": checkpoint_url, "sha256": checkpoint_sha256}}}


# Registry of named decoders: data, not code paths.
DECODERS = {
    "dalle": {"format": "dall_e-pickle", "kind": "dvae", "about": "OpenAI DALL-E dVAE (8192 codes, f=8), downloaded from cdn.openai.com"},
    "shapes-dvae": {"format": "json", "kind": "dvae", "path": "shapes/models/shapes-dvae.json", "about": "shapes-world dVAE (dall_e architecture), shipped"},
    "shapes-vqgan": {"format": "json", "kind": "vqgan", "path": "shapes/models/shapes-vqgan.json", "about": "shapes-world VQGAN (taming architecture), shipped"},
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


def resolve_shipped(rel: str) -> Path:
    return PACKAGE_DIR / rel


def load_decoder(spec: str, device: str = "cpu"):
    """A decoder from a registry name (``dalle``, ``shapes-dvae``, ``vqgan-imagenet-f16-16384``, ...)
    or a file: ``decoder.pkl`` as published by OpenAI (for --init-image, ``encoder.pkl`` beside it), a
    model ``.json`` + ``.safetensors``, a taming ``CONFIG.yaml`` (checkpoint: ``CONFIG.ckpt`` beside it)
    or ``CONFIG.yaml:CHECKPOINT.ckpt``."""
    entry = DECODERS.get(spec)
    if entry is not None:
        return REGISTRY_FORMATS[entry["format"]].load(spec, entry, device)
    for pattern, load in FILE_FORMATS:
        if re.fullmatch(pattern, spec):
            return load(spec, device)
    known = ", ".join(DECODERS)
    raise ConfigError(f"unknown decoder {spec!r}: use one of {known}, a decoder.pkl, a model .json file, "
                      "a taming CONFIG.yaml (with CONFIG.ckpt beside it) or CONFIG.yaml:CHECKPOINT.ckpt")


def local_files(name: str) -> list[Path]:
    """The files registry decoder ``name`` is loaded from on this machine (shipped, or cached once fetched)."""
    entry = DECODERS[name]
    return REGISTRY_FORMATS[entry["format"]].files(name, entry)


def taming_paths(spec: str) -> tuple[Path, Path] | None:
    """(config, checkpoint) of a ``CONFIG.yaml`` spec (checkpoint: the same name with ``.ckpt``)
    or a ``CONFIG.yaml:CHECKPOINT`` spec; None for anything else."""
    m = re.fullmatch(TAMING_SPEC, spec)
    if m is None:
        return None
    config = Path(m[1]).expanduser()
    return config, Path(m[2]).expanduser() if m[2] else config.with_suffix(".ckpt")


def taming_cache_paths(name: str) -> tuple[Path, Path]:
    """Where the config and checkpoint of registry entry ``name`` are cached."""
    folder = weights.cache_dir() / VQGAN_CACHE
    return folder / f"{name}.yaml", folder / f"{name}.ckpt"


def _load_registry_vqgan(name: str, entry: dict, device: str):
    """Fetch (or find in the cache) a registry VQGAN's two files and load them."""
    files = entry["files"]
    config, checkpoint = (weights.fetch(files[kind]["url"], subdir=VQGAN_CACHE, filename=cached.name,
                                        sha256=files[kind]["sha256"])
                          for kind, cached in zip(("config", "checkpoint"), taming_cache_paths(name)))
    return vqgan.load_taming(config, checkpoint, name=name, device=device)


def _load_registry_dalle(name: str, entry: dict, device: str) -> DalleDecoder:
    """OpenAI's decoder.pkl, fetched into the cache; its encoder.pkl is fetched by the first encode only."""
    module, sha = dalle_files.load_dalle_decoder(None, device)
    return DalleDecoder(module, name=name, sha256=sha, encoder_source=weights.DALLE_FILES["encoder"]["url"])


def _load_dalle_pickle(spec: str, device: str) -> DalleDecoder:
    """A local decoder.pkl; the encoder (for --init-image only) is the encoder.pkl in the same folder."""
    path = Path(spec).expanduser()
    module, sha = dalle_files.load_dalle_decoder(path, device)
    return DalleDecoder(module, name=path.name, sha256=sha, encoder_source=path.with_name("encoder.pkl"))


def _load_json_decoder(spec: str | Path, device: str):
    """A model .json (its weights in the sibling .safetensors), by the ``kind`` it declares."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WeightsError(f"decoder config {path} does not exist: check the path (shipped models: clipguide train-shapes rebuilds them)")
    info = dalle_files._read_json(path)
    kind = info.get("kind") if isinstance(info, dict) else None
    if kind not in JSON_KINDS:
        raise ConfigError(f"decoder config {path} has kind {kind!r}; supported here: {', '.join(JSON_KINDS)}")
    return JSON_KINDS[kind](path, device)


def _dalle_from_json(path: Path, device: str) -> DalleDecoder:
    encoder, module, sha = dalle_files.load_dalle_safetensors(path)
    return DalleDecoder(module, name=path.stem, sha256=sha, encoder=encoder).to(device)


@dataclass(frozen=True)
class RegistryFormat:
    """How registry entries of one format are loaded, and which local files they need."""

    load: Callable  # (name, entry, device) -> decoder
    files: Callable  # (name, entry) -> [Path]


TAMING_SPEC = r"(.+\.ya?ml)(?::(.+))?"  # CONFIG.yaml or CONFIG.yaml:CHECKPOINT
REGISTRY_FORMATS = {
    "json": RegistryFormat(lambda name, entry, device: _load_json_decoder(resolve_shipped(entry["path"]), device),
                           lambda name, entry: [resolve_shipped(entry["path"]),
                                                resolve_shipped(entry["path"]).with_suffix(".safetensors")]),
    "taming": RegistryFormat(_load_registry_vqgan, lambda name, entry: list(taming_cache_paths(name))),
    "dall_e-pickle": RegistryFormat(_load_registry_dalle, lambda name, entry: [
        weights.cache_dir() / "dalle" / Path(weights.DALLE_FILES["decoder"]["url"]).name]),
}
JSON_KINDS = {"dall_e": _dalle_from_json, "taming": lambda path, device: vqgan.load_json(path, device)}
FILE_FORMATS = (  # spec pattern -> loader(spec, device), tried in order after the registry
    (r".+\.pkl", _load_dalle_pickle),
    (r".+\.json", _load_json_decoder),
    (TAMING_SPEC, lambda spec, device: vqgan.load_taming(*taming_paths(spec), device=device)),
)
