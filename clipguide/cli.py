"""Command line: ``clipguide generate | blend | lineage | presets | models | train-shapes``.

The ``generate`` flags are derived from :class:`RunConfig`'s fields (their help
is the field's comment); a flag left out keeps the preset's value.  Every user
error is one line on stderr and exit code 2; Ctrl-C writes a final snapshot and
exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
import typing
from pathlib import Path

from .config import RunConfig, field_types
from .errors import ClipguideError, ConfigError

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _tuple_parser(item_type):
    def parse(text: str):
        try:
            return tuple(item_type(x) for x in text.replace(" ", "").split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from None

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def add_config_flags(parser: argparse.ArgumentParser, skip=("prompts",)) -> None:
    """One flag per RunConfig field, default None (= the preset's value)."""
    types = field_types()
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        kind = types[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        kw = {"default": None, "help": f"{help_text} [preset]", "dest": f.name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw["type"], kw["metavar"] = _tuple_parser(typing.get_args(kind)[0]), "A,B,..."
        else:
            kw["type"] = kind
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        parser.add_argument(flag, **kw)


def build_parser() -> Parser:
    from .presets import DEFAULT_PRESET

    p = Parser(prog="clipguide", description="CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate images from prompts (text, image and noise targets)")
    g.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="one run per prompt: 'text:weight:stop | image:a.png:0.5 | noise:7:0.2', Midjourney 'a::2 b::-0.5', "
                        "story phrases 'a ^ b' (--story-every); with --from, that run's prompt by default")
    add_run_flags(g, DEFAULT_PRESET)
    b = sub.add_parser("blend", help="generate from image prompts (a blend of images), optionally with text")
    b.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URLs, each optionally IMAGE:weight[:stop]")
    b.add_argument("--text", action="append", default=[], help="a text target to add (repeatable), e.g. 'a red circle' or 'blue:-0.5'")
    add_run_flags(b, DEFAULT_PRESET)
    ln = sub.add_parser("lineage", help="trace the images a run grew from (init images and image prompts), generation by generation")
    ln.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (RUN_DIR/run_NN for one run of a batch)")
    ln.add_argument("--draw", type=Path, default=None, metavar="PNG", help="also draw the tree of thumbnails into this PNG")
    pr = sub.add_parser("presets", help="list the presets and their deviations from the originals")
    pr.add_argument("-v", "--verbose", action="store_true", help="also print each preset's full config")
    sub.add_parser("models", help="list known decoders and CLIP models, and which are cached")
    t = sub.add_parser("train-shapes", help="train the shapes-world models (arguments go to clipguide.shapes.train)", add_help=False)
    t.add_argument("args", nargs=argparse.REMAINDER)
    return p


def add_run_flags(parser: argparse.ArgumentParser, default_preset: str) -> None:
    """The flags of the commands that run a generation (generate, blend)."""
    parser.add_argument("--preset", default=default_preset, help=f"recipe (clipguide presets lists them) [{default_preset}]")
    parser.add_argument("--out", type=Path, default=None, help="run directory [runs/DATE-TIME-PROMPT]")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--from", dest="from_run", type=Path, default=None, metavar="RUN_DIR",
                        help="continue from an earlier run: its last image (per its manifest) becomes the init image")
    add_config_flags(parser)


def default_out(prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "run"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


class Progress:
    """tqdm progress bar showing the batch's mean loss and CLIP similarity."""

    def __init__(self, steps: int, disable: bool = False):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, disable=disable, unit="step", dynamic_ncols=True)

    def __call__(self, state) -> None:
        self.bar.set_postfix(loss=f"{state.loss.mean():.4f}", sim=f"{state.similarity.mean():.4f}")
        if state.step:
            self.bar.update(1)

    def close(self):
        self.bar.close()


def cmd_generate(args) -> int:
    from .lineage import run_prompt

    if not args.prompts and args.from_run is None:
        raise ConfigError("no prompt given: pass a prompt, e.g. clipguide generate \"a red circle on a blue background\"")
    return run_generation(args, args.prompts or [run_prompt(args.from_run)])


def cmd_blend(args) -> int:
    from .prompts import blend_prompt

    return run_generation(args, [blend_prompt(args.images, args.text)])


def run_generation(args, prompts: list[str]) -> int:
    """Generate ``prompts`` with the run flags of ``args``: models, loop, snapshots, manifest."""
    from .generation import check_device, describe_models, load_models, make_config
    from .lineage import final_image
    from .optimise import optimise
    from .prompts import run_parents
    from .snapshots import Snapshotter, prepare_out_dir

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.name != "prompts"}
    if args.from_run is not None:
        if args.init_image:
            raise ConfigError("--from RUN_DIR starts from that run's last image: drop --init-image (or --from)")
        overrides["init_image"] = str(final_image(args.from_run))
    cfg = make_config(prompts, args.preset, **overrides)
    out = args.out if args.out is not None else default_out(prompts[0])
    check_device(cfg.device)
    for p in cfg.prompts:  # unreadable images fail now, before models are loaded
        run_parents(p, cfg.init_image)
    existed = out.exists()
    prepare_out_dir(out, args.overwrite)  # refuse a bad --out before spending time on models
    try:
        decoder, clip = load_models(cfg)
    except BaseException:
        if not existed and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind for a run that never started
        raise
    models = describe_models(decoder, clip)
    print(f"clipguide: preset {args.preset}; decoder {models['decoder']['name']}, CLIP {models['clip']['name']}; "
          f"{len(cfg.runs())} run(s) x {cfg.steps} steps -> {out}", file=sys.stderr)
    saver = Snapshotter(out, cfg, models, preset=args.preset, overwrite=True)
    progress = Progress(cfg.steps, disable=args.quiet)
    try:
        result = optimise(cfg, decoder, clip, [saver, progress])
    finally:
        progress.close()
    saver.finish(result)
    state = "interrupted at" if result.interrupted else "finished"
    print(f"clipguide: {state} step {result.steps_done}; images, manifest.json and contact_sheet.png in {out}", file=sys.stderr)
    return EXIT_INTERRUPTED if result.interrupted else 0


