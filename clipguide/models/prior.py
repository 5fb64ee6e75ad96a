"""Token priors: unconditional models of a decoder's code grids, that CLIP guides within.

DALL-E never relied on CLIP alone: its transformer proposed images and CLIP reranked them
(Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", §2.5 and Figure 2).  A prior here
is such a transformer without the text: an autoregressive model of the h x w codes in raster
order, as taming's Net2Net transformers are (Esser et al. 2021).  It implements
:class:`clipguide.engine.interfaces.TokenPrior`: ``sample`` draws code grids, ``log_prob``
scores tokens or relaxed code weights, differentiably in the weights (their embeddings are the
weighted sum of the code embeddings), so it can be a term of the loop's objective.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer over a grid's codes (nanoGPT's layout, pre-norm blocks)."""

    vocab_size: int  # V, the decoder's codes; index V is the start token
    height: int  # the code grid, read in raster order
    width: int
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4

    @property
    def length(self) -> int:
        return self.height * self.width


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.length = cfg.n_head, cfg.length
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.qkv, self.proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd), nn.Linear(cfg.n_embd, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def cached(self, cache: list, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values so far, ``k`` and ``v`` [n, heads, T, d/heads] appended.  The cache is
        [keys, values, count] with room for the whole grid, written in place: concatenating per code
        copied the cache at each of the L steps (O(L²) copies, 70 % of sampling 256 grids)."""
        if not cache:
            n, h, _, e = k.shape
            cache[:] = [k.new_empty(n, h, self.length, e), v.new_empty(n, h, self.length, e), 0]
        keys, values, t = cache
        end = t + k.shape[2]
        keys[:, :, t:end], values[:, :, t:end], cache[2] = k, v, end
        return keys[:, :, :end], values[:, :, :end]

    def heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        n, t, d = x.shape
        return [y.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for y in self.qkv(self.ln1(x)).split(d, -1)]

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """``x`` [n, T, d]; with ``cache`` (a list holding the keys and values so far), ``x`` continues it."""
        q, k, v = self.heads(x)
        if cache is not None:
            k, v = self.cached(cache, k, v)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)  # one new token sees all the cache
        x = x + self.proj(att.transpose(1, 2).reshape(x.shape))
        return x + self.mlp(self.ln2(x))


class TokenGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size + 1, cfg.n_embd)
        self.pos = nn.Parameter(torch.zeros(cfg.length, cfg.n_embd))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def embed(self, weights: torch.Tensor) -> torch.Tensor:
        """The inputs that predict codes 0..L-1 from code weights [n, L, V]: the start token, then the
        weighted code embeddings of codes 0..L-2 -> [n, L, d]."""
        start = self.tok.weight[-1].expand(weights.shape[0], 1, -1)
        codes = weights[:, :-1] @ self.tok.weight[:-1].to(weights.dtype)
        return torch.cat([start, codes.to(start.dtype)], 1) + self.pos

    def empty_caches(self) -> list[list]:
        """One empty key/value cache per block, for :meth:`forward` to fill."""
        return [[] for _ in self.blocks]

    def start(self, n: int) -> torch.Tensor:
        """The input [n, 1, d] predicting code 0: the start token at position 0."""
        return self.tok.weight[-1].expand(n, 1, -1) + self.pos[:1]

    def code_input(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """The input [n, 1, d] predicting code t + 1 from code t, ``codes`` [n]."""
        return self.tok.weight[codes][:, None] + self.pos[t + 1]

    def forward(self, x: torch.Tensor, caches: list | None = None) -> torch.Tensor:
        """Embedded inputs [n, T, d] -> next-code logits [n, T, V]."""
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))


class GridPrior:
    """A :class:`TokenGPT` over a decoder's h x w code grid (see the module docstring)."""

    def __init__(self, model: TokenGPT, name: str, sha256: str | None = None):
        self.model, self.name, self.sha256 = model.eval().requires_grad_(False), name, sha256

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.model.cfg.height, self.model.cfg.width

    @property
    def device(self) -> torch.device:
        return self.model.pos.device

    def to(self, device) -> "GridPrior":
        self.model.to(device)
        return self

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "vocab_size": self.vocab_size, "grid": list(self.grid)}

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p of tokens [n, h, w] (int) or the expected log p of code weights [n, V, h, w] -> [n] (nats)."""
        weights = (F.one_hot(x.flatten(1), self.vocab_size).float() if not x.is_floating_point()
                   else x.flatten(2).transpose(1, 2))  # [n, L, V]
        logits = self.model(self.model.embed(weights.to(self.device)))
        return (weights * logits.float().log_softmax(-1)).sum((1, 2))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator, temperature: float = 1.0,
               prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` code grids [n, h, w] in raster order with a key/value cache, every draw from ``generator``
        (a CPU one: seeds portable across devices).  With ``prefix`` [n, k] the first k codes are given and
        only the rest are drawn: completions of a grid kept down to some row (a resample of its suffix)."""
        caches = self.model.empty_caches()
        x, out, k = self.model.start(n), [], 0 if prefix is None else prefix.shape[1]
        for t in range(self.model.cfg.length):
            logits = self.model(x, caches)[:, -1].float() / temperature
            if t < k:  # given: its logits only fill the cache, and nothing is drawn
                out.append(prefix[:, t].cpu())
            else:
                out.append(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)[:, 0])
            if t + 1 < self.model.cfg.length:
                x = self.model.code_input(out[-1].to(self.device), t)
        return torch.stack(out, 1).view(n, *self.grid)


def bits_per_code(prior: GridPrior, tokens: torch.Tensor, batch: int = 64) -> float:
    """The mean negative log-likelihood of code grids [n, h, w] in bits per code (lower is better)."""
    with torch.no_grad():
        nll = torch.cat([-prior.log_prob(tokens[i:i + batch]) for i in range(0, len(tokens), batch)])
    return float(nll.mean()) / tokens[0].numel() / math.log(2)


def config_of(meta: dict) -> GPTConfig:
    """The architecture recorded in a prior's .json."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in meta["config"].items() if k in fields})
