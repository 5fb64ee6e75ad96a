"""Weighted, negative and image prompts and a blend, on the shapes world (offline), then
the lineage of the blend.

  python examples/weighted_prompts.py --out runs/weighted-prompts [--preset NAME] [--steps N]

Runs, each in its own folder under --out (PNGs carrying their provenance, manifest.json,
contact_sheet.png):
  plain     a red circle on a blue background
  weighted  Midjourney weights: a yellow square::2 a purple background::1
  negative  Crowson weights, one negative: a red circle on a blue background | a red square:-0.5
  image     the final image of 'plain' as an image prompt: image:PATH:0.7 | a green background:0.3
  blend     clipguide.engine.prompts.blend_prompt of the 'plain' and 'weighted' images with a text
Then the blend's lineage (runs it grew from) is printed and drawn to --out/lineage.png.
The grammar is in clipguide.engine.prompts (README, "Prompts"). $CLIPGUIDE_EXAMPLE_STEPS and
$CLIPGUIDE_EXAMPLE_CUTN set the defaults of --steps and --cutn, $CLIPGUIDE_EXAMPLE_PRESET that of --preset.
"""

import argparse
import sys
from pathlib import Path

import clipguide
from clipguide.run.experiments import example_cutn, example_preset, example_steps
from clipguide.records.lineage import draw_lineage, final_image, format_lineage, lineage
from clipguide.engine.prompts import blend_prompt
from clipguide.presets import DEFAULT_PRESET


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/weighted-prompts"), help="folder of the run folders")
    parser.add_argument("--preset", default=example_preset(), help=f"generation preset [{DEFAULT_PRESET}]")
    parser.add_argument("--steps", type=int, default=example_steps(None), help="steps per run [the preset's]")
    parser.add_argument("--cutn", type=int, default=example_cutn(), help="cutouts per step [the preset's]")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier runs in --out")
    args = parser.parse_args(argv)

    def run(name: str, prompt: str) -> Path:
        clipguide.generate(prompt, args.preset, steps=args.steps, seed=0, cutn=args.cutn, out_dir=args.out / name,
                           overwrite=args.overwrite)
        print(f"{name:9s} {prompt}\n{'':9s} -> {final_image(args.out / name)}")
        return final_image(args.out / name)

    try:
        plain = run("plain", "a red circle on a blue background")
        weighted = run("weighted", "a yellow square::2 a purple background::1")
        run("negative", "a red circle on a blue background | a red square:-0.5")
        run("image", f"image:{plain}:0.7 | a green background:0.3")
        run("blend", blend_prompt([str(plain), f"{weighted}:0.5"], ["a circle"]))
    except clipguide.ClipguideError as e:
        print(f"weighted_prompts: error: {e}", file=sys.stderr)
        return 2
    print(format_lineage(lineage(args.out / "blend")))
    print(f"lineage drawn to {draw_lineage(args.out / 'blend', args.out / 'lineage.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