def cmd_lineage(args) -> int:
    from .lineage import draw_lineage, format_lineage, lineage

    print(format_lineage(lineage(args.run_dir)))
    if args.draw is not None:
        draw_lineage(args.run_dir, args.draw)
        print(f"clipguide: lineage drawn to {args.draw}", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    from .presets import DEFAULT_PRESET, PRESETS

    for name, p in PRESETS.items():
        mark = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name}{mark}\n  {p.summary}")
        if p.deviations:
            print(f"  deviations: {p.deviations}")
        if args.verbose:
            print(f"  config: {p.config.to_json()}")
    return 0


def cmd_models(args) -> int:
    from .decoders import DECODERS
    from .weights import cache_dir

    print(f"decoders (cache: {cache_dir()}):")
    for name, entry in DECODERS.items():
        print(f"  {name:24s} {entry['about']}{cached_note(name)}")
    print("CLIP: 'shapes' (shipped), a config .json, NAME/PATH, or any open_clip NAME/TAG:")
    from .clip import list_clip_models

    for model, tag in list_clip_models():
        print(f"  {model}/{tag}")
    return 0


def cached_note(name: str) -> str:
    from .decoders import DECODERS, resolve_shipped, taming_cache_paths
    from .weights import DALLE_FILES, cache_dir

    entry = DECODERS[name]
    if "path" in entry:
        return " [shipped]" if resolve_shipped(entry["path"]).exists() else " [missing: run clipguide train-shapes]"
    if entry["format"] == "taming":
        cached = all(p.exists() for p in taming_cache_paths(name))
    else:
        cached = (cache_dir() / "dalle" / Path(DALLE_FILES["decoder"]["url"]).name).exists()
    return " [cached]" if cached else " [not cached: downloaded on first use]"


def cmd_train_shapes(args) -> int:
    from .shapes import train

    return train.main(args.args) or 0


COMMANDS = {"generate": cmd_generate, "blend": cmd_blend, "lineage": cmd_lineage, "presets": cmd_presets,
            "models": cmd_models, "train-shapes": cmd_train_shapes}


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (already printed, one line) and --help
        return e.code
    try:
        return COMMANDS[args.command](args)
    except ClipguideError as e:
        print(f"clipguide: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("clipguide: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
