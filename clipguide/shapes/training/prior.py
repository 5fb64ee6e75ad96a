"""The shapes-world token prior: stage ``prior``, an autoregressive transformer over the shapes dVAE's codes.

Autoregressive rather than masked: the exact log-likelihood of a code grid (one pass, teacher-forced)
is what the loop's prior term needs, differentiable in relaxed code weights, and it is the layout of
taming's Net2Net transformers, which load behind the same interface.  It is trained on the dVAE's
encodings (argmax codes) of rendered scenes and never sees text.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...models.prior import GPTConfig, GridPrior, TokenGPT, bits_per_code
from ...models.priors import load_json_prior
from ...models.weights import sha256_file
from .. import judge as J
from .. import scenes as S
from .common import COMMAND, Progress, descend, log, read_meta, save, seeded, set_lr
from .dvae import decode_codes, encode_codes, load_dvae_from

PRIOR_ARCH = {"n_embd": 128, "n_layer": 4, "n_head": 4}


def encode_scenes(enc, n: int, seed: int, batch: int = 100) -> torch.Tensor:
    """The dVAE's codes [n, h, w] of ``n`` fresh 128 px scenes drawn with ``seed``."""
    scenes = S.sample_scenes(n, seed)
    return torch.cat([encode_codes(enc, S.to_tensor(S.render(scenes[i:i + batch], 128))) for i in range(0, n, batch)])


def decode_samples(dec, codes: torch.Tensor, vocab: int, batch: int = 100) -> torch.Tensor:
    """Pixels [n, 3, H, W] in [0, 1] of code grids [n, h, w] through the dVAE's decoder, a batch at a time."""
    return torch.cat([decode_codes(dec, codes[i:i + batch], vocab) for i in range(0, len(codes), batch)])


def judge_samples(prior: GridPrior, dec, n: int, seed: int) -> dict:
    """The pixel judge on ``n`` samples: the share judged a clean one-shape scene, and how evenly the samples
    cover the colour x shape x background combinations (combinations seen, and the normalised entropy of
    their histogram: 1 is perfectly even over all of them)."""
    codes = prior.sample(n, torch.Generator().manual_seed(seed))
    verdicts = J.judge_batch(decode_samples(dec, codes, prior.vocab_size))
    clean = [v.attributes for v in verdicts if None not in v.attributes]
    combos = len({attributes for _, attributes in S.canonical_prompts()})
    counts = np.array(list(Counter(clean).values()), dtype=float)
    p = counts / counts.sum() if len(counts) else counts
    entropy = float(-(p * np.log(p)).sum() / np.log(combos)) if len(counts) else 0.0
    return {"samples": n, "clean_share": len(clean) / n, "combinations_seen": len(counts),
            "combinations": combos, "coverage_entropy": entropy}


def fit_prior(model: TokenGPT, data: torch.Tensor, steps: int, batch: int, lr: float, gen: torch.Generator,
              tag: str, warmup: int = 100) -> float:
    """Teacher-forced cross-entropy on batches of code grids drawn from ``data`` [n, h, w] with ``gen``, AdamW
    with warm-up and a cosine; returns the seconds it took."""
    vocab = model.cfg.vocab_size
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    progress = Progress(tag, steps, every=100)
    for step in range(steps):
        codes = data[torch.randint(0, len(data), (batch,), generator=gen)]
        logits = model(model.embed(F.one_hot(codes.flatten(1), vocab).float()))
        loss = F.cross_entropy(logits.flatten(0, 1), codes.flatten())
        set_lr(opt, step, steps, lr, warmup=warmup)
        descend(opt, loss, list(model.parameters()))
        progress.hist.append(loss.item())
        if progress.due(step):
            progress.log(step, f"nats/code {progress.recent():.3f}")
    return progress.seconds()


