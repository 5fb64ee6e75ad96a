"""Train the shapes-world models: a tiny open_clip CLIP, a dall_e dVAE and a taming VQGAN.

    python -m clipguide.shapes.train [--out DIR] [--seed 0] [--only clip,dvae,vqgan] [--minutes M] [--threads 1]
    python -m clipguide.shapes.train --rejudge [--out DIR]   # re-measure the decoders after a judge change

Runs are step-budgeted (not time-budgeted), so a run is deterministic for a given seed,
step count and thread count.  ``--minutes`` scales the step counts by the speed measured
on the reference machine (1 thread of a 2-core AMD EPYC VM), so it is a budget *estimate*.
Each model writes ``shapes-<name>.safetensors`` + ``shapes-<name>.json`` into ``--out``;
MODEL_CARD.md is regenerated from whichever json files are there.

The models are built directly with open_clip / dall_e / taming.modules (never taming.models).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import judge as J
from . import scenes as S

MODELS_DIR = Path(__file__).resolve().parent / "models"
KINDS = ("clip", "dvae", "vqgan")
# clipft: CLIP fine-tune against dVAE-decoded adversarial images; clipframe: then with frame-cut shapes as negatives;
# cliprobust: then adversarially (L2 PGD/FGSM in pixel space), for perceptually aligned gradients
SHIPPED_STAGES = ("clip", "dvae", "dvaeft", "vqgan", "vqganft", "clipft", "clipframe", "cliprobust")
STAGES = SHIPPED_STAGES + ("clipgen", "clipnear", "cliploop")  # experimental, not shipped: CLIP fine-tunes against the generation loop's images, near misses, whole robust runs

# Reference step rates (steps per minute, 1 thread, reference machine; cliploop's measured with 2-3 processes on its 2 cores)
# and default budgets (minutes).
STEPS_PER_MIN = {"clip": 55.0, "dvae": 170.0, "dvaeft": 110.0, "vqgan": 60.0, "vqganft": 60.0, "clipft": 30.0, "clipgen": 27.0,
                 "clipframe": 150.0, "clipnear": 50.0, "cliprobust": 55.0, "cliploop": 13.8}
DEFAULT_MINUTES = {"clip": 18.0, "dvae": 14.0, "dvaeft": 6.0, "vqgan": 10.0, "vqganft": 5.0, "clipft": 8.0, "clipgen": 15.0, "clipframe": 1.0,
                   "clipnear": 8.0, "cliprobust": 11.0, "cliploop": 29.0}

ROBUSTNESS_STEPS = 150  # pixel-space robustness check length (module constant so smoke tests can shorten it)
ROBUST_POLISH_STEPS = 150  # clean steps after cliprobust's adversarial ones (likewise a module constant)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_IMAGE_SIZE = 64
CLIP_CONTEXT = 16
CLIP_CFG = {
    "embed_dim": 128,
    "quick_gelu": False,
    "vision_cfg": {"image_size": CLIP_IMAGE_SIZE, "patch_size": 8, "width": 96, "layers": 3,
                   "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": CLIP_CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3,
                 "mlp_ratio": 4.0},
}
DVAE_ENCODER = {"n_hid": 64, "n_blk_per_group": 1, "input_channels": 3, "vocab_size": 512}
DVAE_DECODER = {"n_init": 64, "n_hid": 64, "n_blk_per_group": 1, "output_channels": 3, "vocab_size": 512}
VQGAN_DDCONFIG = {"double_z": False, "z_channels": 64, "resolution": 128, "in_channels": 3, "out_ch": 3,
                  "ch": 32, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VQGAN_N_EMBED = 512
VQGAN_EMBED_DIM = 32


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _steps(kind: str, minutes: float | None, steps: int | None) -> int:
    if steps is not None:
        return int(steps)
    m = DEFAULT_MINUTES[kind] if minutes is None else float(minutes)
    return max(1, int(round(m * STEPS_PER_MIN[kind])))


def _lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


# ============================================================================ CLIP
def build_clip(cfg: dict | None = None):
    import open_clip

    cfg = dict(CLIP_CFG if cfg is None else cfg)
    return open_clip.CLIP(cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]),
                          quick_gelu=cfg.get("quick_gelu", False))


def clip_tokenizer(context_length: int = CLIP_CONTEXT):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)


def _normalise(x):
    import torch

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def random_cutouts(x, n: int, out: int, gen, min_frac: float = 0.8):
    """n square cutouts (side min_frac..1 of the image, random offset), resized to out px; [n*B, 3, out, out].

    The same crop is used for the whole batch per cutout (cheap); randomness from ``gen``.
    """
    import torch
    import torch.nn.functional as F

    side = x.shape[-1]
    outs = []
    for _ in range(n):
        s = int(side * (min_frac + (1 - min_frac) * torch.rand((), generator=gen).item()))
        s = max(1, min(side, s))
        oy = int(torch.randint(0, side - s + 1, (), generator=gen))
        ox = int(torch.randint(0, side - s + 1, (), generator=gen))
        c = x[:, :, oy:oy + s, ox:ox + s]
        outs.append(F.interpolate(c, size=(out, out), mode="bilinear", antialias=True, align_corners=False)
                    if s != out else c)
    return torch.cat(outs)


def _augment(x, gen, out: int = CLIP_IMAGE_SIZE, noise: float = 0.04):
    """Per-image random crop 80-100 % + resize to ``out`` + small Gaussian noise (like generation's cutouts)."""
    import torch
    import torch.nn.functional as F

    side = x.shape[-1]
    n = x.shape[0]
    fr = 0.8 + 0.2 * torch.rand(n, generator=gen)
    res = []
    for i in range(n):
        s = max(8, int(side * fr[i]))
        oy = int(torch.randint(0, side - s + 1, (), generator=gen))
        ox = int(torch.randint(0, side - s + 1, (), generator=gen))
        res.append(F.interpolate(x[i:i + 1, :, oy:oy + s, ox:ox + s], size=(out, out), mode="bilinear",
                                 antialias=True, align_corners=False))
    y = torch.cat(res)
    sd = noise * torch.rand(n, 1, 1, 1, generator=gen)
    return (y + sd * torch.randn(y.shape, generator=gen)).clamp(0, 1)


def _caption_attrs(template_index: int, scene: S.Scene) -> tuple[str, str, str | None]:
    has_bg = "{background}" in S.TEMPLATES[template_index]
    return scene.colour, scene.shape, (scene.background if has_bg else None)



def _descend(opt, loss, params) -> None:
    """One clipped gradient step (max norm 1)."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _prefixed_tensors(**modules) -> dict:
    """State dicts of named modules as one flat dict with "name." prefixes (the shipped format)."""
    return {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}


def _finish_dvae(enc, dec, tag: str) -> tuple[dict, dict]:
    """Freeze a trained dVAE pair, measure its reconstructions, and return (metrics, tensors to ship)."""
    for m in (enc, dec):
        m.eval().requires_grad_(False)
    ev = _eval_recon(lambda x: dvae_reconstruct(enc, dec, x))
    _log(f"{tag} eval {ev}")
    return ev, _prefixed_tensors(encoder=enc, decoder=dec)


def _finish_clip(model, tag: str) -> tuple[dict, dict]:
    """Freeze a fine-tuned CLIP, measure its zero-shot accuracy, and return (accuracy, float16 tensors to ship)."""
    import torch

    model.eval()
    zs = clip_zero_shot(model, n=300)
    _log(f"{tag} zero-shot {zs}")
    return zs, {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def _soft_targets(scenes, tmpl, n_images: int, n_captions: int):
    """[n_images, n_captions] soft targets: a caption (column j < len(scenes)) is positive for every scene
    image (row) whose attributes it matches; the distractor rows match the neutral captions (the rest)."""
    import torch

    n_real = len(scenes)
    targets = torch.zeros(n_images, n_captions)
    col = np.array([s.colour for s in scenes])
    shp = np.array([s.shape for s in scenes])
    bgd = np.array([s.background for s in scenes])
    for j, (c, sh, b) in enumerate(_caption_attrs(int(k), s) for s, k in zip(scenes, tmpl)):
        m = (col == c) & (shp == sh)
        if b is not None:
            m &= bgd == b
        targets[:n_real, j] = torch.from_numpy(m.astype(np.float32))
    targets[n_real:, n_real:] = 1.0
    return targets


def _soft_contrastive_loss(fi, ft, targets, scale):
    """(image-side [N], text-side [M]) soft cross-entropies of unit image and text features."""
    import torch.nn.functional as F

    logits = scale * fi @ ft.T
    li = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1)
    lt = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1)
    return li, lt


def _soft_contrastive_step(model, opt, x, text, scenes, tmpl, n_real: int, adversary=None):
    """One CLIP training step with soft targets: a caption is positive for every image whose
    attributes it matches; the distractor images (rows from ``n_real``) match the neutral
    captions (columns from ``n_real``).  With ``adversary(model, x, ft, targets)`` -> images (``ft``: the step's unit text features), the
    loss of the batch's adversarial images is added to the clean one (adversarial training that keeps
    the clean accuracy, as TRADES and TeCoA's clean term do)."""
    targets = _soft_targets(scenes[:n_real], tmpl, x.shape[0], text.shape[0])
    ft = model.encode_text(text, normalize=True)
    loss = 0
    for images in [x] + ([adversary(model, x, ft.detach(), targets)] if adversary is not None else []):
        fi = model.encode_image(_normalise(images), normalize=True)
        li, lt = _soft_contrastive_loss(fi, ft, targets, model.logit_scale.exp().clamp(max=100))
        loss = loss + 0.5 * (li.mean() + lt.mean())
    _descend(opt, loss, model.parameters())
    return loss


def l2_adversary(eps: float, steps: int = 1, step_size: float = 1.25, generator=None):
    """An adversary for :func:`_soft_contrastive_step`: images moved within an L2 ball of radius ``eps``
    (pixels in [0, 1] at the CLIP's input size) so as to *raise* the image-side loss against the fixed text
    features: projected gradient ascent (Madry et al. 2018) from a random point of the ball, ``steps`` steps of
    ``step_size``·eps (one step of 1.25·eps is "fast" FGSM-RS training, Wong et al. 2020).  Training on them is
    TeCoA-style adversarial fine-tuning of CLIP (Mao et al. 2023); robust models have perceptually aligned input
    gradients (Santurkar et al. 2019), which is what a generator optimising images against the CLIP follows."""
    import torch

    def norms(d):  # per-image L2 norm, broadcastable over the image
        return d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def attack(model, x, ft, targets):  # ft: the captions' unit text features, fixed during the attack
        was_training = model.training
        model.eval()
        with torch.no_grad():
            scale = model.logit_scale.exp().clamp(max=100)
        d = torch.randn(x.shape, generator=generator)
        d = d * (eps * torch.rand(x.shape[0], 1, 1, 1, generator=generator) / norms(d))
        for _ in range(steps):
            d.requires_grad_(True)
            fi = model.encode_image(_normalise((x + d).clamp(0, 1)), normalize=True)
            (g,) = torch.autograd.grad(_soft_contrastive_loss(fi, ft, targets, scale)[0].sum(), d)
            with torch.no_grad():
                d = d + step_size * eps * g / norms(g).clamp(min=1e-12)
                d = d * (eps / norms(d).clamp(min=eps))  # project onto the eps ball
                d = (x + d).clamp(0, 1) - x
        model.train(was_training)
        return (x + d).detach()

    return attack


@functools.lru_cache(maxsize=1)
def _caption_tokens() -> tuple:
    """Every caption of the world (all templates) and the neutral ones: (caption -> row, tokens)."""
    caps = sorted({S.TEMPLATES[k].format(colour=c, shape=s_, background=b)
                   for c in S.COLOUR_NAMES for s_ in S.SHAPES for b in S.BACKGROUNDS
                   for k in range(len(S.TEMPLATES)) if b != c} | set(S.NEUTRAL_CAPTIONS))
    return {c: i for i, c in enumerate(caps)}, clip_tokenizer(CLIP_CONTEXT)(caps)


def _step_with_negatives(model, opt, extra_negatives, batch: int, n_neg: int, rng, gen, paired=(), adversary=None):
    """One soft-contrastive step on ``batch`` scenes, ``n_neg`` rendered distractors and
    ``extra_negatives`` (images captioned with the neutral captions).

    The scenes are ``paired`` (those the extra negatives spoil) and fresh ones: a paired scene's
    caption then meets its clean image as the positive and its spoilt one as a negative in the same
    softmax (hard negatives, as in NegCLIP, Yuksekgonul et al. 2023); unpaired, a negative almost
    never shares the attributes of a caption in the batch, and pushes on nothing in particular.
    ``adversary``: see :func:`_soft_contrastive_step`."""
    import torch

    cap_index, cap_tokens = _caption_tokens()
    neutral_tokens = cap_tokens[[cap_index[c] for c in S.NEUTRAL_CAPTIONS]]
    scenes = list(paired) + S.sample_scenes(batch - len(paired), rng=rng)
    tmpl = rng.integers(len(S.TEMPLATES), size=batch)
    caps = [S.caption(s_, int(k)) for s_, k in zip(scenes, tmpl)]
    real = _augment(S.to_tensor(S.render(scenes, 128)), gen)
    negs = S.to_tensor(S.render_distractors(n_neg, rng, 128))
    imgs = [real, _augment(negs, gen)]
    if len(extra_negatives):
        imgs.append(_augment(extra_negatives, gen, noise=0.02))
    text = torch.cat([cap_tokens[[cap_index[c_] for c_ in caps]], neutral_tokens])
    return _soft_contrastive_step(model, opt, torch.cat(imgs), text, scenes, tmpl, real.shape[0], adversary)


def clip_zero_shot(model, n: int = 200, seed: int = 12345, size: int = 128, batch: int = 100) -> dict:
    """Zero-shot accuracy per attribute on fresh scenes over all 168 canonical prompts (+ neutral-caption rate)."""
    import torch

    tok = clip_tokenizer(model.context_length if hasattr(model, "context_length") else CLIP_CONTEXT)
    prompts = S.canonical_prompts()
    model.eval()
    with torch.no_grad():
        t = model.encode_text(tok([p for p, _ in prompts] + list(S.NEUTRAL_CAPTIONS)), normalize=True)
        scenes = S.sample_scenes(n, seed)
        correct = {"colour": 0, "shape": 0, "background": 0, "all": 0}
        for i in range(0, n, batch):
            sc = scenes[i:i + batch]
            x = S.to_tensor(S.render(sc, size))
            x = torch.nn.functional.interpolate(x, size=(CLIP_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
            f = model.encode_image(_normalise(x), normalize=True)
            best = (f @ t[: len(prompts)].T).argmax(1)
            for s, b in zip(sc, best.tolist()):
                a = prompts[b][1]
                ok = [a[0] == s.colour, a[1] == s.shape, a[2] == s.background]
                correct["colour"] += ok[0]
                correct["shape"] += ok[1]
                correct["background"] += ok[2]
                correct["all"] += all(ok)
        d = S.to_tensor(S.render_distractors(n, seed + 1, size))
        d = torch.nn.functional.interpolate(d, size=(CLIP_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
        fd = model.encode_image(_normalise(d), normalize=True)
        neutral = ((fd @ t.T).argmax(1) >= len(prompts)).float().mean().item()
    out = {k: v / n for k, v in correct.items()}
    out["distractors_called_neutral"] = neutral
    return out


def pixel_robustness(model, n_prompts: int = 20, steps: int | None = None, size: int = 128, cutn: int = 4,
                     lr: float = 0.05, seed: int = 777) -> dict:
    """Optimise raw pixels (sigmoid-parametrised) toward canonical prompts; judge the results.

    Harsher than generation through a decoder. Returns the judge's match rates and CLIP cosines.
    """
    import torch

    steps = ROBUSTNESS_STEPS if steps is None else steps
    gen = torch.Generator().manual_seed(seed)
    g = np.random.default_rng(seed)
    prompts = S.canonical_prompts()
    pick = [prompts[i] for i in g.choice(len(prompts), size=n_prompts, replace=False)]
    tok = clip_tokenizer(CLIP_CONTEXT)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        t = model.encode_text(tok([p for p, _ in pick]), normalize=True)
    z = (0.5 * torch.randn((n_prompts, 3, size, size), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        x = torch.sigmoid(z)
        c = random_cutouts(x, cutn, CLIP_IMAGE_SIZE, gen)
        f = model.encode_image(_normalise(c), normalize=True).view(cutn, n_prompts, -1)
        loss = -(f * t[None]).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = torch.sigmoid(z)
        xs = torch.nn.functional.interpolate(x, size=(CLIP_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
        cos = (model.encode_image(_normalise(xs), normalize=True) * t).sum(-1).mean().item()
        real = S.to_tensor(S.render([S.Scene(*a) for _, a in pick], size))
        real = torch.nn.functional.interpolate(real, size=(CLIP_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
        cos_real = (model.encode_image(_normalise(real), normalize=True) * t).sum(-1).mean().item()
    for p in model.parameters():
        p.requires_grad_(True)
    verdicts = J.judge_batch(x.detach())
    acc = J.accuracy(verdicts, [a for _, a in pick])
    return {"all_three": acc["all"], "colour": acc["colour"], "shape": acc["shape"],
            "background": acc["background"], "cosine_optimised": cos, "cosine_real_scenes": cos_real,
            "steps": steps, "prompts": n_prompts, "cutouts": cutn, "size": size}


def train_clip(out_dir: Path, seed: int = 0, steps: int = 2000, batch: int = 128, n_neg: int = 24,
               n_adv: int = 16, adv_start: float = 0.2, lr: float = 1e-3, log_every: int = 100) -> dict:
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_clip()
    tok = clip_tokenizer(CLIP_CONTEXT)
    # pre-tokenise every caption
    all_caps = sorted({S.TEMPLATES[k].format(colour=c, shape=s, background=b)
                       for c in S.COLOUR_NAMES for s in S.SHAPES for b in S.BACKGROUNDS for k in range(len(S.TEMPLATES))
                       if b != c} | set(S.NEUTRAL_CAPTIONS))
    cap_index = {c: i for i, c in enumerate(all_caps)}
    cap_tokens = tok(all_caps)
    prompts = S.canonical_prompts()
    canon_tokens = cap_tokens[[cap_index[p] for p, _ in prompts]]
    neutral_tokens = cap_tokens[[cap_index[c] for c in S.NEUTRAL_CAPTIONS]]

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n_ or "logit_scale" in n_ else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    # persistent adversarial pool (pixel logits at CLIP resolution)
    pool_z = torch.randn((n_adv, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), generator=gen)
    pool_t = torch.randint(0, len(prompts), (n_adv,), generator=gen)
    pool_age = torch.zeros(n_adv, dtype=torch.long)
    adv_from = int(adv_start * steps)
    t0 = time.time()
    hist = []
    dropped_adv = 0
    for step in range(steps):
        model.train()
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr)
        scenes = S.sample_scenes(batch, rng=rng)
        tmpl = rng.integers(len(S.TEMPLATES), size=batch)
        caps = [S.caption(s, int(k)) for s, k in zip(scenes, tmpl)]
        real = _augment(S.to_tensor(S.render(scenes, 128)), gen)
        negs = S.to_tensor(S.render_distractors(n_neg, rng, 128))
        negs = _augment(negs, gen)
        imgs = [real, negs]
        if step >= adv_from and n_adv:
            # one attack step for every pool member, toward its target prompt
            model.eval()
            with torch.no_grad():
                tt = model.encode_text(canon_tokens[pool_t], normalize=True)
            z = pool_z.clone().requires_grad_(True)
            c = random_cutouts(torch.sigmoid(z), 2, CLIP_IMAGE_SIZE, gen)
            f = model.encode_image(_normalise(c), normalize=True).view(2, n_adv, -1)
            sim = (f * tt[None]).sum(-1).mean(0).sum()
            (gz,) = torch.autograd.grad(sim, z)
            with torch.no_grad():
                pool_z += 0.6 * gz / (gz.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12) * 0.1
                pool_age += 1
            model.train()
            adv = torch.sigmoid(pool_z)
            keep = []
            for i in range(n_adv):
                v = J.judge(adv[i])
                if v.all_match(*prompts[int(pool_t[i])][1]):
                    dropped_adv += 1  # genuinely became the prompt: not a negative
                else:
                    keep.append(i)
            if keep:
                a = adv[keep]
                imgs.append((a + 0.02 * torch.rand((), generator=gen) * torch.randn(a.shape, generator=gen)).clamp(0, 1))
            # recycle old members: restart from noise, a distractor or a real scene of other attributes
            old = (pool_age >= 40).nonzero().flatten().tolist()
            for i in old:
                r = rng.random()
                if r < 0.4:
                    pool_z[i] = torch.randn((3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), generator=gen) * 1.0
                else:
                    im = S.render_distractors(1, rng, CLIP_IMAGE_SIZE) if r < 0.7 else \
                        S.render(S.sample_scenes(1, rng=rng), CLIP_IMAGE_SIZE)
                    p01 = torch.from_numpy(im[0]).permute(2, 0, 1).float() / 255
                    pool_z[i] = torch.logit(p01.clamp(0.05, 0.95))
                pool_t[i] = int(torch.randint(0, len(prompts), (), generator=gen))
                pool_age[i] = 0
        x = torch.cat(imgs)
        n_real = real.shape[0]
        text = torch.cat([cap_tokens[[cap_index[c] for c in caps]], neutral_tokens])
        loss = _soft_contrastive_step(model, opt, x, text, scenes, tmpl, n_real)
        hist.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"clip step {step + 1}/{steps} loss {np.mean(hist[-log_every:]):.4f} "
                 f"scale {model.logit_scale.exp().item():.1f} adv_dropped {dropped_adv} "
                 f"{(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    model.eval()
    zs = clip_zero_shot(model, n=300)
    _log(f"clip zero-shot {zs}")
    rob = pixel_robustness(model)
    _log(f"clip pixel robustness {rob}")
    for p in model.parameters():
        p.requires_grad_(False)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {
        "kind": "open_clip", "model_name": "shapes-vit", "model_cfg": CLIP_CFG,
        "image_size": CLIP_IMAGE_SIZE, "context_length": CLIP_CONTEXT, "tokenizer": "open_clip ViT-B-32 (SimpleTokenizer)",
        "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "dtype": "float16",
        "metrics": {"zero_shot_300": zs, "pixel_robustness": rob},
        "training": {"steps": steps, "batch_real": batch, "batch_distractors": n_neg, "adversarial_pool": n_adv,
                     "adversarial_from_step": adv_from, "adversarial_dropped_as_genuine": dropped_adv,
                     "lr": lr, "seed": seed, "seconds": round(train_s, 1), "final_loss": float(np.mean(hist[-50:]))},
    }
    _save(out_dir, "shapes-clip", sd, meta)
    return meta


def load_clip_from(out_dir: Path):
    """Rebuild the CLIP from ``shapes-clip.json`` + ``.safetensors`` in ``out_dir`` (fp32)."""
    from safetensors.torch import load_file

    meta = json.loads((Path(out_dir) / "shapes-clip.json").read_text())
    model = build_clip(meta["model_cfg"])
    model.load_state_dict(load_file(str(Path(out_dir) / "shapes-clip.safetensors")))
    return model.float(), meta


def load_dvae_from(out_dir: Path):
    from safetensors.torch import load_file

    meta = json.loads((Path(out_dir) / "shapes-dvae.json").read_text())
    enc, dec = build_dvae(meta["encoder"], meta["decoder"])
    sd = load_file(str(Path(out_dir) / "shapes-dvae.safetensors"))
    enc.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("encoder.")})
    dec.load_state_dict({k[8:]: v for k, v in sd.items() if k.startswith("decoder.")})
    return enc, dec, meta


def finetune_clip_dvae_adversarial(out_dir: Path, seed: int = 0, steps: int = 300, batch: int = 96, n_neg: int = 16,
                                   n_adv: int = 12, tokens: int = 8, lr: float = 2e-4, recycle: int = 30,
                                   log_every: int = 25) -> dict:
    """Stage 2 of the CLIP: fine-tune against adversarial images made THROUGH the shipped dVAE decoder.

    A persistent pool of dVAE token-logit grids is pushed (one gradient-ascent step per training step,
    softmax relaxation -> decoder -> sigmoid -> unmap_pixels -> cutouts -> CLIP) toward random canonical
    prompts; the decoded images are fed back as negatives (neutral captions) unless the judge says they
    genuinely show the prompt.  Needs shapes-clip.* and shapes-dvae.* in ``out_dir``; rewrites shapes-clip.*.
    """
    import torch
    import torch.nn.functional as F
    from dall_e import unmap_pixels

    torch.manual_seed(seed + 3)
    gen = torch.Generator().manual_seed(seed + 3)
    rng = np.random.default_rng(seed + 3)
    model, meta = load_clip_from(out_dir)
    _, dec, _ = load_dvae_from(out_dir)
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    V = dec.vocab_size
    prompts = S.canonical_prompts()
    cap_index, cap_tokens = _caption_tokens()
    canon_tokens = cap_tokens[[cap_index[p] for p, _ in prompts]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    pool = torch.randn((n_adv, V, tokens, tokens), generator=gen)
    pool_t = torch.randint(0, len(prompts), (n_adv,), generator=gen)
    age = torch.randint(0, recycle, (n_adv,), generator=gen)
    t0 = time.time()
    hist, dropped = [], 0
    for step in range(steps):
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=20)
        # --- attack step through the decoder
        model.eval()
        with torch.no_grad():
            tt = model.encode_text(canon_tokens[pool_t], normalize=True)
        z = pool.clone().requires_grad_(True)
        img = unmap_pixels(torch.sigmoid(dec(F.softmax(z, dim=1))[:, :3].float()))
        c = random_cutouts(img, 2, CLIP_IMAGE_SIZE, gen)
        f = model.encode_image(_normalise(c), normalize=True).view(2, n_adv, -1)
        (gz,) = torch.autograd.grad((f * tt[None]).sum(-1).mean(0).sum(), z)
        with torch.no_grad():
            pool += 0.5 * gz / (gz.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12)
            age += 1
            adv = img.detach()
        keep = []
        for i in range(n_adv):
            if J.judge(adv[i]).all_match(*prompts[int(pool_t[i])][1]):
                dropped += 1
            else:
                keep.append(i)
        for i in (age >= recycle).nonzero().flatten().tolist():
            pool[i] = torch.randn((V, tokens, tokens), generator=gen) * float(1 + 2 * torch.rand((), generator=gen))
            pool_t[i] = int(torch.randint(0, len(prompts), (), generator=gen))
            age[i] = 0
        # --- contrastive step
        model.train()
        loss = _step_with_negatives(model, opt, adv[keep], batch, n_neg, rng, gen)
        hist.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"clip-ft step {step + 1}/{steps} loss {np.mean(hist[-log_every:]):.4f} dropped {dropped} "
                 f"adv-cos {(f * tt[None]).sum(-1).mean().item():.3f} {(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    zs, sd = _finish_clip(model, "clip-ft")
    rob = pixel_robustness(model)
    _log(f"clip-ft pixel robustness {rob}")
    meta = dict(meta)
    meta["metrics"] = {"zero_shot_300": zs, "pixel_robustness": rob,
                       "stage1": meta.get("metrics")}
    meta["finetune_dvae_adversarial"] = {"steps": steps, "batch_real": batch, "batch_distractors": n_neg,
                                         "pool": n_adv, "tokens": tokens, "lr": lr, "recycle": recycle,
                                         "dropped_as_genuine": dropped, "seed": seed, "seconds": round(train_s, 1),
                                         "trained_by": _COMMAND[0]}
    _save(out_dir, "shapes-clip", sd, meta)
    return meta


def unevaluated_tuning_prompts() -> list:
    """Tuning prompts 32-83: never a held-out prompt, nor the tuning prompts 0-31 that the ablations evaluate."""
    from .quality import prompt_split

    return prompt_split()[0][32:]


# The CLIP stages trained against the generation loop, as data (keyword arguments of finetune_clip_generation):
# clipgen (second round): short rounds of the preset with a fixed pyramid, every step, plain contrastive steps;
# cliploop (eighth round): whole default runs from the step where shapes form, with the robust stage's attack, its
# frame-cut negatives and a replay of earlier images, on prompts no ablation evaluates.
LOOP_RECIPES = {
    "clipgen": {"record": "finetune_generation", "offset": 5, "seed_base": 0, "prompts": S.canonical_prompts,
                "rounds_of": 80, "guide_pyramid": (2, 4), "from_step": 1, "eps": 0.0, "frame_cut": 0, "replay": 0},
    "cliploop": {"record": "finetune_loop", "offset": 23, "seed_base": 1000, "prompts": unevaluated_tuning_prompts,
                 "rounds_of": None, "guide_pyramid": None, "from_step": 100, "eps": 0.5, "frame_cut": 16, "replay": 8},
}
REPLAY_KEEP = 400  # images the replay keeps (the latest)


def finetune_clip_generation(out_dir: Path, seed: int = 0, steps: int = 200, batch: int = 64, n_neg: int = 16,
                             pool: int = 8, lr: float = 1e-4, log_every: int = 20, recipe: str = "clipgen",
                             **overrides) -> dict:
    """Experimental stages of the CLIP (not in the shipped run): fine-tune against the images of
    clipguide's own generation loop.

    ``pool`` runs of the default preset (with ``guide_pyramid``, None: the preset's; prompts from ``prompts()``, the
    shipped dVAE, THIS CLIP as the guide) are optimised by :func:`clipguide.optimise` in rounds of ``rounds_of`` steps
    (None: the preset's); at every generation step from ``from_step`` on, the CLIP takes one soft-contrastive training
    step in which the runs' current images are negatives (neutral captions) unless the judge says they show their
    prompt, with ``frame_cut`` frame-cut scenes, ``replay`` earlier images and, if ``eps``, the robust stage's attack.
    The guide and the model being trained are the same object, so the attack follows the training
    (a discriminator trained on its generator's samples, as in GANs, Goodfellow et al. 2014).
    ``recipe``: a row of :data:`LOOP_RECIPES`, whose fields ``overrides`` may change; recorded under its ``record``.
    The loop encodes its prompts once per round, so within a round it follows the text tower of the round's start.
    Needs shapes-clip.* and shapes-dvae.* in ``out_dir``; rewrites shapes-clip.*.
    """
    import torch

    from ..clip import load_clip
    from ..decoders import load_decoder
    from ..optimise import optimise
    from ..presets import get_preset

    rc = dict(LOOP_RECIPES[recipe], **overrides)
    torch.manual_seed(seed + rc["offset"])
    gen = torch.Generator().manual_seed(seed + rc["offset"])
    rng = np.random.default_rng(seed + rc["offset"])
    clip = load_clip(str(Path(out_dir) / "shapes-clip.json"))
    model, meta = clip.model, json.loads((Path(out_dir) / "shapes-clip.json").read_text())
    decoder = load_decoder(str(Path(out_dir) / "shapes-dvae.json"))
    prompts = rc["prompts"]()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    adversary = l2_adversary(rc["eps"], 1, generator=gen) if rc["eps"] else None
    t0, hist, counts, replay = time.time(), [], {"dropped": 0, "step": 0}, []

    def train_on(state):
        k = counts["step"]
        if state.step < rc["from_step"] or k >= steps:
            return
        for gp in opt.param_groups:
            gp["lr"] = _lr(k, steps, lr, warmup=10)
        images, targets = state.image(), [prompts[i][1] for i in chosen]
        keep = [i for i, t in enumerate(targets) if not J.judge(images[i]).all_match(*t)]
        counts["dropped"] += len(targets) - len(keep)
        negatives = [images[keep]]
        if replay:  # earlier steps' and rounds' images too, so that the CLIP does not forget them (Shrivastava et al. 2017)
            negatives.append(torch.stack([replay[i] for i in rng.choice(len(replay), min(rc["replay"], len(replay)), replace=False)]))
        if rc["replay"]:
            replay[:] = (replay + [images[i].clone() for i in keep])[-REPLAY_KEEP:]
        if rc["frame_cut"]:
            negatives.insert(0, S.to_tensor(S.render_frame_cut(rc["frame_cut"], rng, 128)))
        model.requires_grad_(True).train()
        hist.append(_step_with_negatives(model, opt, torch.cat(negatives), batch, n_neg, rng, gen,
                                         adversary=adversary).item())
        model.requires_grad_(False).eval()
        clip.forget_texts()  # the text tower moved
        counts["step"] = k + 1
        if counts["step"] % log_every == 0 or counts["step"] == steps:
            _log(f"clip-gen step {counts['step']}/{steps} loss {np.mean(hist[-log_every:]):.4f} "
                 f"guide sim {float(state.similarity.mean()):.3f} dropped {counts['dropped']} "
                 f"{(time.time() - t0) / counts['step']:.3f}s/step")

    base = get_preset("shapes")
    rounds_of = min(rc["rounds_of"] or base.steps, steps)
    pyramid = rc["guide_pyramid"]
    base = base.replace(steps=rounds_of, **({"pyramid": pyramid} if pyramid is not None else {}))
    for r in range(math.ceil(steps / (rounds_of - max(rc["from_step"], 1) + 1))):  # callbacks see steps 0..rounds_of
        chosen = rng.choice(len(prompts), size=pool, replace=False).tolist()
        cfg = base.replace(prompts=tuple(prompts[i][0] for i in chosen), seed=int(rc["seed_base"] + seed * 1000 + r * pool))
        optimise(cfg, decoder, clip, train_on)
    train_s = time.time() - t0
    zs, sd = _finish_clip(model, "clip-gen")
    meta["metrics"] = dict(meta.get("metrics", {}), zero_shot_300=zs,
                           before_generation_finetune=meta.get("metrics", {}).get("zero_shot_300"))
    meta[rc["record"]] = {"steps": steps, "batch_real": batch, "batch_distractors": n_neg, "pool": pool,
                          "rounds_of": rounds_of, "lr": lr, "dropped_as_genuine": counts["dropped"],
                          "guide": "the 'shapes' preset" + (f" with pyramid {list(pyramid)}" if pyramid is not None else ""),
                          **{k: rc[k] for k in ("from_step", "eps", "frame_cut", "replay")}, "seed": seed,
                          "seconds": round(train_s, 1), "trained_by": _COMMAND[0]}
    _save(out_dir, "shapes-clip", sd, meta)
    return meta


def finetune_clip_loop(out_dir: Path, seed: int = 0, steps: int = 400, **kw) -> dict:
    """Experimental CLIP stage (not shipped): the ``cliploop`` recipe of :func:`finetune_clip_generation`."""
    return finetune_clip_generation(out_dir, seed=seed, steps=steps, recipe="cliploop", **kw)


def finetune_clip_frame(out_dir: Path, seed: int = 0, steps: int = 150, batch: int = 64, n_neg: int = 16,
                        n_cut: int = 16, lr: float = 1e-4, log_every: int = 25) -> dict:
    """A shipped CLIP stage: fine-tune with shapes cut by the frame as negatives.

    The CLIP's training crops (80-100 % of the side) show shapes cut by the frame under their captions,
    so the generation loop is not pushed away from the frame. Each step adds ``n_cut`` scenes whose shape
    crosses an edge (:func:`~clipguide.shapes.scenes.render_frame_cut`) to the neutral-caption negatives.
    Needs shapes-clip.* in ``out_dir``; rewrites it.
    """
    return _finetune_clip_with_negatives(
        out_dir, "frame", lambda rng: (S.render_frame_cut(n_cut, rng, 128), ()), seed, 11, steps, batch, n_neg, lr,
        log_every, frame_cut=n_cut)


def finetune_clip_near(out_dir: Path, seed: int = 0, steps: int = 400, batch: int = 64, n_neg: int = 16,
                       n_near: int = 32, n_cut: int = 8, lr: float = 3e-4, log_every: int = 25) -> dict:
    """Experimental CLIP stage 4 (not shipped): fine-tune with near misses of the scenes as negatives.

    The generation loop's failures are blobs of the right colours whose outline is almost the shape:
    wavy, with a bump or a bite, stretched, or with stray pieces, which the CLIP rated as high as the
    real scene. Each step adds ``n_near`` such near misses
    (:func:`~clipguide.shapes.scenes.render_near_miss`) and ``n_cut`` frame-cut scenes (so that the
    previous stage is not forgotten) to the neutral-caption negatives. Needs shapes-clip.* in
    ``out_dir``; rewrites it.
    """
    def negatives(rng):
        near, scenes = S.render_near_miss(n_near, rng, 128)
        return np.concatenate([near, S.render_frame_cut(n_cut, rng, 128)]), scenes

    return _finetune_clip_with_negatives(out_dir, "near", negatives, seed, 13, steps, batch, n_neg, lr, log_every,
                                         near_miss=n_near, frame_cut=n_cut)


def finetune_clip_robust(out_dir: Path, seed: int = 0, steps: int = 600, batch: int = 64, n_neg: int = 16,
                         n_cut: int = 16, lr: float = 1e-4, eps: float = 0.5, attack_steps: int = 1, polish_steps: int | None = None,
                         log_every: int = 25) -> dict:
    """A shipped CLIP stage: adversarial fine-tuning, so that the CLIP's input gradients are perceptually aligned.

    Every batch (scenes, distractors and frame-cut shapes, as in clipframe) is trained on twice: as it is and as its
    adversarial images within an L2 ball of radius ``eps`` at the CLIP's 64 px input (:func:`l2_adversary`,
    ``attack_steps`` steps).  Without it the loop's gradient is largely an adversarial direction: optimising
    pixels against the CLIP gives coloured noise, and through the decoder the search settles in layouts the CLIP itself
    reads as another prompt (a white background for "... on a purple background").  The attack costs the CLIP some of
    its sense of shape (zero-shot shape 0.993 -> 0.981 on 3000 scenes for 605 steps at eps 0.5), so ``polish_steps``
    clean steps of the same recipe follow, with a fresh optimiser; they bring it back and keep most of the robustness.
    Needs shapes-clip.* in ``out_dir``; rewrites it.
    """
    def negatives(rng):
        return S.render_frame_cut(n_cut, rng, 128), ()

    polish_steps = ROBUST_POLISH_STEPS if polish_steps is None else polish_steps
    attack = {"eps": eps, "steps": attack_steps, "step_size": 1.25 if attack_steps == 1 else 2.5 / attack_steps}
    meta = _finetune_clip_with_negatives(out_dir, "robust", negatives, seed, 17, steps, batch, n_neg, lr, log_every,
                                         attack=attack, measure_robustness=not polish_steps, frame_cut=n_cut)
    if polish_steps:
        meta = _finetune_clip_with_negatives(out_dir, "robust_polish", negatives, seed, 19, polish_steps, batch, n_neg, lr,
                                             log_every, measure_robustness=True, frame_cut=n_cut)
    return meta


def _finetune_clip_with_negatives(out_dir: Path, name: str, negatives, seed: int, offset: int, steps: int, batch: int, n_neg: int,
                                  lr: float, log_every: int, attack: dict | None = None, measure_robustness: bool = False,
                                  **record) -> dict:
    """Fine-tune the CLIP in ``out_dir`` with ``negatives(rng)`` -> (uint8 images, the scenes they spoil)
    added to each step's neutral-caption negatives; records the run under ``finetune_{name}`` and rewrites the CLIP.
    ``attack``: keyword arguments of :func:`l2_adversary`, for adversarial training on every batch;
    ``measure_robustness``: re-measure the pixel robustness check (the robust stage's purpose) at the end.
    Randomness is seeded by ``seed + offset`` (each stage its own offset)."""
    import torch

    torch.manual_seed(seed + offset)
    gen = torch.Generator().manual_seed(seed + offset)
    rng = np.random.default_rng(seed + offset)
    model, meta = load_clip_from(out_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)
    before = meta.get("metrics", {}).get("zero_shot_300")
    adversary = l2_adversary(**attack, generator=gen) if attack else None
    t0, hist = time.time(), []
    model.train()
    for step in range(steps):
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=10)
        imgs, paired = negatives(rng)
        hist.append(_step_with_negatives(model, opt, S.to_tensor(imgs), batch, n_neg, rng, gen, paired, adversary).item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"clip-{name} step {step + 1}/{steps} loss {np.mean(hist[-log_every:]):.4f} "
                 f"{(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    zs, sd = _finish_clip(model, f"clip-{name}")
    meta["metrics"] = dict(meta.get("metrics", {}), zero_shot_300=zs, **{f"before_{name}_finetune": before})
    if measure_robustness:  # what adversarial training is for: re-measure the pixel-space robustness check
        meta["metrics"]["before_robust_pixel_robustness"] = meta["metrics"].get("pixel_robustness")
        meta["metrics"]["pixel_robustness"] = pixel_robustness(model)
        _log(f"clip-{name} pixel robustness {meta['metrics']['pixel_robustness']}")
    meta[f"finetune_{name}"] = {"steps": steps, "batch_real": batch, "batch_distractors": n_neg, **record,
                                **({"attack": attack} if attack else {}), "lr": lr, "seed": seed, "seconds": round(train_s, 1),
                                "trained_by": _COMMAND[0]}
    _save(out_dir, "shapes-clip", sd, meta)
    return meta


# ============================================================================ dVAE
def build_dvae(enc_cfg: dict | None = None, dec_cfg: dict | None = None):
    from dall_e import Decoder, Encoder

    import torch

    enc = Encoder(**(enc_cfg or DVAE_ENCODER), device=torch.device("cpu"), requires_grad=False,
                  use_mixed_precision=False)
    dec = Decoder(**(dec_cfg or DVAE_DECODER), device=torch.device("cpu"), requires_grad=False,
                  use_mixed_precision=False)
    return enc, dec


def _random_crops(x, crop: int, gen):
    import torch

    if crop >= x.shape[-1]:
        return x
    n, side = x.shape[0], x.shape[-1]
    oy = torch.randint(0, side - crop + 1, (n,), generator=gen)
    ox = torch.randint(0, side - crop + 1, (n,), generator=gen)
    return torch.stack([x[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(n)])


def dvae_reconstruct(enc, dec, x):
    """Hard-token reconstruction (argmax codes -> one-hot -> decoder -> sigmoid -> unmap_pixels); returns (img, codes)."""
    import torch
    from dall_e import map_pixels, unmap_pixels

    with torch.no_grad():
        z = enc(map_pixels(x)).argmax(1)
        oh = torch.nn.functional.one_hot(z, enc.vocab_size).permute(0, 3, 1, 2).float()
        out = dec(oh).float()
        return unmap_pixels(torch.sigmoid(out[:, :3])), z


def _psnr(a, b) -> float:
    import torch

    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def _eval_recon(fn, n: int = 200, seed: int = 4242, batch: int = 25) -> dict:
    import torch

    scenes = S.sample_scenes(n, seed)
    psnrs, verdicts, codes = [], [], set()
    for i in range(0, n, batch):
        x = S.to_tensor(S.render(scenes[i:i + batch], 128))
        r, z = fn(x)
        psnrs.append(_psnr(r, x))
        codes.update(torch.unique(z).tolist())
        verdicts += J.judge_batch(r)
    acc = J.accuracy(verdicts, [s.attributes for s in scenes])
    return {"psnr_db": float(np.mean(psnrs)), "codes_used": len(codes), "judge_on_reconstructions": acc,
            "scenes": n}


def train_dvae(out_dir: Path, seed: int = 0, steps: int = 1000, batch: int = 8, crop: int = 48, lr: float = 2e-3,
               kl_weight: float = 5e-4, div_weight: float = 0.05, hard_frac: float = 0.15,
               log_every: int = 50) -> dict:
    import torch
    import torch.nn.functional as F
    from dall_e import map_pixels

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    enc, dec = build_dvae()
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    V = enc.vocab_size
    t0 = time.time()
    hist = []
    hard_from = int((1 - hard_frac) * steps)
    for step in range(steps):
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=50)
        tau = float(np.exp(np.log(1.0) + (np.log(1 / 16) - np.log(1.0)) * min(1.0, step / max(1, hard_from))))
        x = _random_crops(S.to_tensor(S.render(S.sample_scenes(batch, rng=rng), 128)), crop, gen)
        logits = enc(map_pixels(x))
        u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1 - 1e-10)
        y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
        if step >= hard_from:  # straight-through hard codes at the end: the decoder learns exact one-hots
            hard = F.one_hot(y.argmax(1), V).permute(0, 3, 1, 2).float()
            y = hard + y - y.detach()
        out = dec(y)
        rec = torch.sigmoid(out[:, :3])
        target = map_pixels(x)
        l_rec = F.mse_loss(rec, target) + 0.5 * F.l1_loss(rec, target)
        q = F.softmax(logits, dim=1)
        logq = F.log_softmax(logits, dim=1)
        kl = (q * (logq + math.log(V))).sum(1).mean()  # KL(q || uniform) per position
        qbar = q.mean(dim=(0, 2, 3))
        div = math.log(V) + (qbar * torch.log(qbar + 1e-10)).sum()  # KL(mean q || uniform): codebook usage
        loss = l_rec + kl_weight * kl + div_weight * div
        _descend(opt, loss, params)
        hist.append(l_rec.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"dvae step {step + 1}/{steps} rec {np.mean(hist[-log_every:]):.5f} tau {tau:.3f} "
                 f"kl {kl.item():.3f} perplexity {math.exp(-(qbar * torch.log(qbar + 1e-10)).sum().item()):.1f} "
                 f"{(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    ev, sd = _finish_dvae(enc, dec, "dvae")
    meta = {"kind": "dall_e", "encoder": DVAE_ENCODER, "decoder": DVAE_DECODER, "image_size": 128, "tokens": 16,
            "downsample": 8, "dtype": "float32", "metrics": ev,
            "training": {"steps": steps, "batch": batch, "crop": crop, "lr": lr, "kl_weight": kl_weight,
                         "usage_weight": div_weight, "tau": "1 -> 1/16 exponential, then straight-through hard",
                         "hard_from_step": hard_from, "loss": "MSE + 0.5 L1 of sigmoid(out[:3]) vs map_pixels(x)",
                         "seed": seed, "seconds": round(train_s, 1)}}
    _save(out_dir, "shapes-dvae", sd, meta)
    return meta


def finetune_dvae(out_dir: Path, seed: int = 0, steps: int = 1200, batch: int = 8, crop: int = 64, lr: float = 5e-4,
                  tau: float = 1 / 16, edge_weight: float = 3.0, log_every: int = 50) -> dict:
    """Stage 2 of the dVAE: continue from shapes-dvae.* with hard straight-through codes (forward = one-hot
    argmax of the Gumbel sample, backward through the tau-softmax), larger crops, and a reconstruction loss
    weighted up near edges (sharper corners and triangle tips).  Rewrites shapes-dvae.*."""
    import torch
    import torch.nn.functional as F
    from dall_e import map_pixels

    torch.manual_seed(seed + 4)
    gen = torch.Generator().manual_seed(seed + 4)
    rng = np.random.default_rng(seed + 4)
    enc, dec, meta = load_dvae_from(out_dir)
    params = list(enc.parameters()) + list(dec.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    V = enc.vocab_size
    t0 = time.time()
    hist = []
    for step in range(steps):
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=20)
        x = _random_crops(S.to_tensor(S.render(S.sample_scenes(batch, rng=rng), 128)), crop, gen)
        logits = enc(map_pixels(x))
        u = torch.rand(logits.shape, generator=gen).clamp_(1e-10, 1 - 1e-10)
        y = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=1)
        y = F.one_hot(y.argmax(1), V).permute(0, 3, 1, 2).float() + y - y.detach()
        rec = torch.sigmoid(dec(y)[:, :3])
        target = map_pixels(x)
        # edge weight: pixels within 2 px of a colour change
        g = (F.max_pool2d(x, 5, 1, 2) + F.max_pool2d(-x, 5, 1, 2)).amax(1, keepdim=True) > 0.02
        w = 1 + edge_weight * g.float()
        err = (rec - target)
        l_rec = (w * (err ** 2 + 0.5 * err.abs())).mean() / w.mean()
        q = F.softmax(logits, dim=1)
        qbar = q.mean(dim=(0, 2, 3))
        div = math.log(V) + (qbar * torch.log(qbar + 1e-10)).sum()
        loss = l_rec + 0.02 * div
        _descend(opt, loss, params)
        hist.append(l_rec.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"dvae-ft step {step + 1}/{steps} rec {np.mean(hist[-log_every:]):.5f} "
                 f"{(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    ev, sd = _finish_dvae(enc, dec, "dvae-ft")
    meta = dict(meta)
    meta["metrics"] = dict(ev, stage1=meta.get("metrics"))
    meta["finetune_hard"] = {"steps": steps, "batch": batch, "crop": crop, "lr": lr, "tau": tau,
                             "edge_weight": edge_weight, "seed": seed, "seconds": round(train_s, 1),
                             "trained_by": _COMMAND[0],
                             "loss": "edge-weighted MSE + 0.5 L1, straight-through hard codes, 0.02 usage term"}
    _save(out_dir, "shapes-dvae", sd, meta)
    return meta


# ============================================================================ VQGAN
def build_vqgan(ddconfig: dict | None = None, n_embed: int = VQGAN_N_EMBED, embed_dim: int = VQGAN_EMBED_DIM):
    import torch
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
    from safetensors.torch import load_file

    meta = json.loads((Path(out_dir) / "shapes-vqgan.json").read_text())
    m = build_vqgan(meta["ddconfig"], meta["n_embed"], meta["embed_dim"])
    m.load_state_dict(load_file(str(Path(out_dir) / "shapes-vqgan.safetensors")))
    return m, meta


def vqgan_reconstruct(m, x):
    import torch

    with torch.no_grad():
        h = m.quant_conv(m.encoder(x * 2 - 1))
        zq, _, (_, _, idx) = m.quantize(h)
        r = m.decoder(m.post_quant_conv(zq))
        return ((r + 1) / 2).clamp(0, 1), idx


def train_vqgan(out_dir: Path, seed: int = 0, steps: int = 600, batch: int = 8, crop: int = 64, lr: float = 1e-3, full_frac: float = 0.2,
                restart_every: int = 25, log_every: int = 50, resume: bool = False) -> dict:
    """VQGAN from taming modules; ``resume=True`` (stage "vqganft") continues from shapes-vqgan.* in out_dir."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed + (5 if resume else 0))
    gen = torch.Generator().manual_seed(seed + (7 if resume else 2))
    rng = np.random.default_rng(seed + (7 if resume else 2))
    m, prev = load_vqgan_from(out_dir) if resume else (build_vqgan(), None)
    if resume:
        for p_ in m.parameters():
            p_.requires_grad_(True)
    opt = torch.optim.Adam(m.parameters(), lr=lr, betas=(0.5, 0.9))
    usage = torch.zeros(VQGAN_N_EMBED)
    t0 = time.time()
    hist = []
    restarted = 0
    full_from = int((1 - full_frac) * steps)
    for step in range(steps):
        for gp in opt.param_groups:
            gp["lr"] = _lr(step, steps, lr, warmup=50)
        if step < full_from:
            x = _random_crops(S.to_tensor(S.render(S.sample_scenes(batch, rng=rng), 128)), crop, gen)
        else:  # finish on full 128 px images (GroupNorm statistics as at inference), same pixel count per step
            nb = max(1, batch * crop * crop // (128 * 128))
            x = S.to_tensor(S.render(S.sample_scenes(nb, rng=rng), 128))
        h = m.quant_conv(m.encoder(x * 2 - 1))
        if step == 0 and not resume:  # data-dependent codebook init (the default +-1/n_e init collapses)
            flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            pick = torch.randint(0, flat.shape[0], (VQGAN_N_EMBED,), generator=gen)
            with torch.no_grad():
                m.quantize.embedding.weight.copy_(flat[pick] + 0.01 * flat.std() * torch.randn(
                    (VQGAN_N_EMBED, flat.shape[1]), generator=gen))
        zq, l_q, (_, _, idx) = m.quantize(h)
        r = m.decoder(m.post_quant_conv(zq))
        xt = x * 2 - 1
        l_rec = F.mse_loss(r, xt) + 0.5 * F.l1_loss(r, xt)
        loss = l_rec + l_q
        _descend(opt, loss, m.parameters())
        usage += torch.bincount(idx.flatten(), minlength=VQGAN_N_EMBED).float()
        hist.append(l_rec.item())
        if restart_every and (step + 1) % restart_every == 0 and step < 0.8 * steps:
            dead = (usage == 0).nonzero().flatten()
            if len(dead):  # restart dead codes at random encoder outputs of this batch
                flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
                pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen)
                with torch.no_grad():
                    m.quantize.embedding.weight[dead] = flat[pick] + 0.01 * flat.std() * torch.randn(
                        (len(dead), flat.shape[1]), generator=gen)
                restarted += len(dead)
            usage.zero_()
        if (step + 1) % log_every == 0 or step == steps - 1:
            _log(f"vqgan step {step + 1}/{steps} rec {np.mean(hist[-log_every:]):.5f} q {l_q.item():.4f} "
                 f"restarted {restarted} {(time.time() - t0) / (step + 1):.3f}s/step")
    train_s = time.time() - t0
    m.eval()
    ev = _eval_recon(lambda x: vqgan_reconstruct(m, x))
    _log(f"vqgan eval {ev}")
    for p in m.parameters():
        p.requires_grad_(False)
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    if resume:
        meta = dict(prev)
        meta["metrics"] = dict(ev, stage1=prev.get("metrics"))
        meta["finetune"] = {"steps": steps, "batch": batch, "crop": crop, "full_128px_from_step": full_from, "lr": lr,
                            "dead_code_restarts": restarted, "seed": seed, "seconds": round(train_s, 1),
                            "trained_by": _COMMAND[0]}
        _save(out_dir, "shapes-vqgan", sd, meta)
        return meta
    meta = {"kind": "taming", "ddconfig": VQGAN_DDCONFIG, "n_embed": VQGAN_N_EMBED, "embed_dim": VQGAN_EMBED_DIM,
            "quantizer": "VectorQuantizer2(beta=0.25, legacy=False)", "pixel_range": "[-1, 1]", "image_size": 128,
            "tokens": 16, "downsample": 8, "dtype": "float32", "metrics": ev,
            "training": {"steps": steps, "batch": batch, "crop": crop, "full_128px_from_step": full_from,
                         "lr": lr, "dead_code_restarts": restarted,
                         "loss": "MSE + 0.5 L1 (pixels in [-1,1]) + VQ loss", "seed": seed,
                         "seconds": round(train_s, 1)}}
    _save(out_dir, "shapes-vqgan", sd, meta)
    return meta


def _shipped_reconstruction(out_dir: Path, name: str):
    """(reconstruct function, meta) of the shipped decoder ``name`` ("dvae" or "vqgan") in ``out_dir``."""
    if name == "dvae":
        enc, dec, meta = load_dvae_from(out_dir)
        enc.eval(), dec.eval()
        return (lambda x: dvae_reconstruct(enc, dec, x)), meta
    m, meta = load_vqgan_from(out_dir)
    m.eval()
    return (lambda x: vqgan_reconstruct(m, x)), meta


def rejudge_decoders(out_dir: Path, scenes: int = 200) -> dict:
    """Re-measure the decoders in ``out_dir`` with the current pixel judge (no training) and update their
    metrics in place, keeping the first judge figures under ``judge_on_reconstructions_earlier_judge``.
    Run after a change to :mod:`clipguide.shapes.judge`; the weights are not touched."""
    res = {}
    for name in ("dvae", "vqgan"):
        path = Path(out_dir) / f"shapes-{name}.json"
        if not path.exists():
            continue
        reconstruct, meta = _shipped_reconstruction(out_dir, name)
        old = meta["metrics"]
        new = _eval_recon(reconstruct, n=scenes)["judge_on_reconstructions"]
        meta["metrics"] = dict(old, judge_on_reconstructions=new, judge_on_reconstructions_earlier_judge=old.get(
            "judge_on_reconstructions_earlier_judge", old["judge_on_reconstructions"]))
        _log(f"{name} re-judged: {old['judge_on_reconstructions']} -> {new}")
        path.write_text(json.dumps(meta, indent=1) + "\n")
        res[name] = meta["metrics"]
    return res


# ============================================================================ I/O + card
def _save(out_dir: Path, name: str, state: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("trained_by", _COMMAND[0])
    save_file(state, str(out_dir / f"{name}.safetensors"))
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    _log(f"wrote {out_dir / name}.safetensors ({(out_dir / f'{name}.safetensors').stat().st_size / 1e6:.2f} MB)")


_COMMAND = ["python -m clipguide.shapes.train"]


NOTES = """\
- Timings are wall-clock on a 2-core VM shared with two other engineers' jobs (load average 4-6), one torch
  thread per process, two processes at a time.  The step budgets were sized from speeds measured on a quieter
  machine to 18 + 10 + 8 = 36 min for the three parallel pairs; the shipped run took 53 min wall end to end
  (14:21-15:15, including a 3-minute pause to fix the VQGAN codebook init) because every step ran 1.5-3x slower
  under the other jobs' load.  The later CLIP stages (clipframe 1 min, cliprobust 11 min at the reference
  speed, 605 adversarial + 150 clean steps) were run afterwards; on the two-chain schedule above the whole run is
  41 min at the reference speed, and the per-stage timings recorded here add up to about 56 min on that schedule
  under load.
- CLIP: zero-shot accuracy meets the target, but optimising raw pixels still fools it completely (see the
  robustness line): hard negatives and adversarial mining move the failure, they do not remove it in this budget.
- Ad-hoc check through the decoder (not run by this module): 12 canonical prompts, shipped CLIP + dVAE,
  12x12 token logits randn-initialised, softmax relaxation, 4 cutouts, AdamW lr 0.1, 100 steps, argmax decode:
  0/12 judged right (CLIP cosine 0.53 vs ~0.68 for real scenes) - the images are still colour mosaics at that point.
- dVAE: circles and squares reconstruct well; triangles come back with rounded corners.  The first judge fitted a
  sharp triangle and rejected most of them (shape 0.635 on reconstructions); the judge now fits a triangle whose
  corners may be rounded up to 0.15 of its side (its IoU threshold, 0.85, is unchanged; rendered scenes and the
  distractor kinds are judged as before, see the tests) and reads 0.91 of the reconstructions right.
- VQGAN: under-trained; with ~10+5 minutes of 1 loaded thread its reconstructions are far from usable (see its
  metrics).  It loads and runs through exactly the taming code path, which is what the tests and the generation
  code exercise, but do not expect CLIP-guided VQGAN generations in the shapes world to be judged right.
"""


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _last_clip_stage(name: str, n: int = 3, last: bool = True, robust: str = "2") -> str:
    """Model-card head of a CLIP fine-tune run after clipft (clipframe and cliprobust, shipped; clipgen, clipnear,
    experimental); ``robust`` names the stage that measured the card's pixel robustness line."""
    after = "the zero-shot numbers above are after it; " if last else ""
    return f"- stage {n} ({name}, {after}the pixel robustness line is from stage {robust}): "


def write_model_card(out_dir: Path) -> Path:
    """(Re)write MODEL_CARD.md from the json files present in ``out_dir``."""
    out_dir = Path(out_dir)
    metas = {}
    for k in KINDS:
        p = out_dir / f"shapes-{k}.json"
        if p.exists():
            metas[k] = json.loads(p.read_text())
    files = sorted(out_dir.glob("shapes-*.*"))
    total = sum(f.stat().st_size for f in files)
    L = ["# Shapes-world models", "",
         "Tiny models trained by the project on its procedural shapes world (`clipguide.shapes.scenes`: one filled",
         "circle / square / upright triangle, 8 colours, flat background of another colour, 128 px, size 30-70 % of",
         "the side).  No pretrained weights and no external data.  Every number below was measured by",
         "`clipguide.shapes.train` at the end of training (also stored under `metrics` in each json); the judge is",
         "the pixel judge `clipguide.shapes.judge` (no neural network; it demands one coherent blob).", "",
         "Reproduce (step budgets are fixed, so results are deterministic for a seed and thread count):", "",
         "```",
         "T='python -m clipguide.shapes.train --threads 1 --only'",
         "$T clip & ($T dvae && $T dvaeft); wait",
         "($T vqgan && $T vqganft) & ($T clipft && $T clipframe && $T cliprobust); wait",
         "```",
         "(two lines of two parallel chains: 18 | 14 + 6 min, then 10 + 5 | 8 + 1 + 12 min at the reference speed,",
         "41 min in all on 2 cores; the shipped stages ran one or two at a time on a loaded machine, see the timings",
         "below and the limitations.)",
         "(`clipguide train-shapes ARGS` is the same; with no `--only` all eight stages run one after another in",
         "one process.  Stages: clip = contrastive CLIP; dvae = Gumbel-softmax dVAE; dvaeft = dVAE continued with",
         "hard straight-through codes and an edge-weighted loss; vqgan; vqganft = VQGAN continued; clipft = CLIP",
         "fine-tuned against adversarial images decoded by the shipped dVAE; clipframe = CLIP fine-tuned with",
         "shapes cut by the frame as negatives; cliprobust = CLIP then fine-tuned adversarially (every batch also",
         "trained on as its L2 pixel-space adversarial version, Madry et al. 2018 / Wong et al. 2020), so that its",
         "image gradients point at what a prompt looks like, as robust models' do (Santurkar et al. 2019).)", "",
         f"Shipped files ({total / 1e6:.2f} MB in total):", ""]
    L += [f"- `{f.name}`: {f.stat().st_size / 1e6:.2f} MB" for f in files] + [""]
    if "clip" in metas:
        m = metas["clip"]
        zs, rob, tr = m["metrics"]["zero_shot_300"], m["metrics"]["pixel_robustness"], m["training"]
        L += ["## shapes-clip (open_clip CLIP, `shapes-vit`)", "",
              f"- architecture: `{json.dumps(m['model_cfg'])}`; standard open_clip BPE tokenizer, context length "
              f"{m['context_length']}; weights stored as {m.get('dtype')}; OpenAI CLIP mean/std.",
              "- training: contrastive with soft targets (a caption is positive for every image whose attributes it",
              "  matches), 6 caption templates, per-image random crop 80-100 % + resize to 64 px + Gaussian noise;",
              f"  {tr['batch_real']} scenes + {tr['batch_distractors']} hard negatives per step (mosaics, noise, "
              "several shapes, textured shapes, speckles, irregular blobs, stripes) captioned with neutral captions",
              f"  ({', '.join(repr(c) for c in S.NEUTRAL_CAPTIONS)});",
              f"  from step {tr['adversarial_from_step']} a persistent pool of {tr['adversarial_pool']} adversarial "
              "images (one pixel-space gradient-ascent step per training step toward a random canonical prompt, "
              "recycled every 40 steps) is fed back as negatives unless the judge says it genuinely shows the prompt "
              f"({tr['adversarial_dropped_as_genuine']} such drops).",
              f"- {tr['steps']} steps, AdamW lr {tr['lr']} cosine, seed {tr['seed']}, 1 thread: "
              f"{tr['seconds'] / 60:.1f} min (on a shared, loaded 2-core machine).",
              f"- zero-shot accuracy on 300 fresh scenes (argmax over all 168 canonical prompts): colour "
              f"{_fmt(zs['colour'])}, shape {_fmt(zs['shape'])}, background {_fmt(zs['background'])}, all three "
              f"{_fmt(zs['all'])}; distractor images whose best caption is a neutral one: "
              f"{_fmt(zs['distractors_called_neutral'])}.",
              f"- pixel-space robustness check (raw sigmoid-parametrised {rob['size']} px images, Adam, "
              f"{rob['cutouts']} cutouts 80-100 %, {rob['steps']} steps, {rob['prompts']} canonical prompts): the judge "
              f"finds all three attributes in {_fmt(rob['all_three'])} of the optimised images (colour "
              f"{_fmt(rob['colour'])}, shape {_fmt(rob['shape'])}, background {_fmt(rob['background'])}); CLIP cosine "
              f"of the optimised images {_fmt(rob['cosine_optimised'])} vs {_fmt(rob['cosine_real_scenes'])} for real "
              "scenes of the same prompts.  Pixel space is a much harsher proxy than generation through a decoder.",
              ""]
        if "finetune_dvae_adversarial" in m:
            ft = m["finetune_dvae_adversarial"]
            st1 = m["metrics"].get("stage1") or {}
            L[-1:-1] = [f"- stage 2 (clipft, the numbers above are after it): {ft['steps']} steps, lr {ft['lr']}, "
                        f"{ft['batch_real']} scenes + {ft['batch_distractors']} distractors + a pool of {ft['pool']} "
                        f"dVAE token grids ({ft['tokens']}x{ft['tokens']}) pushed one gradient step per training step "
                        f"toward random canonical prompts through the shipped dVAE decoder, recycled every "
                        f"{ft['recycle']} steps, fed back as negatives ({ft['dropped_as_genuine']} dropped because the "
                        f"judge found the prompt genuinely drawn); {ft['seconds'] / 60:.1f} min on 1 thread.",
                        f"- before stage 2: zero-shot {json.dumps(st1.get('zero_shot_300'))}; pixel robustness "
                        f"{json.dumps(st1.get('pixel_robustness'))}"]
        if "finetune_generation" in m:
            ft = m["finetune_generation"]
            L[-1:-1] = [_last_clip_stage("clipgen", robust="4" if "finetune_robust" in m else "2") + f"{ft['steps']} steps, lr {ft['lr']}, {ft['batch_real']} scenes + "
                        f"{ft['batch_distractors']} distractors + the current images of {ft['pool']} runs of "
                        f"{ft['guide']} guided by this CLIP itself (rounds of {ft['rounds_of']} steps, new prompts and "
                        f"seeds each round), fed back as negatives ({ft['dropped_as_genuine']} dropped because the "
                        f"judge found the prompt drawn); {ft['seconds'] / 60:.1f} min on 1 thread.",
                        f"- before stage 3: zero-shot {json.dumps(m['metrics'].get('before_generation_finetune'))}"]
        if "finetune_loop" in m:
            ft = m["finetune_loop"]
            L[-1:-1] = [_last_clip_stage("cliploop", 5, robust="4" if "finetune_robust" in m else "2")
                        + f"{ft['steps']} steps, lr {ft['lr']}, {ft['batch_real']} scenes + {ft['batch_distractors']} "
                        f"distractors + {ft['frame_cut']} frame-cut scenes + the current images of {ft['pool']} runs of "
                        f"{ft['guide']} ({ft['rounds_of']} steps, trained on from step {ft['from_step']}, tuning prompts "
                        f"no ablation evaluates) guided by this CLIP itself + {ft['replay']} of their earlier images, as "
                        f"negatives ({ft['dropped_as_genuine']} dropped because the judge found the prompt drawn), every "
                        f"batch also as its adversarial images (L2 radius {ft['eps']}); {ft['seconds'] / 60:.1f} min on 1 thread.",
                        f"- before stage 5: zero-shot {json.dumps(m['metrics'].get('before_generation_finetune'))}"]
        negative_stages = (
            ("frame", "clipframe", 3, lambda ft: f"{ft['frame_cut']} scenes whose shape is cut by the frame, as negatives"),
            ("robust", "cliprobust", 4, lambda ft: f"{ft['frame_cut']} frame-cut scenes as negatives, every batch trained "
                                                   f"on as it is and as its adversarial images (L2 radius {ft['attack']['eps']} at 64 px, "
                                                   f"{ft['attack']['steps']} ascent step(s) from a random start)"),
            ("robust_polish", "cliprobust, clean polish", 4, lambda ft: f"{ft['frame_cut']} frame-cut scenes as "
                                                                        "negatives, no attack, a fresh optimiser"),
            ("near", "clipnear", 5, lambda ft: f"{ft['near_miss']} near misses of scenes in the batch (wavy, bumped, "
                                               f"bitten, stretched or fragmented shapes) + {ft['frame_cut']} frame-cut scenes, as negatives"))
        present = [name for name, *_ in negative_stages if f"finetune_{name}" in m]
        for name, stage, n, what in negative_stages:
            if name in present:
                ft = m[f"finetune_{name}"]
                L[-1:-1] = [_last_clip_stage(stage, n, last=name == present[-1], robust="4" if "robust" in present else "2")
                            + f"{ft['steps']} steps, lr {ft['lr']}, {ft['batch_real']} scenes + "
                            f"{ft['batch_distractors']} distractors + {what(ft)}; "
                            f"{ft['seconds'] / 60:.1f} min on 1 thread; zero-shot before it "
                            f"{json.dumps(m['metrics'].get(f'before_{name}_finetune'))}"
                            + (f"; pixel robustness before it {json.dumps(m['metrics'][f'before_{name}_pixel_robustness'])}"
                               if f"before_{name}_pixel_robustness" in m["metrics"] else "")]
    for k, title in (("dvae", "shapes-dvae (dall_e Encoder/Decoder)"), ("vqgan", "shapes-vqgan (taming modules)")):
        if k not in metas:
            continue
        m = metas[k]
        ev, tr = m["metrics"], m["training"]
        ja = ev["judge_on_reconstructions"]
        arch = (f"Encoder `{json.dumps(m['encoder'])}`, Decoder `{json.dumps(m['decoder'])}`" if k == "dvae"
                else f"ddconfig `{json.dumps(m['ddconfig'])}`, n_embed {m['n_embed']}, embed_dim {m['embed_dim']}")
        L += [f"## {title}", "", f"- architecture: {arch}; 128 px -> 16x16 tokens (8x downsampling).",
              f"- training: `{json.dumps({kk: v for kk, v in tr.items() if kk != 'seconds'})}`; 1 thread: "
              f"{tr['seconds'] / 60:.1f} min (shared, loaded 2-core machine).",
              f"- on {ev['scenes']} fresh 128 px scenes, hard codes: PSNR {ev['psnr_db']:.2f} dB; codes used "
              f"{ev['codes_used']} of {m['encoder']['vocab_size'] if k == 'dvae' else m['n_embed']}; judge on the "
              f"reconstructions: colour {_fmt(ja['colour'])}, shape {_fmt(ja['shape'])}, background "
              f"{_fmt(ja['background'])}, all three {_fmt(ja['all'])}.", ""]
        if "judge_on_reconstructions_earlier_judge" in ev:
            L[-1:-1] = ["- the judge figures above were re-measured (`--rejudge`) after the judge learnt that decoders "
                        "round a triangle's corners (`judge.ROUNDING`); with the earlier judge, as trained: "
                        f"{json.dumps(ev['judge_on_reconstructions_earlier_judge'])} (the stage-1 line below is "
                        "from the earlier judge too)."]
        for key, stage in (("finetune", "vqganft"), ("finetune_hard", "dvaeft")):
            if key not in m:
                continue
            ft = m[key]
            st1 = ev.get("stage1") or {}
            L[-1:-1] = [f"- stage 2 ({stage}, the numbers above are after it): "
                        f"`{json.dumps({kk: v for kk, v in ft.items() if kk not in ('seconds', 'trained_by')})}`; "
                        f"{ft['seconds'] / 60:.1f} min on 1 thread.",
                        f"- before stage 2: PSNR {st1.get('psnr_db', float('nan')):.2f} dB, codes used "
                        f"{st1.get('codes_used')}, judge {json.dumps(st1.get('judge_on_reconstructions'))}"]
    L += ["## Known limitations (shipped run)", "", NOTES, ""]
    p = out_dir / "MODEL_CARD.md"
    p.write_text("\n".join(L) + "\n")
    return p


def train_shapes(out_dir: str | Path | None = None, seed: int = 0, only=SHIPPED_STAGES, minutes: float | None = None,
                 threads: int = 1, steps: dict | None = None) -> dict:
    """Train the requested models into ``out_dir`` (default: the package's models dir); returns their metadata."""
    import torch

    from ..errors import ConfigError

    out = Path(out_dir) if out_dir is not None else MODELS_DIR
    only = tuple(only)
    bad = [k for k in only if k not in STAGES]
    if bad:
        raise ConfigError(f"unknown model kind(s) {', '.join(bad)}: use --only with a comma list of {', '.join(STAGES)}")
    torch.set_num_threads(int(threads))
    steps = steps or {}
    res = {}
    for k in only:
        n = _steps(k, minutes, steps.get(k))
        _log(f"training {k}: {n} steps, {threads} thread(s), seed {seed}")
        fn = {"clip": train_clip, "dvae": train_dvae, "dvaeft": finetune_dvae, "vqgan": train_vqgan,
              "vqganft": lambda o, seed, steps: train_vqgan(o, seed=seed, steps=steps, lr=8e-4, resume=True),
              "clipft": finetune_clip_dvae_adversarial, "clipgen": finetune_clip_generation,
              "clipframe": finetune_clip_frame, "clipnear": finetune_clip_near, "cliprobust": finetune_clip_robust,
              "cliploop": finetune_clip_loop}[k]
        res[k] = fn(out, seed=seed, steps=n)
    write_model_card(out)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="clipguide train-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(MODELS_DIR), help="output directory (default: the package's models dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(SHIPPED_STAGES),
                    help="comma list of clip,dvae,dvaeft,vqgan,vqganft,clipft,clipframe,cliprobust (dvaeft continues the dVAE with hard "
                         "codes; clipft fine-tunes the CLIP against adversarial images decoded by the dVAE, it needs both in "
                         "--out; clipframe then fine-tunes it with shapes cut by the frame as negatives; cliprobust then "
                         "fine-tunes it adversarially, L2 pixel-space attacks); experimental, not shipped: "
                         "clipgen fine-tunes the CLIP against the generation loop's own images, clipnear with near "
                         "misses of the scenes as negatives, cliploop against whole default runs, adversarially")
    ap.add_argument("--minutes", type=float, default=None,
                    help="budget per model in minutes; converted to a step count at the reference speed "
                         f"(defaults: {DEFAULT_MINUTES})")
    ap.add_argument("--steps", type=int, default=None, help="exact step count per model (overrides --minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rejudge", action="store_true",
                    help="train nothing: re-measure the decoders in --out with the current pixel judge and rewrite the card")
    a = ap.parse_args(argv)
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    _COMMAND[0] = "python -m clipguide.shapes.train " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.rejudge:
        rejudge_decoders(Path(a.out))
        write_model_card(Path(a.out))
        return 0
    train_shapes(a.out, seed=a.seed, only=only, minutes=a.minutes, threads=a.threads,
                 steps={k: a.steps for k in only} if a.steps is not None else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
