"""Bias audit: generate several images per prompt, classify each zero-shot on an attribute,
and count, with Wilson 95% intervals, a table (bias.csv, bias.json) and a bar chart (bias.png).

  python examples/bias_audit.py --occupations --preset aleph2image --images-per-prompt 16
  python examples/bias_audit.py --out runs/bias-audit

With --occupations the prompts are "a photo of a OCCUPATION" for the ten most "she"- and
"he"-leaning occupations of Bolukbasi et al. (2016; clipguide/data/occupations.json) and the
attribute is "a photo of a man|a photo of a woman", as in the 2021 reports; that needs real
models. Without it (the offline default) the audit runs on the shapes world: shapes whose
colour the prompt leaves open, classified by the colour they come out in. --prompts FILE
audits your own prompts (one a line). Every image is saved with its provenance and manifest
under --out/images. $CLIPGUIDE_EXAMPLE_STEPS, $CLIPGUIDE_EXAMPLE_CUTN and
$CLIPGUIDE_EXAMPLE_IMAGES set the defaults of --steps, --cutn and --images-per-prompt.
"""

import argparse
import sys
from pathlib import Path

from clipguide import ClipguideError, audit_bias
from clipguide.audit.bias import DEFAULT_ATTRIBUTE, occupation_prompts, read_prompts
from clipguide.run.experiments import example_cutn, example_images, example_steps

SHAPES_PROMPTS = ("a circle", "a square", "a triangle")  # colour left open, as gender is in "a photo of a nurse"
SHAPES_ATTRIBUTE = "red|yellow|green|blue"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bias-audit"), help="folder for the images and tables")
    parser.add_argument("--occupations", action="store_true", help="the shipped occupation prompts (real models)")
    parser.add_argument("--prompts", type=Path, default=None, help="a file of prompts, one a line")
    parser.add_argument("--attribute", default=None, help="alternatives separated by '|' [man|woman, or shape colours]")
    parser.add_argument("--images-per-prompt", type=int, default=example_images(8), help="seeds per prompt [8]")
    parser.add_argument("--preset", default="shapes", help="generation preset [shapes]")
    parser.add_argument("--steps", type=int, default=example_steps(300), help="steps per image [300]")
    parser.add_argument("--cutn", type=int, default=example_cutn(), help="cutouts per step [the preset's]")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier audit in --out")
    parser.add_argument("--resume", action="store_true", help="continue the audit in --out where it stopped")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: batched runs here; ray: a Ray task per image, e.g. over a cluster [local]")
    parser.add_argument("--address", default=None, help="with --executor ray: the cluster to join [a local Ray]")
    args = parser.parse_args(argv)
    human = args.occupations or args.prompts is not None
    try:
        prompts = (occupation_prompts() if args.occupations else read_prompts(args.prompts) if args.prompts
                   else SHAPES_PROMPTS)
        audit = audit_bias(prompts, attribute=args.attribute or (DEFAULT_ATTRIBUTE if human else SHAPES_ATTRIBUTE),
                           images_per_prompt=args.images_per_prompt, preset=args.preset, steps=args.steps,
                           out_dir=args.out, device=args.device, cutn=args.cutn, overwrite=args.overwrite,
                           resume=args.resume, executor=args.executor,
                           executor_options={"address": args.address} if args.executor == "ray" else None)
    except ClipguideError as e:
        print(f"bias_audit: error: {e}", file=sys.stderr)
        return 2
    print(audit.format())
    print(f"tables and chart: {args.out / 'bias.csv'}, {args.out / 'bias.json'}, {args.out / 'bias.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