def measure_prior(model: TokenGPT, dec, held: torch.Tensor, eval_samples: int, seed: int) -> dict:
    """Held-out bits per code on the code grids ``held``, and the judge on ``eval_samples`` samples."""
    prior = GridPrior(model, "shapes-prior")
    metrics = {"held_out_bits_per_code": bits_per_code(prior, held), "held_out_scenes": len(held),
               "judge_on_samples": judge_samples(prior, dec, eval_samples, seed)}
    log(f"prior eval {metrics}")
    return metrics


def train_prior(out_dir: Path, seed: int = 0, steps: int = 1500, batch: int = 32, lr: float = 2e-3,
                train_scenes: int = 12000, held_out: int = 500, eval_samples: int = 500,
                trained_by: str = COMMAND) -> dict:
    """Stage ``prior``: fit a :class:`TokenGPT` to the dVAE codes of ``train_scenes`` scenes, then measure its
    held-out bits per code and the judge on ``eval_samples`` of its samples; writes ``shapes-prior``."""
    enc, dec, _ = load_dvae_from(out_dir)
    gen, _ = seeded(seed, 7000)
    log(f"prior: encoding {train_scenes} + {held_out} scenes")
    data, held = encode_scenes(enc, train_scenes, seed + 7001), encode_scenes(enc, held_out, seed + 7002)
    model = TokenGPT(GPTConfig(enc.vocab_size, *data.shape[1:], **PRIOR_ARCH))
    seconds = fit_prior(model, data, steps, batch, lr, gen, "prior")
    metrics = measure_prior(model, dec, held, eval_samples, seed + 7003)
    meta = {"kind": "token_gpt", "config": dataclasses.asdict(model.cfg), "decoder": "shapes-dvae",
            "decoder_sha256": sha256_file(Path(out_dir) / "shapes-dvae.safetensors"), "train": {"steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "train_scenes": train_scenes, "threads": torch.get_num_threads(), "seconds": round(seconds, 1)}, **metrics}
    return save_prior(out_dir, model, meta, trained_by)


def finetune_prior(out_dir: Path, seed: int = 0, steps: int = 3500, batch: int = 32, lr: float = 1e-3,
                   train_scenes: int = 12000, held_out: int = 500, eval_samples: int = 500,
                   trained_by: str = COMMAND) -> dict:
    """Stage ``priorft``: continue shapes-prior on the codes of ``train_scenes`` other fresh scenes (a second
    cosine from a lower peak), measured as stage ``prior`` is, on the same held-out scenes and sample seed;
    rewrites ``shapes-prior``, keeps the first stage's figures under ``stage1`` and appends this run to
    ``finetune`` (so running it twice continues it twice and records both)."""
    enc, dec, _ = load_dvae_from(out_dir)
    meta = read_meta(out_dir, "shapes-prior")
    model = load_json_prior(Path(out_dir) / "shapes-prior.json").model  # the checked loader runs use
    gen, _ = seeded(seed, 7010)
    log(f"priorft: encoding {train_scenes} + {held_out} scenes")
    data, held = encode_scenes(enc, train_scenes, seed + 7011), encode_scenes(enc, held_out, seed + 7002)
    seconds = fit_prior(model, data, steps, batch, lr, gen, "priorft", warmup=50)
    metrics = measure_prior(model, dec, held, eval_samples, seed + 7003)
    run = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "train_scenes": train_scenes,
           "threads": torch.get_num_threads(), "seconds": round(seconds, 1), "trained_by": trained_by}
    # a later priorft continues this one: the first stage's figures stay, and the runs are listed in order
    meta = {**meta, **metrics, "stage1": meta.get("stage1", {k: meta[k] for k in metrics}),
            "finetune": [*meta.get("finetune", []), run]}
    return save_prior(out_dir, model, meta, trained_by)


def save_prior(out_dir: Path, model: TokenGPT, meta: dict, trained_by: str) -> dict:
    """Write ``shapes-prior.safetensors`` and ``.json`` (``meta``) into ``out_dir``; returns ``meta``."""
    save(Path(out_dir), "shapes-prior", {k: v.contiguous() for k, v in model.state_dict().items()}, meta, trained_by)
    return meta
