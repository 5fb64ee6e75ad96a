"""The shipped stages of the shapes CLIP: ``clip`` (contrastive training from scratch with an adversarial
pixel pool), ``clipft`` (fine-tuned against adversarial images decoded by the shipped dVAE), ``clipframe``
(shapes cut by the frame as negatives) and ``cliprobust`` (L2 adversarial fine-tuning, then clean polish)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dall_e import unmap_pixels

from .. import scenes as S
from .clip import (CLIP_CFG, CLIP_CONTEXT, CLIP_IMAGE_SIZE, CLIP_MEAN, CLIP_STD, ROBUSTNESS_STEPS, build_clip,
                   canonical_tokens, finish_clip, l2_adversary, load_clip_from, not_genuine, pixel_robustness,
                   pool_gradient, scene_batch, soft_contrastive_step, step_with_negatives)
from .common import COMMAND, Progress, log, save, seeded, set_lr
from .dvae import load_dvae_from

POLISH_STEPS = 150  # clean steps after cliprobust's adversarial ones


def _pretraining_optimiser(model, lr: float):
    """AdamW with weight decay 0.05 on the weight matrices only."""
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n_ or "logit_scale" in n_ else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98), eps=1e-6)


def finetune_optimiser(model, lr: float):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98), eps=1e-6)


def _encode_targets(model, canon, targets):
    """Unit text features of the canonical prompts ``targets`` (indices), the model left in eval mode."""
    model.eval()
    with torch.no_grad():
        return model.encode_text(canon[targets], normalize=True)


class _PixelPool:
    """The ``clip`` stage's persistent adversarial pool: pixel logits at the CLIP's input size, each pushed one
    gradient-ascent step per training step toward its canonical prompt, recycled after ``RECYCLE`` steps."""

    RECYCLE = 40

    def __init__(self, n: int, n_prompts: int, gen):
        self.z = torch.randn((n, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), generator=gen)
        self.t = torch.randint(0, n_prompts, (n,), generator=gen)
        self.age = torch.zeros(n, dtype=torch.long)
        self.dropped = 0

    def negatives(self, model, canon, prompts, rng, gen):
        """Attack, then the pool's images the judge does not read as their prompt (lightly noised; None if none)."""
        gz, _, _ = pool_gradient(model, torch.sigmoid, self.z, _encode_targets(model, canon, self.t), gen)
        with torch.no_grad():
            self.z += 0.6 * gz / (gz.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12) * 0.1
            self.age += 1
        model.train()
        adv = torch.sigmoid(self.z)
        keep = not_genuine(adv, self.t, prompts)
        self.dropped += len(self.t) - len(keep)  # genuinely became the prompt: not a negative
        out = None
        if keep:
            a = adv[keep]
            out = (a + 0.02 * torch.rand((), generator=gen) * torch.randn(a.shape, generator=gen)).clamp(0, 1)
        self._recycle(len(prompts), rng, gen)
        return out

    def _recycle(self, n_prompts: int, rng, gen) -> None:
        """Restart old members from noise, a distractor or a real scene of other attributes."""
        for i in (self.age >= self.RECYCLE).nonzero().flatten().tolist():
            r = rng.random()
            if r < 0.4:
                self.z[i] = torch.randn((3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE), generator=gen)
            else:
                im = S.render_distractors(1, rng, CLIP_IMAGE_SIZE) if r < 0.7 else \
                    S.render(S.sample_scenes(1, rng=rng), CLIP_IMAGE_SIZE)
                p01 = torch.from_numpy(im[0]).permute(2, 0, 1).float() / 255
                self.z[i] = torch.logit(p01.clamp(0.05, 0.95))
            self.t[i] = int(torch.randint(0, n_prompts, (), generator=gen))
            self.age[i] = 0


def _finish_measured(model, tag: str, robustness_steps: int) -> tuple[dict, dict, dict]:
    """:func:`finish_clip`, then the pixel robustness check: (zero-shot accuracy, robustness, tensors to ship)."""
    zs, sd = finish_clip(model, tag)
    rob = pixel_robustness(model, steps=robustness_steps)
    log(f"{tag} pixel robustness {rob}")
    return zs, rob, sd


