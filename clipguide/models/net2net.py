"""taming-transformers' Net2Net transformers (Esser et al. 2021) as token priors, without Lightning.

A ``Net2NetTransformer`` checkpoint holds a minGPT (``transformer.*``), the VQGAN whose codes it
models (``first_stage_model.*``) and a conditioning stage.  The GPT reads ``[c, z]``: the condition's
tokens ``c``, then the first stage's codes ``z`` in raster order; the logits for code ``i`` are its
output at position ``len(c) + i - 1``.  ``import taming.modules.transformer.mingpt`` fails on current
``transformers`` and ``taming.models`` needs an old PyTorch Lightning, so neither is imported: minGPT's
architecture is restated here (:class:`MinGPT`) with the same state-dict keys, and the checkpoint's
``transformer.*`` tensors are loaded into it strictly, through the restricted unpickler
(:func:`clipguide.models.vqgan.read_tensors`).  The config is read with ``yaml.safe_load``.

Supported: unconditional models (``cond_stage_config: __is_unconditional__`` or ``unconditional:
true``; ``c`` is ``sos_token``) and class-conditional ones (``cond_stage_key: class_label`` with
taming's ``Labelator``; ``c`` is the class index, chosen when loading), in raster order (the
``Identity`` permuter).  Refused with a one-line error: other permuters, and image-like conditions
(depth, segmentation, coordinates, a first stage as its own condition, bounding boxes), which a
prior that never sees an image cannot supply.

The grid is the first stage's ``resolution / 2**(len(ch_mult) - 1)`` square, unless the YAML states
it in a top-level ``grid: [h, w]`` (taming reads only ``model``, ``data`` and ``lightning``); the
vocabulary is the first stage's ``n_embed``.  Where the GPT's vocabulary is larger (its extra tokens
are conditions), the codes' logits are renormalised over the first stage's codes, so samples are
always codes the decoder has.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError
from . import vqgan, weights
from .decoders import taming_paths
from .prior import GPTConfig, GridPrior

PREFIX = "transformer."  # where the GPT's tensors live in a Net2Net checkpoint
SUPPORTED = ("unconditional (cond_stage_config: __is_unconditional__) and class-conditional "
             "(cond_stage_key: class_label, taming.modules.util.Labelator) Net2Net models")


@dataclass(frozen=True)
class MinGPTConfig:
    """``taming.modules.transformer.mingpt.GPT``'s arguments, with its defaults (dropout: training only)."""

    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    n_unmasked: int = 0


