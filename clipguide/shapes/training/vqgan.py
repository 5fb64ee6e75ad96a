"""The shapes VQGAN, built from taming's modules (never taming.models): stage ``vqgan`` and stage ``vqganft``
(continued from the first)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .. import scenes as S
from .common import (COMMAND, EVAL_SCENES, Progress, descend, eval_recon, log, read_meta, save, scene_crops, seeded,
                     set_lr)

VQGAN_DDCONFIG = {"double_z": False, "z_channels": 64, "resolution": 128, "in_channels": 3, "out_ch": 3,
                  "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VQGAN_N_EMBED = 512
VQGAN_EMBED_DIM = 32


def build_vqgan(ddconfig: dict | None = None, n_embed: int = VQGAN_N_EMBED, embed_dim: int = VQGAN_EMBED_DIM):
    # taming is an optional dependency (the ``vqgan`` extra): the CLIP and dVAE stages train without it
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    dd = dict(ddconfig or VQGAN_DDCONFIG)
    m = torch.nn.Module()
    m.encoder = Encoder(**dd)
    m.decoder = Decoder(**dd)
    m.quant_conv = torch.nn.Conv2d(dd["z_channels"], embed_dim, 1)
    m.post_quant_conv = torch.nn.Conv2d(embed_dim, dd["z_channels"], 1)
    m.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25, legacy=False)
    return m


def load_vqgan_from(out_dir: Path):
    """Rebuild the VQGAN from ``shapes-vqgan.json`` + ``.safetensors`` in ``out_dir``; returns (module, meta)."""
    meta = read_meta(out_dir, "shapes-vqgan")
    m = build_vqgan(meta["ddconfig"], meta["n_embed"], meta["embed_dim"])
    m.load_state_dict(load_file(str(Path(out_dir) / "shapes-vqgan.safetensors")))
    return m, meta


def vqgan_reconstruct(m, x):
    with torch.no_grad():
        h = m.quant_conv(m.encoder(x * 2 - 1))
        zq, _, (_, _, idx) = m.quantize(h)
        r = m.decoder(m.post_quant_conv(zq))
        return ((r + 1) / 2).clamp(0, 1), idx


def _codes_at(h, n: int, gen):
    """``n`` code vectors at random encoder outputs of ``h`` [B, C, h, w], slightly jittered."""
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(0, flat.shape[0], (n,), generator=gen)
    return flat[pick] + 0.01 * flat.std() * torch.randn((n, flat.shape[1]), generator=gen)


def _vqgan_batch(step: int, full_from: int, batch: int, crop: int, rng, gen):
    if step < full_from:
        return scene_crops(batch, crop, rng, gen)
    # finish on full 128 px images (GroupNorm statistics as at inference), same pixel count per step
    nb = max(1, batch * crop * crop // (128 * 128))
    return S.to_tensor(S.render(S.sample_scenes(nb, rng=rng), 128))


def _restart_dead_codes(m, h, usage, gen) -> int:
    """Restart the codes ``usage`` never saw at random encoder outputs of this batch; returns how many."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead):
        with torch.no_grad():
            m.quantize.embedding.weight[dead] = _codes_at(h, len(dead), gen)
    return len(dead)


def train_vqgan(out_dir: Path, seed: int = 0, steps: int = 600, batch: int = 8, crop: int = 64, lr: float = 1e-3, full_frac: float = 0.2,
                restart_every: int = 25, log_every: int = 50, resume: bool = False, eval_scenes: int = EVAL_SCENES,
                trained_by: str = COMMAND) -> dict:
    """Stage ``vqgan``; ``resume=True`` (stage ``vqganft``, :func:`finetune_vqgan`) continues from shapes-vqgan.* in out_dir."""
    gen, rng = seeded(seed, 7 if resume else 2, 5 if resume else 0)
    m, prev = load_vqgan_from(out_dir) if resume else (build_vqgan(), None)
    if resume:
        m.requires_grad_(True)
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9))
    usage = torch.zeros(VQGAN_N_EMBED)
    progress, restarted = Progress("vqgan", steps, log_every), 0
    full_from = int((1 - full_frac) * steps)
    for step in range(steps):
        set_lr(opt, step, steps, lr, warmup=50)
        x = _vqgan_batch(step, full_from, batch, crop, rng, gen)
        h = m.quant_conv(m.encoder(x * 2 - 1))
        if step == 0 and not resume:  # data-dependent codebook init (the default +-1/n_e init collapses)
            with torch.no_grad():
                m.quantize.embedding.weight.copy_(_codes_at(h, VQGAN_N_EMBED, gen))
        zq, l_q, (_, _, idx) = m.quantize(h)
        r = m.decoder(m.post_quant_conv(zq))
        xt = x * 2 - 1
        l_rec = F.mse_loss(r, xt) + 0.5 * F.l1_loss(r, xt)
        descend(opt, l_rec + l_q, m.parameters())
        usage += torch.bincount(idx.flatten(), minlength=VQGAN_N_EMBED).float()
        progress.hist.append(l_rec.item())
        if restart_every and (step + 1) % restart_every == 0 and step < 0.8 * steps:
            restarted += _restart_dead_codes(m, h, usage, gen)
            usage.zero_()
        if progress.due(step):
            progress.log(step, f"rec {progress.recent():.5f} q {l_q.item():.4f} restarted {restarted}")
    train_s = progress.seconds()
    m.eval()
    ev = eval_recon(lambda x: vqgan_reconstruct(m, x), n=eval_scenes)
    log(f"vqgan eval {ev}")
    m.requires_grad_(False)
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    record = {"steps": steps, "batch": batch, "crop": crop, "full_128px_from_step": full_from, "lr": lr,
              "dead_code_restarts": restarted, "seed": seed, "seconds": round(train_s, 1)}
    meta = _vqgan_meta(ev, record, prev, trained_by)
    save(out_dir, "shapes-vqgan", sd, meta, trained_by)
    return meta


def finetune_vqgan(out_dir: Path, seed: int = 0, steps: int = 600, lr: float = 8e-4, trained_by: str = COMMAND, **kw) -> dict:
    """Stage ``vqganft``: :func:`train_vqgan` continued from shapes-vqgan.* at a lower peak learning rate."""
    return train_vqgan(out_dir, seed=seed, steps=steps, lr=lr, resume=True, trained_by=trained_by, **kw)


def _vqgan_meta(ev: dict, record: dict, prev: dict | None, trained_by: str) -> dict:
    """The json of a VQGAN trained from scratch (``prev`` None) or continued from ``prev``."""
    if prev is not None:
        meta = dict(prev)
        meta["metrics"] = dict(ev, stage1=prev.get("metrics"))
        meta["finetune"] = dict(record, trained_by=trained_by)
        return meta
    return {"kind": "taming", "ddconfig": VQGAN_DDCONFIG, "n_embed": VQGAN_N_EMBED, "embed_dim": VQGAN_EMBED_DIM,
            "quantizer": "VectorQuantizer2(beta=0.25, legacy=False)", "pixel_range": "[-1, 1]", "image_size": 128,
            "tokens": 16, "downsample": 8, "dtype": "float32", "metrics": ev,
            "training": {**{k: v for k, v in record.items() if k != "seed" and k != "seconds"},
                         "loss": "MSE + 0.5 L1 (pixels in [-1,1]) + VQ loss", "seed": record["seed"],
                         "seconds": record["seconds"]}}