def _clip_meta(zs: dict, rob: dict, training: dict) -> dict:
    return {
        "kind": "open_clip", "model_name": "shapes-vit", "model_cfg": CLIP_CFG,
        "image_size": CLIP_IMAGE_SIZE, "context_length": CLIP_CONTEXT, "tokenizer": "open_clip ViT-B-32 (SimpleTokenizer)",
        "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "dtype": "float16",
        "metrics": {"zero_shot_300": zs, "pixel_robustness": rob}, "training": training,
    }


def train_clip(out_dir: Path, seed: int = 0, steps: int = 2000, batch: int = 128, n_neg: int = 24,
               n_adv: int = 16, adv_start: float = 0.2, lr: float = 1e-3, log_every: int = 100,
               robustness_steps: int = ROBUSTNESS_STEPS, trained_by: str = COMMAND) -> dict:
    """Stage ``clip``: contrastive training from scratch; from ``adv_start`` of the steps on, a pool of ``n_adv``
    adversarial pixel images is fed back as negatives unless the judge says it genuinely shows its prompt."""
    gen, rng = seeded(seed, 0)
    model = build_clip()
    prompts, canon = S.canonical_prompts(), canonical_tokens()
    opt = _pretraining_optimiser(model, lr)
    pool = _PixelPool(n_adv, len(prompts), gen)
    adv_from = int(adv_start * steps)
    progress = Progress("clip", steps, log_every)
    for step in range(steps):
        model.train()
        set_lr(opt, step, steps, lr, warmup=100)
        scenes, tmpl, imgs, text = scene_batch(batch, n_neg, rng, gen)
        if step >= adv_from and n_adv:
            adv = pool.negatives(model, canon, prompts, rng, gen)
            imgs += [] if adv is None else [adv]
        progress.hist.append(soft_contrastive_step(model, opt, torch.cat(imgs), text, scenes, tmpl, imgs[0].shape[0]).item())
        if progress.due(step):
            progress.log(step, f"loss {progress.recent():.4f} scale {model.logit_scale.exp().item():.1f} "
                         f"adv_dropped {pool.dropped}")
    train_s = progress.seconds()
    zs, rob, sd = _finish_measured(model, "clip", robustness_steps)
    meta = _clip_meta(zs, rob, {
        "steps": steps, "batch_real": batch, "batch_distractors": n_neg, "adversarial_pool": n_adv,
        "adversarial_from_step": adv_from, "adversarial_dropped_as_genuine": pool.dropped,
        "lr": lr, "seed": seed, "seconds": round(train_s, 1), "final_loss": float(np.mean(progress.hist[-50:]))})
    save(out_dir, "shapes-clip", sd, meta, trained_by)
    return meta


class _TokenPool:
    """The ``clipft`` stage's pool: dVAE token-logit grids pushed through the decoder toward canonical prompts."""

    def __init__(self, n: int, vocab: int, tokens: int, n_prompts: int, recycle: int, gen):
        self.z = torch.randn((n, vocab, tokens, tokens), generator=gen)
        self.t = torch.randint(0, n_prompts, (n,), generator=gen)
        self.age = torch.randint(0, recycle, (n,), generator=gen)
        self.recycle, self.dropped = recycle, 0

    def negatives(self, model, dec, canon, prompts, gen):
        """Attack through ``dec``, recycle old members; (decoded images not judged genuine, mean cosine)."""
        def render(z):
            return unmap_pixels(torch.sigmoid(dec(F.softmax(z, dim=1))[:, :3].float()))

        gz, adv, cos = pool_gradient(model, render, self.z, _encode_targets(model, canon, self.t), gen)
        with torch.no_grad():
            self.z += 0.5 * gz / (gz.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-12)
            self.age += 1
        keep = not_genuine(adv, self.t, prompts)
        self.dropped += len(self.t) - len(keep)
        for i in (self.age >= self.recycle).nonzero().flatten().tolist():
            self.z[i] = torch.randn(self.z.shape[1:], generator=gen) * float(1 + 2 * torch.rand((), generator=gen))
            self.t[i] = int(torch.randint(0, len(prompts), (), generator=gen))
            self.age[i] = 0
        return adv[keep], cos.mean().item()


