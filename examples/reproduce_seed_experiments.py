"""Reproduce the Aleph2Image seed experiments: each prompt run on its own to snapshots at
100, 600 and 4000 steps, one folder per prompt (PNGs carrying their provenance,
manifest.json, contact_sheet.png), then a zero-shot classification of the final images over
the ImageNet labels, again with "porn" and then "pokemon" added (classification.csv/.json).

  python examples/reproduce_seed_experiments.py --out runs/seed-experiments
  python examples/reproduce_seed_experiments.py --offline --steps 300

The prompts ("an armchair in the shape of an avocado", "a rainbow cube", cartoon shows,
"pokemon", "squirtle", "weedle", "digimon", "serenity", "utopia", "dystopia") live in
clipguide/data/seed_experiments.json. They run with the aleph2image preset (DALL-E dVAE +
CLIP ViT-B/32, downloaded on first use); --offline runs the same workflow with shapes-world
prompts and models instead (no downloads; not the published figures). With --steps N the
snapshots stay at about the same fractions of N, as round numbers (300 steps: 10, 50 and
300). The prompts run as a sweep (clipguide.sweep): running the command again continues an
interrupted run, and --executor ray spreads the prompts over a Ray cluster.
$CLIPGUIDE_EXAMPLE_STEPS and $CLIPGUIDE_EXAMPLE_CUTN set the defaults of --steps and --cutn.
"""

import argparse
import json
import sys
from pathlib import Path

from clipguide import ClipguideError, classify
from clipguide.run.experiments import example_cutn, example_steps, run_experiments, scaled_snapshots, select_experiments
from clipguide.presets import get_preset
from clipguide.records.files import save_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/seed-experiments"), help="folder of the run folders")
    parser.add_argument("--offline", action="store_true", help="the shapes-world stand-in instead of the real models")
    parser.add_argument("--steps", type=int, default=None, help="run length [4000; shapes world 300]")
    parser.add_argument("--cutn", type=int, default=example_cutn(), help="cutouts per step [the preset's]")
    parser.add_argument("--seed", type=int, default=None, help="seed of every run [0]")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier runs in --out (else: continue them)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: one run after another here; ray: a Ray task per prompt [local]")
    parser.add_argument("--address", default=None, help="with --executor ray: the cluster to join [a local Ray]")
    args = parser.parse_args(argv)
    try:
        experiments = select_experiments(offline=args.offline)
        steps = args.steps or example_steps(experiments.steps)
        print(f"{experiments.name}: {len(experiments.prompts)} prompts x {steps} steps, "
              f"snapshots at {scaled_snapshots(steps)} -> {args.out}")
        dirs = run_experiments(experiments, args.out, steps=steps, seed=args.seed, overwrite=args.overwrite,
                               cutn=args.cutn, device=args.device, executor=args.executor,
                               executor_options={"address": args.address} if args.executor == "ray" else None)
        classification = classify(list(dirs.values()), labels=experiments.labels, extra_labels=experiments.extra_labels,
                                  clip=get_preset(experiments.preset).clip, device=args.device)
    except ClipguideError as e:
        print(f"reproduce_seed_experiments: error: {e}", file=sys.stderr)
        return 2
    for prompt, run_dir in dirs.items():
        print(f"{prompt!r}: {run_dir / 'contact_sheet.png'}")
    print(classification.format())
    classification.to_csv(args.out / "classification.csv")
    save_json(args.out / "classification.json", json.loads(classification.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
