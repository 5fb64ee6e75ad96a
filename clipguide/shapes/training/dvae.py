"""The shapes dVAE (dall_e Encoder/Decoder): stage ``dvae`` (Gumbel-softmax, annealed to straight-through hard
codes) and stage ``dvaeft`` (hard codes, larger crops, an edge-weighted loss)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dall_e import Decoder, Encoder, map_pixels, unmap_pixels
from safetensors.torch import load_file

from .common import (COMMAND, EVAL_SCENES, Progress, descend, eval_recon, log, prefixed_tensors, read_meta, save,
                     scene_crops, seeded, set_lr, usage_term)

DVAE_ENCODER = {"n_hid": 64, "n_blk_per_group": 1, "input_channels": 3, "vocab_size": 512}
DVAE_DECODER = {"n_init": 64, "n_hid": 64, "n_blk_per_group": 1, "output_channels": 3, "vocab_size": 512}


def build_dvae(enc_cfg: dict | None = None, dec_cfg: dict | None = None):
    enc = Encoder(**(enc_cfg or DVAE_ENCODER), device=torch.device("cpu"), requires_grad=False,
                  use_mixed_precision=False)
    dec = Decoder(**(dec_cfg or DVAE_DECODER), device=torch.device("cpu"), requires_grad=False,
                  use_mixed_precision=False)
    return enc, dec


def load_dvae_from(out_dir: Path):
    """Rebuild the dVAE from ``shapes-dvae.json`` + ``.safetensors`` in ``out_dir``; returns (encoder, decoder, meta)."""
    meta = read_meta(out_dir, "shapes-dvae")
    enc, dec = build_dvae(meta["encoder"], meta["decoder"])
    sd = load_file(str(Path(out_dir) / "shapes-dvae.safetensors"))
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")})
    return enc, dec, meta


def encode_codes(enc, x):
    """The dVAE's hard codes [n, h, w] (argmax of the encoder's logits) of images [n, 3, H, W] in [0, 1]."""
    with torch.no_grad():
        return enc(map_pixels(x)).argmax(1)


def decode_codes(dec, codes, vocab: int):
    """Pixels in [0, 1] of hard codes [n, h, w]: one-hot -> decoder -> sigmoid -> unmap_pixels (which clamps)."""
    with torch.no_grad():
        out = dec(F.one_hot(codes, vocab).permute(0, 3, 1, 2).float()).float()
        return unmap_pixels(torch.sigmoid(out[:, :3]))


def dvae_reconstruct(enc, dec, x):
    """Hard-token reconstruction (:func:`encode_codes`, then :func:`decode_codes`); returns (img, codes)."""
    z = encode_codes(enc, x)
    return decode_codes(dec, z, enc.vocab_size), z


def _finish_dvae(enc, dec, tag: str, eval_scenes: int) -> tuple[dict, dict]:
    """Freeze a trained dVAE pair, measure its reconstructions, and return (metrics, tensors to ship)."""
    for m in (enc, dec):
        m.eval().requires_grad_(False)
    ev = eval_recon(lambda x: dvae_reconstruct(enc, dec, x), n=eval_scenes)
    log(f"{tag} eval {ev}")
    return ev, prefixed_tensors(encoder=enc, decoder=dec)


def _gumbel_codes(logits, tau: float, gen, hard: bool):
    """Gumbel-softmax sample of the codes at temperature ``tau``; ``hard``: its one-hot argmax forward,
    the softmax's gradient backward (straight-through)."""
    u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1 - 1e-10)
    y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
    if hard:
        y = F.one_hot(y.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float() + y - y.detach()
    return y


def train_dvae(out_dir: Path, seed: int = 0, steps: int = 1000, batch: int = 8, crop: int = 48, lr: float = 2e-3,
               kl_weight: float = 5e-4, div_weight: float = 0.05, hard_frac: float = 0.15,
               log_every: int = 50, eval_scenes: int = EVAL_SCENES, trained_by: str = COMMAND) -> dict:
    """Stage ``dvae``: Gumbel-softmax training, tau 1 -> 1/16, straight-through hard codes for the last ``hard_frac``."""
    gen, rng = seeded(seed, 1, 0)
    enc, dec = build_dvae()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    V = enc.vocab_size
    progress = Progress("dvae", steps, log_every)
    hard_from = int((1 - hard_frac) * steps)
    for step in range(steps):
        set_lr(opt, step, steps, lr, warmup=50)
        tau = float(np.exp(np.log(1.0) + (np.log(1 / 16) - np.log(1.0)) * min(1.0, step / max(1, hard_from))))
        x = scene_crops(batch, crop, rng, gen)
        logits = enc(map_pixels(x))
        # straight-through hard codes at the end: the decoder learns exact one-hots
        rec = torch.sigmoid(dec(_gumbel_codes(logits, tau, gen, step >= hard_from))[:, :3])
        target = map_pixels(x)
        l_rec = F.mse_loss(rec, target) + 0.5 * F.l1_loss(rec, target)
        q = F.softmax(logits, dim=1)
        logq = F.log_softmax(logits, dim=1)
        kl = (q * (logq + math.log(V))).sum(1).mean()  # KL(q || uniform) per position
        div, qbar = usage_term(q)
        descend(opt, l_rec + kl_weight * kl + div_weight * div, params)
        progress.hist.append(l_rec.item())
        if progress.due(step):
            progress.log(step, f"rec {progress.recent():.5f} tau {tau:.3f} kl {kl.item():.3f} "
                         f"perplexity {math.exp(-(qbar * torch.log(qbar + 1e-10)).sum().item()):.1f}")
    train_s = progress.seconds()
    ev, sd = _finish_dvae(enc, dec, "dvae", eval_scenes)
    meta = {"kind": "dall_e", "encoder": DVAE_ENCODER, "decoder": DVAE_DECODER, "image_size": 128, "tokens": 16,
            "downsample": 8, "dtype": "float32", "metrics": ev,
            "training": {"steps": steps, "batch": batch, "crop": crop, "lr": lr, "kl_weight": kl_weight,
                         "usage_weight": div_weight, "tau": "1 -> 1/16 exponential, then straight-through hard",
                         "hard_from_step": hard_from, "loss": "MSE + 0.5 L1 of sigmoid(out[:3]) vs map_pixels(x)",
                         "seed": seed, "seconds": round(train_s, 1)}}
    save(out_dir, "shapes-dvae", sd, meta, trained_by)
    return meta


def finetune_dvae(out_dir: Path, seed: int = 0, steps: int = 1200, batch: int = 8, crop: int = 64, lr: float = 5e-4,
                  tau: float = 1 / 16, edge_weight: float = 3.0, log_every: int = 50, eval_scenes: int = EVAL_SCENES,
                  trained_by: str = COMMAND) -> dict:
    """Stage ``dvaeft``: continue from shapes-dvae.* with hard straight-through codes (forward = one-hot
    argmax of the Gumbel sample, backward through the tau-softmax), larger crops, and a reconstruction loss
    weighted up near edges (sharper corners and triangle tips).  Rewrites shapes-dvae.*."""
    gen, rng = seeded(seed, 4)
    enc, dec, meta = load_dvae_from(out_dir)
    params = list(enc.parameters()) + list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    progress = Progress("dvae-ft", steps, log_every)
    for step in range(steps):
        set_lr(opt, step, steps, lr, warmup=20)
        x = scene_crops(batch, crop, rng, gen)
        logits = enc(map_pixels(x))
        rec = torch.sigmoid(dec(_gumbel_codes(logits, tau, gen, True))[:, :3])
        # edge weight: pixels within 2 px of a colour change
        g = (F.max_pool2d(x, 5, 1, 2) + F.max_pool2d(-x, 5, 1, 2)).amax(1, keepdim=True) > 0.02
        w = 1 + edge_weight * g.float()
        err = (rec - map_pixels(x))
        l_rec = (w * (err ** 2 + 0.5 * err.abs())).mean() / w.mean()
        descend(opt, l_rec + 0.02 * usage_term(F.softmax(logits, dim=1))[0], params)
        progress.hist.append(l_rec.item())
        if progress.due(step):
            progress.log(step, f"rec {progress.recent():.5f}")
    train_s = progress.seconds()
    ev, sd = _finish_dvae(enc, dec, "dvae-ft", eval_scenes)
    meta = dict(meta)
    meta["metrics"] = dict(ev, stage1=meta.get("metrics"))
    meta["finetune_hard"] = {"steps": steps, "batch": batch, "crop": crop, "lr": lr, "tau": tau,
                             "edge_weight": edge_weight, "seed": seed, "seconds": round(train_s, 1),
                             "trained_by": trained_by,
                             "loss": "edge-weighted MSE + 0.5 L1, straight-through hard codes, 0.02 usage term"}
    save(out_dir, "shapes-dvae", sd, meta, trained_by)
    return meta
