"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision") through open_clip, reduced to what CLIP guidance needs.

:func:`load_clip` accepts

* ``NAME/TAG``: an open_clip architecture and pretrained tag (``ViT-B-32/openai``,
  ``ViT-B-16/laion2b_s34b_b88k``; ``clipguide models`` lists them), cached under
  ``cache_dir()/open_clip``;
* ``NAME/PATH``: the architecture with weights from a local ``.pt``/``.bin``/``.safetensors``
  file (for OpenAI-trained weights name the ``-quickgelu`` variant, e.g. ``ViT-B-32-quickgelu``);
* ``PATH.json``: an architecture of our own (``{"kind": "open_clip", "model_cfg": {...},
  "mean": [...], "std": [...]}``) with weights in the sibling ``.safetensors``;
* ``shapes``: the shipped shapes-world CLIP;
* ``SPEC+SPEC[+...]``: several of the above guiding together (:class:`ClipEnsemble`).

OpenAI's CLIPs were trained with QuickGELU, x·sigmoid(1.702x).  open_clip 3.x records that
on the pretrained tag but ``create_model(name, pretrained="openai")`` only *warns* when the
architecture uses nn.GELU, so the tag's flag is applied here explicitly.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors import SafetensorError
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..engine.ops import cast_copy
from ..errors import ConfigError, WeightsError
from ..paths import SHAPES_MODELS
from . import safeload, weights

SHAPES_CLIP = SHAPES_MODELS / "shapes-clip.json"
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class ClipSpec:
    """A parsed CLIP spec: the architecture and where its weights come from."""

    spec: str
    model_name: str
    tag: str | None = None  # open_clip pretrained tag (downloaded into the cache)
    path: Path | None = None  # local weights file
    model_cfg: dict | None = None  # architecture of our own (None: open_clip built-in `model_name`)
    quick_gelu: bool = False  # force QuickGELU (the tag was trained with it)
    mean: tuple = OPENAI_DATASET_MEAN
    std: tuple = OPENAI_DATASET_STD

    @property
    def architecture(self) -> dict:
        return self.model_cfg if self.model_cfg is not None else open_clip.get_model_config(self.model_name)


class Clip:
    """A frozen open_clip model with cached text embeddings and a differentiable image path."""

    def __init__(self, model: torch.nn.Module, tokenizer, *, name: str, embed_dim: int,
                 mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD,
                 sha256: str | None = None, device="cpu"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name, self.sha256, self.embed_dim = name, sha256, embed_dim
        self.image_size = _square(model.visual.image_size, name)
        # Built once: encode_image runs thousands of times per generation.
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.visual = model.visual  # the image tower; cast() swaps in a copy of another precision
        self._casts: dict[torch.dtype, Clip] = {}
        self.to(device)

    def to(self, device) -> "Clip":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.visual.to(self.device)
        self._casts.clear()
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        self._text_cache = {k: v.to(self.device) for k, v in self._text_cache.items()}
        return self

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [N, D] (float32, not normalised); each string is encoded once, on its
        own: in a batch, its last bits would depend on which other texts shared the batch."""
        with torch.no_grad():
            for text in dict.fromkeys(texts):
                if text not in self._text_cache:
                    tokens = self.tokenizer([text]).to(self.device)
                    self._text_cache[text] = self.model.encode_text(tokens).float()[0]
        if not texts:
            return torch.empty(0, self.embed_dim, device=self.device)
        return torch.stack([self._text_cache[t] for t in texts])

    def forget_texts(self) -> None:
        """Drop the cached text embeddings (after the text tower's weights changed, e.g. in training)."""
        self._text_cache.clear()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings [N, D] (float32, not normalised) of [N, 3, h, w] images in [0, 1],
        differentiable w.r.t. ``images``; other sizes are resized (bicubic, no antialias:
        cheap, and cutouts already arrive at the input size)."""
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=False)
        x = ((images - self.mean) / self.std).to(self.dtype)
        with _attention_backend(x.device):
            return self.visual(x).float()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def cast(self, dtype: torch.dtype, in_place: bool = False) -> "Clip":
        """This CLIP with its image tower computing in ``dtype`` (inputs are cast in, embeddings come
        out fp32; the text tower and its embeddings stay as they are): the ``--precision bf16`` fast
        path.  A copy, built once; ``in_place`` swaps the tower instead, freeing the old one."""
        if dtype == self.dtype:
            return self
        if in_place:
            self.visual = self.model.visual = fast_visual(cast_copy(self.visual, dtype))
            self._casts.clear()
            return self
        if dtype not in self._casts:
            fast = copy.copy(self)
            fast.visual, fast._casts = fast_visual(cast_copy(self.visual, dtype)), {}
            self._casts[dtype] = fast
        return self._casts[dtype]


class PatchEmbedding(torch.nn.Module):
    """A ViT's patch embedding (a convolution with stride = kernel, no padding) as one matmul:
    the same arithmetic, but its input gradient in bf16 is several times faster on CPU than
    oneDNN's strided-convolution backward."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.patch = conv.kernel_size[0]
        self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1), requires_grad=False)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, gh, gw = self.patch, h // self.patch, w // self.patch
        patches = x.reshape(n, c, gh, k, gw, k).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * k * k)
        y = F.linear(patches, self.weight, self.bias)
        return y.transpose(1, 2).reshape(n, -1, gh, gw)