def finetune_clip_dvae_adversarial(out_dir: Path, seed: int = 0, steps: int = 300, batch: int = 96, n_neg: int = 16,
                                   n_adv: int = 12, tokens: int = 8, lr: float = 2e-4, recycle: int = 30,
                                   log_every: int = 25, robustness_steps: int = ROBUSTNESS_STEPS,
                                   trained_by: str = COMMAND) -> dict:
    """Stage ``clipft``: fine-tune against adversarial images made THROUGH the shipped dVAE decoder.

    A persistent pool of dVAE token-logit grids is pushed (one gradient-ascent step per training step,
    softmax relaxation -> decoder -> sigmoid -> unmap_pixels -> cutouts -> CLIP) toward random canonical
    prompts; the decoded images are fed back as negatives (neutral captions) unless the judge says they
    genuinely show the prompt.  Needs shapes-clip.* and shapes-dvae.* in ``out_dir``; rewrites shapes-clip.*.
    """
    gen, rng = seeded(seed, 3)
    model, meta = load_clip_from(out_dir)
    _, dec, _ = load_dvae_from(out_dir)
    dec.eval().requires_grad_(False)
    prompts, canon = S.canonical_prompts(), canonical_tokens()
    opt = finetune_optimiser(model, lr)
    pool = _TokenPool(n_adv, dec.vocab_size, tokens, len(prompts), recycle, gen)
    progress = Progress("clip-ft", steps, log_every)
    for step in range(steps):
        set_lr(opt, step, steps, lr, warmup=20)
        adv, cos = pool.negatives(model, dec, canon, prompts, gen)
        model.train()
        progress.hist.append(step_with_negatives(model, opt, adv, batch, n_neg, rng, gen).item())
        if progress.due(step):
            progress.log(step, f"loss {progress.recent():.4f} dropped {pool.dropped} adv-cos {cos:.3f}")
    train_s = progress.seconds()
    zs, rob, sd = _finish_measured(model, "clip-ft", robustness_steps)
    meta = dict(meta)
    meta["metrics"] = {"zero_shot_300": zs, "pixel_robustness": rob, "stage1": meta.get("metrics")}
    meta["finetune_dvae_adversarial"] = {"steps": steps, "batch_real": batch, "batch_distractors": n_neg,
                                         "pool": n_adv, "tokens": tokens, "lr": lr, "recycle": recycle,
                                         "dropped_as_genuine": pool.dropped, "seed": seed, "seconds": round(train_s, 1),
                                         "trained_by": trained_by}
    save(out_dir, "shapes-clip", sd, meta, trained_by)
    return meta


def finetune_clip_frame(out_dir: Path, seed: int = 0, steps: int = 150, batch: int = 64, n_neg: int = 16,
                        n_cut: int = 16, lr: float = 1e-4, log_every: int = 25, trained_by: str = COMMAND) -> dict:
    """Stage ``clipframe``: fine-tune with shapes cut by the frame as negatives.

    The CLIP's training crops (80-100 % of the side) show shapes cut by the frame under their captions,
    so the generation loop is not pushed away from the frame. Each step adds ``n_cut`` scenes whose shape
    crosses an edge (:func:`~clipguide.shapes.scenes.render_frame_cut`) to the neutral-caption negatives.
    Needs shapes-clip.* in ``out_dir``; rewrites it.
    """
    run = _NegativesRun(out_dir, seed, batch, n_neg, lr, log_every, trained_by, n_cut)
    return run.finetune("frame", 11, steps)


