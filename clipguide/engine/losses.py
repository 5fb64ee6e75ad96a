"""Prompt losses between cutout embeddings and weighted targets.

Targets of a batch are padded to a common count T: ``embeds`` [B, T, D],
``weights`` [B, T] (0 for padding), ``stops`` [B, T] (-inf = never stop).
Each run's loss depends only on its own cutouts, so summing the runs' losses
gives every run the gradient it would get alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import replace_grad


def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Half the squared great-circle angle between unit vectors: 2·arcsin(|a-b|/2)²."""
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def spherical_loss(cut_embeds: torch.Tensor, embeds: torch.Tensor, weights: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Crowson's Prompt loss per run: Σ_t |w_t|·mean_i s_it with s = sign(w_t)·d_it, the gradient
    cut where the *signed* distance s falls below the target's stop (so a negative prompt
    ``blue:-1:-1.2`` stops pushing once it is far enough).  cut_embeds [B, N, D] -> [B]."""
    x = F.normalize(cut_embeds, dim=-1)[:, :, None]  # [B, N, 1, D]
    t = F.normalize(embeds, dim=-1)[:, None]  # [B, 1, T, D]
    d = spherical_distance(x, t) * weights.sign()[:, None]  # [B, N, T], signed
    d = replace_grad(d, torch.maximum(d, stops[:, None]))
    return (weights.abs() * d.mean(1)).sum(-1)


def cosine_loss(cut_embeds: torch.Tensor, embeds: torch.Tensor, weights: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Aleph2Image's loss per run: -Σ_t w_t·mean_i cos(e_i, t) (stops are ignored) -> [B]."""
    return -(weights * cosine_similarities(cut_embeds, embeds).mean(1)).sum(-1)


def cosine_similarities(cut_embeds: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """[B, N, D] x [B, T, D] -> [B, N, T] cosine similarities."""
    return F.normalize(cut_embeds, dim=-1) @ F.normalize(embeds, dim=-1).transpose(1, 2)


def prompt_similarity(cut_embeds: torch.Tensor, embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean CLIP cosine to the positively weighted targets (weighted), per run: [B].

    This is the similarity the progress bar and manifest report."""
    pos = weights.clamp(min=0)
    cos = cosine_similarities(cut_embeds, embeds).mean(1)  # [B, T]
    return (cos * pos).sum(-1) / pos.sum(-1).clamp(min=1e-12)


LOSSES = {"spherical": spherical_loss, "cosine": cosine_loss}