def fast_visual(visual: torch.nn.Module) -> torch.nn.Module:
    """Swap a ViT's patch convolution for :class:`PatchEmbedding` where it fits (other towers unchanged)."""
    conv = getattr(visual, "conv1", None)
    if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.padding == (0, 0)
            and conv.kernel_size[0] == conv.kernel_size[1] and conv.groups == 1):
        visual.conv1 = PatchEmbedding(conv)
    return visual


def _attention_backend(device: torch.device):
    """On CPU, the plain-math attention kernel: for CLIP's short sequences (50 tokens for ViT-B/32)
    its backward is much faster than the flash kernel's."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


ENSEMBLE_SEP = "+"


class ClipEnsemble:
    """Several CLIPs guiding as one, each in its own embedding space.

    Embeddings are the members' unit embeddings concatenated and scaled by 1/sqrt(k), so the
    cosine of an image with a text is the mean of the members' cosines, and every loss and score
    built on cosines works unchanged.  The 2021 notebooks' successors guided with several CLIPs at
    once (Disco Diffusion: ViT-B/32 + ViT-B/16 + RN50): an image that fools one model's sense of
    shape is less likely to fool the others'."""

    def __init__(self, members: Sequence[Clip]):
        self.members = list(members)
        self.name = ENSEMBLE_SEP.join(m.name for m in self.members)
        self.sha256 = ENSEMBLE_SEP.join(str(m.sha256) for m in self.members)
        self.embed_dim = sum(m.embed_dim for m in self.members)
        self.image_size = max(m.image_size for m in self.members)  # smaller members resize down
        self.device = self.members[0].device
        self._scale = 1 / math.sqrt(len(self.members))

    def _join(self, embeddings) -> torch.Tensor:
        return torch.cat([F.normalize(e, dim=-1) for e in embeddings], dim=-1) * self._scale

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._join([m.encode_text(texts) for m in self.members])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self._join([m.encode_image(images) for m in self.members])

    def forget_texts(self) -> None:
        for m in self.members:
            m.forget_texts()

    def to(self, device) -> "ClipEnsemble":
        self.members = [m.to(device) for m in self.members]
        self.device = torch.device(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.members[0].dtype

    def cast(self, dtype: torch.dtype, in_place: bool = False) -> "ClipEnsemble":
        """The members cast as :meth:`Clip.cast` casts one (a copy unless ``in_place``)."""
        if all(m.dtype == dtype for m in self.members):
            return self
        cast = [m.cast(dtype, in_place) for m in self.members]
        if in_place:
            self.members = cast
            return self
        return ClipEnsemble(cast)


def load_clip(spec: str, device="cpu") -> Clip | ClipEnsemble:
    """A frozen :class:`Clip` from a spec (see the module docstring); ``A+B`` gives a
    :class:`ClipEnsemble` of the two (a local path that contains ``+`` is read as one path)."""
    parts = spec.split(ENSEMBLE_SEP)
    if len(parts) > 1 and not Path(spec).expanduser().exists():
        if not all(p.strip() for p in parts):
            raise ConfigError(f"CLIP spec {spec!r} has an empty member: join specs with one '+', e.g. shapes+ViT-B-32/openai")
        return ClipEnsemble([load_clip(p.strip(), device) for p in parts])
    parsed = parse_clip_spec(spec)
    path = parsed.path or pretrained_weights(parsed)
    if path.suffix != ".safetensors":
        # The allow-list check names any code-carrying global before open_clip's torch.load
        # sees the file (mmap: tensors are not read).
        safeload.load_checkpoint_tensors(path, mmap=True)
    model = build_clip_model(parsed, path)
    arch = parsed.architecture
    return Clip(model, _tokenizer(parsed), name=parsed.spec, embed_dim=arch["embed_dim"], mean=parsed.mean,
                std=parsed.std, sha256=weights.sha256_file(path), device=device)


def parse_clip_spec(spec: str) -> ClipSpec:
    """Resolve a spec to a :class:`ClipSpec` without loading weights (names and tags are checked)."""
    if spec == "shapes":
        return _config_spec(SHAPES_CLIP, spec)
    if spec.endswith(".json"):
        return _config_spec(Path(spec).expanduser(), spec)
    name, _, rest = spec.partition("/")
    _check_model_name(name)
    if not rest:
        raise ConfigError(f"CLIP spec {spec!r} names no weights: use {name}/TAG ({_tags_hint(name)}) or {name}/PATH")
    if "/" in rest or rest.endswith(_WEIGHT_SUFFIXES) or Path(rest).is_file():
        path = Path(rest).expanduser()
        if not path.is_file():
            raise WeightsError(f"CLIP weights file {path} does not exist: check the path in {spec!r}")
        return ClipSpec(spec, name, path=path)
    tag = _check_tag(name, rest)
    pretrained = open_clip.get_pretrained_cfg(name, tag)
    return ClipSpec(spec, name, tag=tag, quick_gelu=bool(pretrained.get("quick_gelu")),
                    mean=tuple(pretrained.get("mean", OPENAI_DATASET_MEAN)),
                    std=tuple(pretrained.get("std", OPENAI_DATASET_STD)))


def build_clip_model(spec: ClipSpec, weights_path: Path | None = None) -> torch.nn.Module:
    """The open_clip model for ``spec`` (QuickGELU where the tag needs it), with the weights
    of ``weights_path`` loaded strictly, or random init when it is None."""
    try:
        if spec.model_cfg is None:
            vision_cfg = custom_attention(open_clip.get_model_config(spec.model_name))["vision_cfg"]
            return open_clip.create_model(spec.model_name, pretrained=str(weights_path) if weights_path else None,
                                          force_quick_gelu=spec.quick_gelu, vision_cfg=vision_cfg)
        cfg = custom_attention(spec.model_cfg)
        model = (open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP)(**cfg)
        if weights_path:
            open_clip.load_checkpoint(model, str(weights_path), strict=True)
        return model
    except SafetensorError as e:
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"{weights_path} is not a readable .safetensors file ({detail}): fetch it again or check the path") from None
    except (RuntimeError, KeyError, ValueError) as e:
        if weights_path is None:
            raise
        detail = " ".join(str(e).split())[:300]
        raise WeightsError(f"{weights_path} does not fit CLIP architecture {spec.model_name}: {detail}") from None