class Attention(nn.Module):
    """minGPT's ``CausalSelfAttention``: separate key/query/value projections, then ``proj``.  Its
    ``mask`` buffer is not kept: it is the causal mask (checked when loading), given as ``is_causal``."""

    def __init__(self, cfg: MinGPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.key, self.query, self.value, self.proj = (nn.Linear(cfg.n_embd, cfg.n_embd) for _ in range(4))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (f(x).view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for f in (self.query, self.key, self.value))
        if cache is not None:  # taming's forward_with_past: new positions see every cached one, unmasked
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        causal = cache is None or k.shape[2] == t  # the prefix of a cached run is masked like a full one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal and t > 1)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """minGPT's pre-norm block (``ln1``, ``attn``, ``ln2``, ``mlp.0``/``mlp.2`` around a GELU)."""

    def __init__(self, cfg: MinGPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class MinGPT(nn.Module):
    """minGPT as taming ships it, in eval mode: the state-dict keys of ``mingpt.GPT`` less the masks."""

    def __init__(self, cfg: MinGPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.blocks = nn.Sequential(*(Block(cfg) for _ in range(cfg.n_layer)))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """Embedded inputs (token + position) [n, T, d] -> logits [n, T, vocab]; ``caches`` as in
        :class:`clipguide.models.prior.TokenGPT`."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))


def causal_mask(cfg: MinGPTConfig) -> torch.Tensor:
    """The ``attn.mask`` buffer minGPT registers in every block: [1, 1, block_size, block_size]."""
    mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
    mask[:cfg.n_unmasked, :cfg.n_unmasked] = 1
    return mask.view(1, 1, cfg.block_size, cfg.block_size)


class CodeGPT(nn.Module):
    """A :class:`MinGPT` after a one-token condition, seen as a model of one grid's codes: the interface
    :class:`~clipguide.models.prior.GridPrior` drives (``cfg``, ``pos``, ``embed``, logits over the codes)."""

    def __init__(self, gpt: MinGPT, grid: GPTConfig, condition: int):
        super().__init__()
        self.gpt, self.cfg, self.condition = gpt, grid, condition

    @property
    def pos(self) -> torch.Tensor:
        return self.gpt.pos_emb[0, :self.cfg.length]

    def start(self, n: int) -> torch.Tensor:
        """The condition's input [n, 1, d]: its token at position 0."""
        return (self.gpt.tok_emb.weight[self.condition] + self.pos[0]).expand(n, 1, -1)

    def empty_caches(self) -> list[list]:
        return [[] for _ in self.gpt.blocks]

    def code_input(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """The input [n, 1, d] predicting code t + 1 from code t, ``codes`` [n]."""
        return self.gpt.tok_emb.weight[codes][:, None] + self.pos[t + 1]

    def embed(self, weights: torch.Tensor) -> torch.Tensor:
        """Inputs predicting codes 0..L-1 from code weights [n, L, V]: the condition, then the weighted
        code embeddings of codes 0..L-2 -> [n, L, d]."""
        table = self.gpt.tok_emb.weight[:self.cfg.vocab_size]
        codes = (weights[:, :-1] @ table.to(weights.dtype)).to(table.dtype) + self.pos[1:]
        return torch.cat([self.start(len(weights)), codes], 1)

    def forward(self, x: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        return self.gpt(x, caches)[..., :self.cfg.vocab_size]  # renormalised over the decoder's codes


class Net2NetPrior(GridPrior):
    """A taming Net2Net transformer as a :class:`~clipguide.engine.interfaces.TokenPrior`: ``log_prob``
    and ``sample`` are :class:`GridPrior`'s (its sampling is taming's ``sample_with_past`` without top-k or
    top-p), driving :class:`CodeGPT`."""

    model: CodeGPT  # type: ignore[assignment]  # GridPrior annotates its TokenGPT

    def __init__(self, model: CodeGPT, name: str, sha256: str | None, conditioning: dict):
        super().__init__(model, name, sha256)  # type: ignore[arg-type]  # CodeGPT has the interface GridPrior drives
        self.conditioning = conditioning

    def describe(self) -> dict:
        c = self.model.gpt.cfg
        return {**super().describe(), "conditioning": dict(self.conditioning),
                "architecture": f"taming Net2Net minGPT ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, "
                                f"vocab {c.vocab_size}, block {c.block_size})"}


@dataclass(frozen=True)
class Net2NetConfig:
    """What a Net2Net YAML says about the prior (the first stage's decoder is not built here)."""

    gpt: MinGPTConfig
    grid: GPTConfig
    conditioning: dict  # {"kind": "sos", "token": t} or {"kind": "class_label", "n_classes": n}


def read_config(path: Path) -> Net2NetConfig:
    """The prior in a taming Net2Net ``.yaml``: refuses what clipguide cannot run before any weights are read."""
    import yaml

    if not path.is_file():
        raise WeightsError(f"Net2Net config {path} does not exist: check the path")
    first = vqgan.read_yaml_config(path)  # the first stage: read (and its YAML checked) as for a decoder
    raw = yaml.safe_load(path.read_text())
    cls, params = vqgan._target(raw.get("model"), path)
    if cls != "Net2NetTransformer":
        raise ConfigError(f"{path} describes a {cls}, not a taming Net2NetTransformer: a VQGAN config is a "
                          "decoder (--decoder), a prior needs a Net2Net transformer's config")
    permuter, _ = vqgan._target(params.get("permuter_config") or {"target": "permuter.Identity"}, path)
    if permuter != "Identity":
        raise ConfigError(f"{path} reads codes in another order (permuter {permuter}): clipguide supports "
                          "taming.modules.transformer.permuter.Identity (raster order) only")
    gpt_cls, gpt_params = vqgan._target(params.get("transformer_config"), path)
    if gpt_cls != "GPT":
        raise ConfigError(f"{path} has a {gpt_cls} transformer: clipguide runs taming.modules.transformer.mingpt.GPT only")
    known = {f.name for f in fields(MinGPTConfig)}
    try:
        gpt = MinGPTConfig(**{k: int(v) for k, v in gpt_params.items() if k in known})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path} has no usable mingpt.GPT params ({type(e).__name__}: {e}): it needs "
                          "vocab_size and block_size") from None
    grid = _grid(raw.get("grid"), first, gpt, path)
    conditioning = _conditioning(params, path)
    _check_fit(gpt, grid, conditioning, path)
    return Net2NetConfig(gpt, grid, conditioning)


def _grid(stated, first: vqgan.TamingConfig, gpt: MinGPTConfig, path: Path) -> GPTConfig:
    """(h, w): a top-level ``grid: [h, w]``, else the first stage's resolution over its downsampling."""
    if stated is None:
        try:
            side = int(first.ddconfig["resolution"]) // 2 ** (len(first.ddconfig["ch_mult"]) - 1)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: the first stage's ddconfig has no resolution/ch_mult ({e}): "
                              "state the code grid as a top-level grid: [h, w]") from None
        stated = [side, side]
    if not (isinstance(stated, list) and len(stated) == 2 and all(isinstance(s, int) and s > 0 for s in stated)):
        raise ConfigError(f"{path}: grid {stated!r} is not [h, w] (two positive integers)")
    return GPTConfig(first.n_embed, stated[0], stated[1], n_embd=gpt.n_embd, n_layer=gpt.n_layer, n_head=gpt.n_head)


def _conditioning(params: dict, path: Path) -> dict:
    """What ``c`` is, decided in the order of taming's ``init_cond_stage_from_ckpt``."""
    stage = params.get("cond_stage_config")
    if stage == "__is_first_stage__":
        raise ConfigError(f"{path} conditions on an image's own codes (cond_stage_config: __is_first_stage__), "
                          f"which a prior cannot supply: clipguide supports {SUPPORTED}")
    if stage == "__is_unconditional__" or params.get("unconditional"):
        return {"kind": "sos", "token": _integer(params.get("sos_token", 0), "sos_token", path)}
    key = params.get("cond_stage_key", "depth")  # Net2NetTransformer's default
    target = stage.get("target", "?") if isinstance(stage, dict) else stage
    if key == "class_label" and isinstance(stage, dict) and str(target).rsplit(".", 1)[-1] == "Labelator":
        n_classes = (stage.get("params") or {}).get("n_classes")
        return {"kind": "class_label", "n_classes": None if n_classes is None else _integer(n_classes, "n_classes", path)}
    raise ConfigError(f"{path} conditions on {key} ({target}), which a prior cannot supply: clipguide supports {SUPPORTED}")


def _check_fit(gpt: MinGPTConfig, grid: GPTConfig, conditioning: dict, path: Path) -> None:
    problems = []
    if gpt.vocab_size < grid.vocab_size:
        problems.append(f"its GPT's vocab_size {gpt.vocab_size} is below the first stage's n_embed {grid.vocab_size}")
    if gpt.block_size < grid.length:  # [c, z[:-1]]: one condition token and h*w - 1 codes
        problems.append(f"block_size {gpt.block_size} is below the {grid.length} positions of a {grid.height}x{grid.width} grid")
    if gpt.n_unmasked > 1:
        problems.append(f"n_unmasked {gpt.n_unmasked} lets the first {gpt.n_unmasked} positions see codes they precede")
    if gpt.n_embd % gpt.n_head:
        problems.append(f"n_embd {gpt.n_embd} is not a multiple of n_head {gpt.n_head}")
    n_classes = conditioning.get("n_classes")
    largest = conditioning["token"] if conditioning["kind"] == "sos" else None if n_classes is None else n_classes - 1
    if largest is not None and not 0 <= largest < gpt.vocab_size:
        what = "sos_token" if conditioning["kind"] == "sos" else "the last class"
        problems.append(f"{what} {largest} lies outside the GPT's vocab_size {gpt.vocab_size}")
    if problems:
        raise ConfigError(f"{path} cannot be run: {'; '.join(problems)}: pass the config that came with the checkpoint")


def _condition_token(cfg: Net2NetConfig, class_label, path: Path) -> tuple[int, dict]:
    """The one token ``c`` and the conditioning's record."""
    cond = cfg.conditioning
    if cond["kind"] == "sos":
        if class_label is not None:
            raise ConfigError(f"{path} is an unconditional Net2Net model (sos token {cond['token']}): drop class_label")
        return cond["token"], dict(cond)
    classes = cond["n_classes"] if cond["n_classes"] is not None else cfg.gpt.vocab_size
    if class_label is None:
        raise ConfigError(f"{path} is a class-conditional Net2Net model (cond_stage_key: class_label): "
                          f"pass class_label=K, a class index in 0..{classes - 1}")
    label = class_label if isinstance(class_label, numbers.Integral) and not isinstance(class_label, bool) else None
    if label is None or not 0 <= int(label) < classes:
        raise ConfigError(f"class_label {class_label!r} is not a class of {path.name}: use 0..{classes - 1}")
    return int(label), {"kind": "class_label", "class": int(label)}


def _integer(value, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {name} {value!r} is not an integer: pass the config that came with the checkpoint")
    return value


def gpt_tensors(state: dict, cfg: MinGPTConfig, checkpoint: Path, config: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's ``transformer.*`` tensors for :class:`MinGPT`, keys checked strictly.

    minGPT's ``blocks.N.attn.mask`` buffers are derived from the config (``block_size``,
    ``n_unmasked``), so :class:`MinGPT` builds none: a checkpoint's masks are checked to be those and
    dropped; a checkpoint without them is accepted.  Every other key must be there, with its shape.
    """
    ours = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    mask = causal_mask(cfg)
    for i in range(cfg.n_layer):
        found = ours.pop(f"blocks.{i}.attn.mask", None)
        if found is not None and (found.shape != mask.shape or not torch.equal(found.float(), mask)):
            raise WeightsError(f"checkpoint {checkpoint}: {PREFIX}blocks.{i}.attn.mask is not minGPT's causal mask "
                               f"for block_size {cfg.block_size} (n_unmasked {cfg.n_unmasked}): pass the config "
                               "that came with this checkpoint")
    with torch.device("meta"):
        expected = {PREFIX + k: tuple(v.shape) for k, v in MinGPT(cfg).state_dict().items()}
    vqgan.check_keys({PREFIX + k: v for k, v in ours.items()}, expected, checkpoint, config)
    return ours


def load_net2net_prior(spec: str, device: str = "cpu", class_label: int | None = None) -> Net2NetPrior:
    """A token prior from a taming Net2Net ``CONFIG.yaml`` (checkpoint ``CONFIG.ckpt`` beside it) or
    ``CONFIG.yaml:CHECKPOINT.ckpt``; a class-conditional model needs ``class_label``."""
    paths = taming_paths(spec)
    if paths is None:
        raise ConfigError(f"{spec!r} is not a taming Net2Net spec: pass CONFIG.yaml or CONFIG.yaml:CHECKPOINT.ckpt")
    config, checkpoint = paths
    cfg = read_config(config)
    token, conditioning = _condition_token(cfg, class_label, config)
    tensors = gpt_tensors(vqgan.read_tensors(checkpoint), cfg.gpt, checkpoint, config)
    with torch.device("meta"):
        gpt = MinGPT(cfg.gpt)
    gpt.load_state_dict(tensors, strict=True, assign=True)  # assign: no second copy of the weights
    model = CodeGPT(gpt.float(), cfg.grid, token).to(device)
    return Net2NetPrior(model, config.stem, weights.sha256_file(checkpoint), conditioning)
