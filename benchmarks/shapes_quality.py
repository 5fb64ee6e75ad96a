"""Shapes-world quality benchmark: how often does each recipe draw what the prompt asks?

Runs every preset on held-out canonical prompts (never used for tuning) with the
shipped shapes-world CLIP and dVAE, under the same step budget, and prints the
pixel judge's match rates (colour, shape, background, all three), the CLIP
similarity, the median steps to the first full match and seconds per prompt, and
why the shape was missed (the judge's reason: frame, outline, pieces, ...), and whether
each miss is the search's fault or the CLIP's (does the CLIP rate true renders of the
prompt above the image, under the loop's own views?).  ``--fit`` adds the recipe's search space without
CLIP: the same latent and schedule pulled toward one true render per prompt by pixel MSE, judged the same way
(a high rate there puts the misses on the CLIP objective, not on what the latent can draw).

    python benchmarks/shapes_quality.py --prompts 32 --steps 300 --threads 2

``--prior-stages`` first adds one row per stage of the token prior (``--stages``, ``--candidates`` as a comma
list, ``--shortlist`` for two-stage scoring, ``--resample`` for the completions of the best candidates) and,
with ``--coverage``, how often the prompt's scene is among the candidates at all (the judge on every one: a
diagnosis, not part of generation):

    python benchmarks/shapes_quality.py --prompts 8 --threads 1 --presets '' --prior-stages \
        --stages rerank,refine --candidates 256 --shortlist 32 --prior-scale 8 --coverage
"""

from __future__ import annotations

import argparse
import json

import torch

from clipguide.models.decoders import DECODERS
from clipguide.models.loading import load_models, load_prior_of
from clipguide.presets import PRESETS, get_preset
from clipguide.shapes.quality import (SEARCH_MARGIN, evaluate, fit_gaps, fit_renders, judge_proposals, pool_coverage,
                                       pool_share, prompt_split)

SHAPES_MODELS = dict(decoder="shapes-dvae", clip="shapes", size=128)
SHAPES_VQGAN = "shapes-vqgan"  # replaces the dVAE for presets made for a taming VQGAN
# vqgan-gumbel is vqgan-codebook on a Gumbel checkpoint; the shapes world has none, so it would repeat that row.
DEFAULT_PRESETS = [name for name in PRESETS if name != "vqgan-gumbel"]


def shapes_models(preset: str) -> dict:
    """The shapes-world models standing in for a preset's real ones."""
    vqgan = DECODERS.get(get_preset(preset).decoder, {}).get("kind") == "vqgan"
    return {**SHAPES_MODELS, "decoder": SHAPES_VQGAN} if vqgan else SHAPES_MODELS


def print_row(name: str, m: dict) -> None:
    """One line of the table (a stage without optimisation has no CLIP similarity or steps to a match)."""
    first = f"{m['median_steps_to_match']:.0f}" if m.get("median_steps_to_match") is not None else "-"
    sim = f"{m['clip_similarity']:7.3f}" if "clip_similarity" in m else f"{'-':>7s}"
    print(f"{name:20s} {m['match_colour']:7.3f} {m['match_shape']:7.3f} {m['match_background']:7.3f} "
          f"{m['match_all']:7.3f} {sim} {first:>8s} {m['seconds_per_prompt']:8.2f}", flush=True)


STAGES = ("sample", "rerank", "resample", "refine", "refine-term", "term")  # --stages: the rows of --prior-stages


def prior_stages(args) -> list[tuple[str, dict, bool]]:
    """(row name, config fields, refined?) of the chosen --stages, the rerank stages once per --candidates."""
    w, s, k = args.prior_weight, args.prior_scale, args.shortlist
    chosen, rows = args.stages.split(","), []
    if set(chosen) - set(STAGES):  # a misspelt stage would otherwise just print no row
        raise SystemExit(f"--stages takes {','.join(STAGES)}, got {args.stages}")
    if "sample" in chosen:
        rows.append(("prior sample", dict(prior_candidates=1), False))
    for n in (int(c) for c in args.candidates.split(",")):
        rerank = dict(prior_candidates=n, prior_shortlist=min(k, n))
        name = f"rerank {n}" + (f"/{k}" if 0 < k < n else "")
        rows += [(name, rerank, False)] if "rerank" in chosen else []
        if "resample" in chosen:
            rows.append((f"{name} + resample {args.resample}", dict(rerank, prior_resample=args.resample), False))
        rows += [(f"{name} + refine", dict(rerank, init_scale=s), True)] if "refine" in chosen else []
        if "refine-term" in chosen:
            rows.append((f"{name} + refine + term {w}", dict(rerank, init_scale=s, prior_weight=w), True))
    if "term" in chosen:
        rows.append((f"refine + term {w}", dict(prior_weight=w), True))
    return rows


def print_coverage(cfg, decoder, prior, pairs) -> dict:
    """Diagnosis, not a stage: how often the prompt's exact scene is among a run's candidates (the judge
    on every one), and the pool size at which it would be for 90 % of the prompts at the measured rates."""
    c = pool_coverage(cfg, decoder, prior, pairs)
    wanted = [t for _, t in pairs]
    sizes = [2 ** e for e in range(6, 21)]
    grow = ", ".join(f"{n}: {pool_share(c['frequency'], wanted, n):.2f}" for n in sizes[::2])
    enough = next((n for n in sizes if pool_share(c["frequency"], wanted, n) >= 0.9), None)
    unseen = sum(tuple(t) not in c["frequency"] for t in wanted)
    print(f"{'':20s} pool of {cfg.prior_candidates}: the prompt's scene is in it for {c['in_pool']:.3f} of the runs "
          f"(samples per prompt {c['hits']}); judged clean {c['clean']:.2f}, {len(c['frequency'])} scenes seen; "
          f"expected share in a pool of N at these rates: {grow}; 90 % at N = {enough or 'never'} "
          f"({unseen} of {len(wanted)} prompts' scenes never sampled)", flush=True)
    return {"pool": cfg.prior_candidates, "in_pool": c["in_pool"], "hits": c["hits"], "clean": c["clean"],
            "scenes_seen": len(c["frequency"]), "n_for_90": enough}