def custom_attention(model_cfg: dict) -> dict:
    """``model_cfg`` with open_clip's own attention blocks in the image tower (same weights and
    keys as nn.MultiheadAttention): MultiheadAttention's batch-first path projects a transposed,
    non-contiguous input, which costs a copy of the projection weight per token in the backward."""
    vision = model_cfg.get("vision_cfg")
    if not isinstance(vision, dict) or vision.get("block_type") or vision.get("timm_model_name"):
        return dict(model_cfg)
    return {**model_cfg, "vision_cfg": {**vision, "block_type": "custom"}}


def pretrained_weights(spec: ClipSpec) -> Path:
    """The cached weights file of an open_clip pretrained tag, downloaded if missing.

    Offline, open_clip's Hugging Face download retries for about a minute; the cache is
    looked up first and the server probed once, so a missing file fails in seconds.
    """
    pretrained = open_clip.get_pretrained_cfg(spec.model_name, spec.tag)
    cache = weights.cache_dir() / "open_clip"
    cached = _cached_pretrained(pretrained, cache)
    if cached is not None:
        return cached
    source = _download_source(pretrained)
    if not weights.is_reachable(source):
        raise WeightsError(
            f"CLIP weights {spec.model_name}/{spec.tag} are not in {cache} and {source} cannot be reached (offline?): "
            "run once on a connected machine with the same CLIPGUIDE_CACHE, "
            f"or pass {spec.model_name}/PATH to a local file"
        )
    try:
        return Path(open_clip.download_pretrained(pretrained, cache_dir=str(cache)))
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/HTTP errors
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(
            f"downloading CLIP weights {spec.model_name}/{spec.tag} into {cache} failed ({detail}): try again"
        ) from None


