"""Train the shapes-world models: a tiny open_clip CLIP, a dall_e dVAE, a taming VQGAN and a token prior.

    python -m clipguide.shapes.train [--out DIR] [--seed 0] [--only clip,dvae,...,prior,priorft,clipprior] [--minutes M] [--threads 1]
    python -m clipguide.shapes.train --rejudge [--out DIR]   # re-measure the decoders after a judge change

Runs are step-budgeted (not time-budgeted), so a run is deterministic for a given seed,
step count and thread count.  ``--minutes`` scales the step counts by the speed measured
on the reference machine (1 thread of a 2-core AMD EPYC VM), so it is a budget *estimate*.
Each model writes ``shapes-<name>.safetensors`` + ``shapes-<name>.json`` into ``--out``;
MODEL_CARD.md is regenerated from whichever json files are there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...errors import ConfigError
from ...paths import SHAPES_MODELS
from .card import write_model_card
from .clip_prior import finetune_clip_prior
from .clip_stages import finetune_clip_dvae_adversarial, finetune_clip_frame, finetune_clip_robust, train_clip
from .common import COMMAND, DEFAULT_MINUTES, EVAL_SCENES, eval_recon, log, stage_steps
from .dvae import dvae_reconstruct, finetune_dvae, load_dvae_from, train_dvae
from .prior import finetune_prior, train_prior
from .vqgan import finetune_vqgan, load_vqgan_from, train_vqgan, vqgan_reconstruct

MODELS_DIR = SHAPES_MODELS
# clipft: CLIP fine-tune against dVAE-decoded adversarial images; clipframe: then with frame-cut shapes as negatives;
# cliprobust: then adversarially (L2 PGD/FGSM in pixel space), for perceptually aligned gradients;
# prior: the token prior over the final dVAE's codes; priorft: the prior continued on other scenes;
# clipprior: the CLIP fine-tuned on the prior's samples, rated by the judge, to rank them
STAGE_FUNCTIONS = {"clip": train_clip, "dvae": train_dvae, "dvaeft": finetune_dvae, "vqgan": train_vqgan,
                   "vqganft": finetune_vqgan, "clipft": finetune_clip_dvae_adversarial, "clipframe": finetune_clip_frame,
                   "cliprobust": finetune_clip_robust, "prior": train_prior, "priorft": finetune_prior,
                   "clipprior": finetune_clip_prior}
STAGES = tuple(STAGE_FUNCTIONS)  # the order of a whole run: a stage reads what the earlier ones wrote


def run_stage(stage: str, out_dir: Path, seed: int = 0, steps: int | None = None, trained_by: str = COMMAND,
              **options) -> dict:
    """Run one stage into ``out_dir`` (``steps``: None, the stage's default budget); ``options``: keyword
    arguments of its function (batch sizes, ``robustness_steps``, ...).  Returns the json it wrote."""
    return STAGE_FUNCTIONS[stage](out_dir, seed=seed, steps=stage_steps(stage, None, steps), trained_by=trained_by,
                                  **options)


def train_shapes(out_dir: str | Path | None = None, seed: int = 0, only=STAGES, minutes: float | None = None,
                 threads: int = 1, steps: dict | None = None, options: dict | None = None,
                 trained_by: str = COMMAND) -> dict:
    """Train the requested stages into ``out_dir`` (default: the package's models dir); returns their metadata.
    ``steps``: stage -> step count (overrides ``minutes``); ``options``: stage -> keyword arguments of its function."""
    out = Path(out_dir) if out_dir is not None else MODELS_DIR
    only = tuple(only)
    bad = [k for k in only if k not in STAGES]
    if bad:
        raise ConfigError(f"unknown model kind(s) {', '.join(bad)}: use --only with a comma list of {', '.join(STAGES)}")
    torch.set_num_threads(int(threads))
    steps, options = steps or {}, options or {}
    res = {}
    for k in only:
        n = stage_steps(k, minutes, steps.get(k))
        log(f"training {k}: {n} steps, {threads} thread(s), seed {seed}")
        res[k] = run_stage(k, out, seed, n, trained_by, **options.get(k, {}))
    write_model_card(out)
    return res


def _shipped_reconstruction(out_dir: Path, name: str):
    """(reconstruct function, meta) of the shipped decoder ``name`` ("dvae" or "vqgan") in ``out_dir``."""
    if name == "dvae":
        enc, dec, meta = load_dvae_from(out_dir)
        enc.eval(), dec.eval()
        return (lambda x: dvae_reconstruct(enc, dec, x)), meta
    m, meta = load_vqgan_from(out_dir)
    m.eval()
    return (lambda x: vqgan_reconstruct(m, x)), meta


def rejudge_decoders(out_dir: Path, scenes: int = EVAL_SCENES) -> dict:
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
        new = eval_recon(reconstruct, n=scenes)["judge_on_reconstructions"]
        meta["metrics"] = dict(old, judge_on_reconstructions=new, judge_on_reconstructions_earlier_judge=old.get(
            "judge_on_reconstructions_earlier_judge", old["judge_on_reconstructions"]))
        log(f"{name} re-judged: {old['judge_on_reconstructions']} -> {new}")
        path.write_text(json.dumps(meta, indent=1) + "\n")
        res[name] = meta["metrics"]
    return res


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipguide train-shapes", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(MODELS_DIR), help="output directory (default: the package's models dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(STAGES),
                    help=f"comma list of {','.join(STAGES)} (dvaeft continues the dVAE with hard "
                         "codes; clipft fine-tunes the CLIP against adversarial images decoded by the dVAE, it needs both in "
                         "--out; clipframe then fine-tunes it with shapes cut by the frame as negatives; cliprobust then "
                         "fine-tunes it adversarially, L2 pixel-space attacks; prior models the dVAE's codes and priorft "
                         "continues it; clipprior then fine-tunes the CLIP on the prior's samples, rated by the judge)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="budget per model in minutes; converted to a step count at the reference speed "
                         f"(defaults: {DEFAULT_MINUTES})")
    ap.add_argument("--steps", type=int, default=None, help="exact step count per model (overrides --minutes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rejudge", action="store_true",
                    help="train nothing: re-measure the decoders in --out with the current pixel judge and rewrite the card")
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    only = tuple(x.strip() for x in a.only.split(",") if x.strip())
    command = "python -m clipguide.shapes.train " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.rejudge:
        rejudge_decoders(Path(a.out))
        write_model_card(Path(a.out))
        return 0
    train_shapes(a.out, seed=a.seed, only=only, minutes=a.minutes, threads=a.threads,
                 steps={k: a.steps for k in only} if a.steps is not None else None, trained_by=command)
    return 0