def prior_rows(args, pairs, overrides) -> list[dict]:
    """One row per stage of the prior on the shapes default (see :func:`prior_stages`): its samples, the best
    of --candidates by CLIP (rerank; --shortlist scores them in two stages), that start refined by the loop,
    with the prior term, and the term alone; --coverage first judges every candidate of each pool."""
    base = get_preset("shapes").replace(steps=args.steps, batch=args.seeds, snapshots=(), **overrides)
    decoder, clip = load_models(base)
    prior = load_prior_of(base.replace(prior=args.prior, prior_candidates=1))
    rows = []
    if args.coverage:
        for n in (int(c) for c in args.candidates.split(",")):
            rows.append(print_coverage(base.replace(prior=args.prior, prior_candidates=n), decoder, prior, pairs))
    for name, fields, refine in prior_stages(args):
        cfg = base.replace(prior=args.prior, **fields)
        m = evaluate(cfg, decoder, clip, pairs, prior=prior) if refine else judge_proposals(cfg, decoder, clip, prior, pairs)
        print_row(name, m)
        rows.append({"preset": name, **{k: v for k, v in m.items() if k not in ("result", "images")}})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated presets")
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts to use (of 84)")
    p.add_argument("--offset", type=int, default=0, help="skip this many prompts of the split first")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--split", choices=("heldout", "tune"), default="heldout")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (JSON value)")
    p.add_argument("--fit", action="store_true", help="also fit each recipe's latent to true renders by pixel MSE (no CLIP)")
    p.add_argument("--json", help="also write the table to this file")
    p.add_argument("--prior-stages", action="store_true",
                   help="first, one row per stage of the token prior (samples, rerank, + refinement, + its term)")
    p.add_argument("--prior", default="shapes-prior", help="the prior of --prior-stages")
    p.add_argument("--candidates", default="64", help="candidates per run for the rerank stages (a comma list: rows for each)")
    p.add_argument("--shortlist", type=int, default=0,
                   help="--prior-shortlist of the rerank stages: all candidates seen once whole, this many best over the cutouts")
    p.add_argument("--stages", default=",".join(STAGES), help=f"the --prior-stages rows to run, of {','.join(STAGES)}")
    p.add_argument("--coverage", action="store_true",
                   help="with --prior-stages: judge every candidate (diagnosis): is the prompt's scene in the pool?")
    p.add_argument("--resample", type=int, default=8,
                   help="--prior-resample of the resample stage: completions per kept prefix of the best candidates")
    p.add_argument("--prior-weight", type=float, default=0.1, help="the prior term's weight in its stages")
    p.add_argument("--prior-scale", type=float, default=8.0, help="--init-scale of the rerank stages: the chosen codes' logit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune, held = prompt_split()
    pairs = (held if args.split == "heldout" else tune)[args.offset : args.offset + args.prompts]
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    print(f"{len(pairs)} {args.split} prompts x {args.seeds} seeds, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"{'preset':20s} {'colour':>7s} {'shape':>7s} {'bg':>7s} {'all':>7s} {'sim':>7s} {'steps1st':>8s} {'s/prompt':>8s}")
    if args.prior_stages:
        rows += prior_rows(args, pairs, overrides)
    for name in filter(None, args.presets.split(",")):  # --presets '' runs the prior's rows alone
        # --set wins over the shapes-world models, so a local checkpoint can stand in (--set 'clip="DIR/x.json"')
        cfg = get_preset(name).replace(**{**shapes_models(name), "steps": args.steps, "batch": args.seeds, "snapshots": (),
                                          **overrides})
        if name == "aleph2image-gamma":
            cfg = cfg.replace(batch=args.seeds)  # its notebook's batch of 2 is a seed count here
        decoder, clip = load_models(cfg)
        m = evaluate(cfg, decoder, clip, pairs)
        print_row(name, m)
        if m["shape_failures"]:
            print(f"{'':20s} shape missed, by the judge's reason: {m['shape_failures']}", flush=True)
        print(f"{'':20s} CLIP score of the image minus true renders under the loop's views: {m['search_gap']:+.3f}; "
              f"misses by cause (search: renders beat it by > {SEARCH_MARGIN}; clip: they do not): {m['miss_causes']}", flush=True)
        row = {"preset": name, **{k: v for k, v in m.items() if k != "result"}}  # verdicts kept: misses by shape later
        if args.fit:
            fit = fit_renders(cfg, decoder, pairs)
            gaps = fit_gaps(cfg, clip, m["result"].images, fit["images"], pairs)
            missed = [g for g, v, (_, t) in zip(gaps, m["verdicts"][:: cfg.batch], pairs) if v != t]
            print(f"{'':20s} without CLIP (pixel MSE to a true render, same latent and steps): all three "
                  f"{fit['match_all']:.3f}; shape missed: {fit['shape_failures']}; CLIP score of the image minus "
                  f"the fitted scene: {sum(gaps) / len(gaps):+.3f}, misses scored at or above it: "
                  f"{sum(g >= 0 for g in missed)} of {len(missed)}", flush=True)
            row.update(fit_match_all=fit["match_all"], fit_gaps=gaps, misses_at_or_above_fit=sum(g >= 0 for g in missed))
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