# Listed first by `clipguide models`, out of ~200 tags: the OpenAI CLIPs the 2021 notebooks guided with, then strong LAION ones.
RECOMMENDED_CLIPS: tuple[str, ...] = (
    "ViT-B-32/openai", "ViT-B-16/openai", "RN50/openai", "ViT-L-14/openai",
    "ViT-B-32/laion2b_s34b_b79k", "ViT-B-16/laion2b_s34b_b88k", "ViT-L-14/laion2b_s32b_b82k",
)


def list_clip_models() -> list[tuple[str, str]]:
    """(model, tag) pairs open_clip can download."""
    return [(name, tag) for name, tag in open_clip.list_pretrained()]


def _config_spec(path: Path, spec: str) -> ClipSpec:
    """A spec for an architecture of our own: ``path`` (.json) + sibling .safetensors."""
    if not path.is_file():
        hint = "rebuild it with `clipguide train-shapes`" if spec == "shapes" else "check the path"
        raise WeightsError(f"CLIP config {path} does not exist: {hint}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): fix or regenerate it") from None
    cfg = info.get("model_cfg")
    if info.get("kind") != "open_clip" or not isinstance(cfg, dict) or "embed_dim" not in cfg:
        raise ConfigError(
            f"{path} is not an open_clip model config (needs kind 'open_clip' and a model_cfg with embed_dim)"
        )
    tensors = path.with_suffix(".safetensors")
    if not tensors.is_file():
        raise WeightsError(f"{tensors} is missing (the weights of {path.name}): put it beside the .json")
    return ClipSpec(spec, info.get("model_name", path.stem), path=tensors, model_cfg=cfg,
                    quick_gelu=bool(cfg.get("quick_gelu")),
                    mean=tuple(info.get("mean", OPENAI_DATASET_MEAN)), std=tuple(info.get("std", OPENAI_DATASET_STD)))


def _check_model_name(name: str) -> None:
    names = open_clip.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        raise ConfigError(f"unknown CLIP model {name!r} (close matches: {', '.join(close) or 'none'}): "
                          "`clipguide models` lists the downloadable ones")


def _check_tag(name: str, tag: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name)
    clean = tag.lower().replace("-", "_")  # open_clip's own tag normalisation
    if clean not in tags:
        close = difflib.get_close_matches(clean, tags, n=5)
        raise ConfigError(
            f"unknown pretrained tag {tag!r} for CLIP {name} (close matches: {', '.join(close) or 'none'}; "
            f"{_tags_hint(name)}): `clipguide models` lists them, or give a weights file path"
        )
    return clean


def _tags_hint(name: str, shown: int = 5) -> str:
    tags = open_clip.list_pretrained_tags_by_model(name)
    more = f", ... {len(tags) - shown} more" if len(tags) > shown else ""
    return f"tags: {', '.join(tags[:shown])}{more}" if tags else "no downloadable tags"


def _tokenizer(spec: ClipSpec):
    if spec.model_cfg is None:
        return open_clip.get_tokenizer(spec.model_name)
    # Our own configs use CLIP's BPE vocabulary, possibly with a shorter context.
    return open_clip.SimpleTokenizer(context_length=spec.model_cfg["text_cfg"].get("context_length", 77))


def _square(size, name: str) -> int:
    h, w = (size, size) if isinstance(size, int) else size
    if h != w:
        raise ConfigError(f"CLIP {name} takes {h}x{w} images; only square inputs are supported")
    return int(h)


def _download_source(pretrained: dict) -> str:
    """The server open_clip will download this tag from (it prefers the HF hub)."""
    if pretrained.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        from huggingface_hub import constants

        return constants.ENDPOINT
    return pretrained.get("url", "")


def _cached_pretrained(pretrained: dict, cache: Path) -> Path | None:
    """The tag's weights if already cached; never touches the network."""
    if pretrained.get("hf_hub") and open_clip.pretrained.has_hf_hub():
        with _hf_offline():
            try:
                return Path(open_clip.download_pretrained(pretrained, cache_dir=str(cache)))
            except Exception:  # not cached: huggingface_hub's LocalEntryNotFoundError, wrapped by open_clip
                return None
    url_file = cache / os.path.basename(pretrained.get("url", ""))
    return url_file if pretrained.get("url") and url_file.is_file() else None


@contextlib.contextmanager
def _hf_offline():
    """Cache-only huggingface_hub lookups.  HF_HUB_OFFLINE is read from the environment once,
    at import, so the module constant its offline check reads is switched instead."""
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