def finetune_clip_robust(out_dir: Path, seed: int = 0, steps: int = 600, batch: int = 64, n_neg: int = 16,
                         n_cut: int = 16, lr: float = 1e-4, eps: float = 0.5, attack_steps: int = 1,
                         polish_steps: int = POLISH_STEPS, log_every: int = 25,
                         robustness_steps: int = ROBUSTNESS_STEPS, trained_by: str = COMMAND) -> dict:
    """Stage ``cliprobust``: adversarial fine-tuning, so that the CLIP's input gradients are perceptually aligned.

    Every batch (scenes, distractors and frame-cut shapes, as in clipframe) is trained on twice: as it is and as its
    adversarial images within an L2 ball of radius ``eps`` at the CLIP's 64 px input (:func:`l2_adversary`,
    ``attack_steps`` steps).  Without it the loop's gradient is largely an adversarial direction: optimising
    pixels against the CLIP gives coloured noise, and through the decoder the search settles in layouts the CLIP itself
    reads as another prompt (a white background for "... on a purple background").  The attack costs the CLIP some of
    its sense of shape (zero-shot shape 0.993 -> 0.981 on 3000 scenes for 605 steps at eps 0.5), so ``polish_steps``
    clean steps of the same recipe follow, with a fresh optimiser; they bring it back and keep most of the robustness.
    Needs shapes-clip.* in ``out_dir``; rewrites it.
    """
    run = _NegativesRun(out_dir, seed, batch, n_neg, lr, log_every, trained_by, n_cut)
    attack = {"eps": eps, "steps": attack_steps, "step_size": 1.25 if attack_steps == 1 else 2.5 / attack_steps}
    meta = run.finetune("robust", 17, steps, attack=attack, robustness_steps=None if polish_steps else robustness_steps)
    if polish_steps:
        meta = run.finetune("robust_polish", 19, polish_steps, robustness_steps=robustness_steps)
    return meta


class _NegativesRun:
    """Fine-tunes of the CLIP in ``out_dir`` with ``n_cut`` frame-cut scenes added to each step's neutral-caption
    negatives (clipframe, cliprobust); each run records itself under ``finetune_{name}`` and rewrites the CLIP."""

    def __init__(self, out_dir: Path, seed: int, batch: int, n_neg: int, lr: float, log_every: int, trained_by: str,
                 n_cut: int):
        self.out_dir, self.seed, self.batch, self.n_neg, self.lr = out_dir, seed, batch, n_neg, lr
        self.log_every, self.trained_by, self.n_cut = log_every, trained_by, n_cut

    def finetune(self, name: str, offset: int, steps: int, attack: dict | None = None,
                 robustness_steps: int | None = None) -> dict:
        """One run, seeded by ``seed + offset``.  ``attack``: keyword arguments of :func:`l2_adversary`, for
        adversarial training on every batch; ``robustness_steps``: re-measure the pixel robustness check (the robust
        stage's purpose) with that many steps at the end (None: not)."""
        gen, rng = seeded(self.seed, offset)
        model, meta = load_clip_from(self.out_dir)
        opt = finetune_optimiser(model, self.lr)
        before = meta.get("metrics", {}).get("zero_shot_300")
        adversary = l2_adversary(**attack, generator=gen) if attack else None
        progress = Progress(f"clip-{name}", steps, self.log_every)
        model.train()
        for step in range(steps):
            set_lr(opt, step, steps, self.lr, warmup=10)
            cut = S.to_tensor(S.render_frame_cut(self.n_cut, rng, 128))
            progress.hist.append(step_with_negatives(model, opt, cut, self.batch, self.n_neg, rng, gen, (), adversary).item())
            if progress.due(step):
                progress.log(step, f"loss {progress.recent():.4f}")
        train_s = progress.seconds()
        zs, sd = finish_clip(model, f"clip-{name}")
        meta["metrics"] = dict(meta.get("metrics", {}), zero_shot_300=zs, **{f"before_{name}_finetune": before})
        if robustness_steps is not None:  # what adversarial training is for: re-measure the pixel-space robustness check
            meta["metrics"]["before_robust_pixel_robustness"] = meta["metrics"].get("pixel_robustness")
            meta["metrics"]["pixel_robustness"] = pixel_robustness(model, steps=robustness_steps)
            log(f"clip-{name} pixel robustness {meta['metrics']['pixel_robustness']}")
        meta[f"finetune_{name}"] = {"steps": steps, "batch_real": self.batch, "batch_distractors": self.n_neg,
                                    "frame_cut": self.n_cut, **({"attack": attack} if attack else {}), "lr": self.lr,
                                    "seed": self.seed, "seconds": round(train_s, 1), "trained_by": self.trained_by}
        save(self.out_dir, "shapes-clip", sd, meta, self.trained_by)
        return meta
