"""The shapes CLIP: its architecture, its contrastive objective (soft targets, hard negatives, an L2
adversary) and its measures (zero-shot accuracy, the pixel-space robustness check).  The stages that
train it are in :mod:`clipguide.shapes.training.clip_stages`."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .. import judge as J
from .. import scenes as S
from .common import descend, log, read_meta

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
ROBUSTNESS_STEPS = 150  # steps of the pixel-space robustness check


def build_clip(cfg: dict | None = None):
    cfg = dict(CLIP_CFG if cfg is None else cfg)
    return open_clip.CLIP(cfg["embed_dim"], vision_cfg=dict(cfg["vision_cfg"]), text_cfg=dict(cfg["text_cfg"]),
                          quick_gelu=cfg.get("quick_gelu", False))


def clip_tokenizer(context_length: int = CLIP_CONTEXT):
    return open_clip.get_tokenizer("ViT-B-32", context_length=context_length)


def load_clip_from(out_dir: Path):
    """Rebuild the CLIP from ``shapes-clip.json`` + ``.safetensors`` in ``out_dir`` (fp32); returns (model, meta)."""
    meta = read_meta(out_dir, "shapes-clip")
    model = build_clip(meta["model_cfg"])
    model.load_state_dict(load_file(str(Path(out_dir) / "shapes-clip.safetensors")))
    return model.float(), meta


def finish_clip(model, tag: str) -> tuple[dict, dict]:
    """Freeze a fine-tuned CLIP, measure its zero-shot accuracy, and return (accuracy, float16 tensors to ship)."""
    model.eval()
    zs = clip_zero_shot(model, n=300)
    log(f"{tag} zero-shot {zs}")
    return zs, {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def _normalise(x):
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _to_clip_size(x):
    return F.interpolate(x, size=(CLIP_IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)


# ---------------------------------------------------------------------------- augmentations
def random_cutouts(x, n: int, out: int, gen, min_frac: float = 0.8):
    """n square cutouts (side min_frac..1 of the image, random offset), resized to out px; [n*B, 3, out, out].

    The same crop is used for the whole batch per cutout (cheap); randomness from ``gen``.
    Training keeps its own plain crops rather than :mod:`clipguide.engine.cutouts`: those draw per run from
    each run's generator in float64, offset by Crowson's or Aleph2Image's rule and resize by matrix products
    without antialiasing, so they would not give the numbers the shipped models were trained with.
    """
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


# ---------------------------------------------------------------------------- the contrastive objective
@functools.lru_cache(maxsize=1)
def _caption_tokens() -> tuple:
    """Every caption of the world (all templates) and the neutral ones: (caption -> row, tokens)."""
    caps = sorted({S.TEMPLATES[k].format(colour=c, shape=s_, background=b)
                   for c in S.COLOUR_NAMES for s_ in S.SHAPES for b in S.BACKGROUNDS
                   for k in range(len(S.TEMPLATES)) if b != c} | set(S.NEUTRAL_CAPTIONS))
    return {c: i for i, c in enumerate(caps)}, clip_tokenizer(CLIP_CONTEXT)(caps)


def canonical_tokens():
    """Tokens of the 168 canonical prompts, in :func:`~clipguide.shapes.scenes.canonical_prompts` order."""
    cap_index, cap_tokens = _caption_tokens()
    return cap_tokens[[cap_index[p] for p, _ in S.canonical_prompts()]]


def _caption_attrs(template_index: int, scene: S.Scene) -> tuple[str, str, str | None]:
    has_bg = "{background}" in S.TEMPLATES[template_index]
    return scene.colour, scene.shape, (scene.background if has_bg else None)


def _soft_targets(scenes, tmpl, n_images: int, n_captions: int):
    """[n_images, n_captions] soft targets: a caption (column j < len(scenes)) is positive for every scene
    image (row) whose attributes it matches; the distractor rows match the neutral captions (the rest)."""
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
    logits = scale * fi @ ft.T
    li = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1)
    lt = -(targets.T / targets.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1)
    return li, lt


def soft_contrastive_step(model, opt, x, text, scenes, tmpl, n_real: int, adversary=None):
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
    descend(opt, loss, model.parameters())
    return loss


def l2_adversary(eps: float, steps: int = 1, step_size: float = 1.25, generator=None):
    """An adversary for :func:`soft_contrastive_step`: images moved within an L2 ball of radius ``eps``
    (pixels in [0, 1] at the CLIP's input size) so as to *raise* the image-side loss against the fixed text
    features: projected gradient ascent (Madry et al. 2018) from a random point of the ball, ``steps`` steps of
    ``step_size``·eps (one step of 1.25·eps is "fast" FGSM-RS training, Wong et al. 2020).  Training on them is
    TeCoA-style adversarial fine-tuning of CLIP (Mao et al. 2023); robust models have perceptually aligned input
    gradients (Santurkar et al. 2019), which is what a generator optimising images against the CLIP follows."""

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


def caption_tokens(scenes, tmpl) -> torch.Tensor:
    """Tokens of each scene's caption in its template (indices ``tmpl``), then of the neutral captions: the
    columns of a batch's soft targets."""
    cap_index, cap_tokens = _caption_tokens()
    caps = [S.caption(s_, int(k)) for s_, k in zip(scenes, tmpl)] + list(S.NEUTRAL_CAPTIONS)
    return cap_tokens[[cap_index[c_] for c_ in caps]]


def scene_batch(batch: int, n_neg: int, rng, gen, paired=()):
    """A CLIP training batch: (scenes, template indices, [augmented scenes, augmented distractors], caption tokens
    with the neutral captions' last).  The scenes are ``paired`` ones then fresh ones."""
    scenes = list(paired) + S.sample_scenes(batch - len(paired), rng=rng)
    tmpl = rng.integers(len(S.TEMPLATES), size=batch)
    real = _augment(S.to_tensor(S.render(scenes, 128)), gen)
    negs = S.to_tensor(S.render_distractors(n_neg, rng, 128))
    return scenes, tmpl, [real, _augment(negs, gen)], caption_tokens(scenes, tmpl)


def step_with_negatives(model, opt, extra_negatives, batch: int, n_neg: int, rng, gen, paired=(), adversary=None,
                        positives=()):
    """One soft-contrastive step on ``batch`` scenes, ``n_neg`` rendered distractors and
    ``extra_negatives`` (images captioned with the neutral captions); ``positives``, (scenes, images in [0, 1]),
    join the scenes under captions of their attributes (stage clipprior's clean samples of the prior).

    The scenes are ``paired`` (those the extra negatives spoil) and fresh ones: a paired scene's
    caption then meets its clean image as the positive and its spoilt one as a negative in the same
    softmax (hard negatives, as in NegCLIP, Yuksekgonul et al. 2023); unpaired, a negative almost
    never shares the attributes of a caption in the batch, and pushes on nothing in particular.
    ``adversary``: see :func:`soft_contrastive_step`."""
    scenes, tmpl, imgs, text = scene_batch(batch, n_neg, rng, gen, paired)
    if positives and len(positives[0]):
        scenes = scenes + list(positives[0])
        tmpl = np.concatenate([tmpl, rng.integers(len(S.TEMPLATES), size=len(positives[0]))])
        imgs.insert(1, _augment(positives[1], gen, noise=0.02))
        text = caption_tokens(scenes, tmpl)
    if len(extra_negatives):
        imgs.append(_augment(extra_negatives, gen, noise=0.02))
    return soft_contrastive_step(model, opt, torch.cat(imgs), text, scenes, tmpl, len(scenes), adversary)


# ---------------------------------------------------------------------------- adversarial pools
def pool_gradient(model, render, z, tt, gen):
    """Gradient w.r.t. ``z`` of the cosine between ``render(z)`` (2 random cutouts each) and the unit text
    features ``tt``, summed over the pool; returns (gradient, rendered images, per-cutout cosines [2, n])."""
    z = z.clone().requires_grad_(True)
    img = render(z)
    c = random_cutouts(img, 2, CLIP_IMAGE_SIZE, gen)
    f = model.encode_image(_normalise(c), normalize=True).view(2, z.shape[0], -1)
    cos = (f * tt[None]).sum(-1)
    (gz,) = torch.autograd.grad(cos.mean(0).sum(), z)
    return gz, img.detach(), cos.detach()


def not_genuine(images, targets, prompts) -> list[int]:
    """Indices of the pool images the judge does NOT read as their target prompt (the others are dropped)."""
    return [i for i in range(len(targets)) if not J.judge(images[i]).all_match(*prompts[int(targets[i])][1])]


# ---------------------------------------------------------------------------- measures
def clip_zero_shot(model, n: int = 200, seed: int = 12345, size: int = 128, batch: int = 100) -> dict:
    """Zero-shot accuracy per attribute on fresh scenes over all 168 canonical prompts (+ neutral-caption rate)."""
    tok = clip_tokenizer(model.context_length if hasattr(model, "context_length") else CLIP_CONTEXT)
    prompts = S.canonical_prompts()
    model.eval()
    with torch.no_grad():
        t = model.encode_text(tok([p for p, _ in prompts] + list(S.NEUTRAL_CAPTIONS)), normalize=True)
        scenes = S.sample_scenes(n, seed)
        correct = {"colour": 0, "shape": 0, "background": 0, "all": 0}
        for i in range(0, n, batch):
            sc = scenes[i:i + batch]
            f = model.encode_image(_normalise(_to_clip_size(S.to_tensor(S.render(sc, size)))), normalize=True)
            best = (f @ t[: len(prompts)].T).argmax(1)
            for s, b in zip(sc, best.tolist()):
                a = prompts[b][1]
                ok = [a[0] == s.colour, a[1] == s.shape, a[2] == s.background]
                correct["colour"] += ok[0]
                correct["shape"] += ok[1]
                correct["background"] += ok[2]
                correct["all"] += all(ok)
        d = _to_clip_size(S.to_tensor(S.render_distractors(n, seed + 1, size)))
        fd = model.encode_image(_normalise(d), normalize=True)
        neutral = ((fd @ t.T).argmax(1) >= len(prompts)).float().mean().item()
    out = {k: v / n for k, v in correct.items()}
    out["distractors_called_neutral"] = neutral
    return out


def _optimise_pixels(model, t, n: int, steps: int, size: int, cutn: int, lr: float, gen):
    """Sigmoid-parametrised pixels [n, 3, size, size] optimised by Adam toward the unit text features ``t``."""
    z = (0.5 * torch.randn((n, 3, size, size), generator=gen)).requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        x = torch.sigmoid(z)
        c = random_cutouts(x, cutn, CLIP_IMAGE_SIZE, gen)
        f = model.encode_image(_normalise(c), normalize=True).view(cutn, n, -1)
        loss = -(f * t[None]).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.sigmoid(z).detach()


def pixel_robustness(model, n_prompts: int = 20, steps: int = ROBUSTNESS_STEPS, size: int = 128, cutn: int = 4,
                     lr: float = 0.05, seed: int = 777) -> dict:
    """Optimise raw pixels (sigmoid-parametrised) toward canonical prompts; judge the results.

    Harsher than generation through a decoder. Returns the judge's match rates and CLIP cosines.
    """
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
    x = _optimise_pixels(model, t, n_prompts, steps, size, cutn, lr, gen)
    with torch.no_grad():
        cos = (model.encode_image(_normalise(_to_clip_size(x)), normalize=True) * t).sum(-1).mean().item()
        real = _to_clip_size(S.to_tensor(S.render([S.Scene(*a) for _, a in pick], size)))
        cos_real = (model.encode_image(_normalise(real), normalize=True) * t).sum(-1).mean().item()
    for p in model.parameters():
        p.requires_grad_(True)
    acc = J.accuracy(J.judge_batch(x), [a for _, a in pick])
    return {"all_three": acc["all"], "colour": acc["colour"], "shape": acc["shape"],
            "background": acc["background"], "cosine_optimised": cos, "cosine_real_scenes": cos_real,
            "steps": steps, "prompts": n_prompts, "cutouts": cutn, "size": size}
