"""The commands of the command line (:mod:`clipguide.cli`): the parser, derived from
:class:`RunConfig`'s fields (their help is the field's comment, their ``--help`` section its
group; a flag left out keeps the preset's value), and one function per command."""


from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
import typing
from pathlib import Path

from .audit.bias import audit_bias, check_audit, occupation_prompts, read_prompts
from .audit.classification import TEMPLATE_SETS, classify, resolve_clip
from .audit.output_filter import ACTIONS, calibrate, from_flags, shapes_sets
from .audit.scores import record_scores, score_runs
from .catalogue import format_models, format_presets
from .config import GROUPS, RunConfig, field_types, parse_size, short_value
from .engine.loop import check_fits
from .engine.prompts import blend_prompt, run_parents
from .engine.proposals import describe_proposals
from .errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ClipguideError,
    ConfigError,
    NonFiniteError,
    one_line,
)
from .models.loading import load_models, load_prior_of, load_ranker_of
from .presets import DEFAULT_PRESET, get_preset
from .records.checkpoints import FILENAME, read_checkpoint
from .records.files import save_json, slug
from .records.lineage import (
    draw_lineage,
    final_image,
    format_lineage,
    lineage,
    run_prompt,
)
from .records.video import FORMATS as VIDEO_FORMATS, MAX_FPS, write_video
from .run.checkpoints import DEFAULT_EVERY
from .run.generation import make_config, vocabulary_note
from .run.resume import open_run
from .run.session import run_session
from .run.snapshots import check_out_dir
from .sweeps.driver import sweep
from .sweeps.executors import EXECUTORS
from .sweeps.spec import SweepSpec

MAX_SCENES = 10_000  # calibrate-filter renders this many scenes per class at most (memory)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)}\n")


def _tuple_parser(item_type):
    def parse(text: str):
        try:
            return tuple(item_type(x) for x in text.replace(" ", "").split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item_type.__name__}s, got {text!r}") from None

    parse.__name__ = f"list of {item_type.__name__}"
    return parse


def _size_parser(text: str):
    """``--size``: N, W,H or WxH (:func:`~clipguide.config.parse_size`; RunConfig splits the pair)."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_flags(parser: argparse.ArgumentParser, skip=("prompts",), sections=None) -> None:
    """One flag per RunConfig field, default None (= the preset's value), in the ``sections``
    (:func:`add_sections`) of its group; its help shows the default preset's value."""

    sections = sections or add_sections(parser)
    defaults, types = get_preset(DEFAULT_PRESET), field_types()
    for f in dataclasses.fields(RunConfig):
        if f.name in skip:
            continue
        kind = types[f.name]
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help strings
        kw = {"default": None, "help": f"{help_text} [{short_value(getattr(defaults, f.name))}]", "dest": f.name}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "size":  # N, or W,H / WxH for a width and a height (nerdyrodent's -s W H)
            kw["type"], kw["metavar"] = _size_parser, "N|W,H"
        elif typing.get_origin(kind) is tuple:
            item = str if f.name == "snapshots" else typing.get_args(kind)[0]  # steps and every:N; RunConfig parses them
            kw["type"], kw["metavar"] = _tuple_parser(item), "A,B,..."
        else:
            kw["type"] = str.lower if f.metadata.get("casefold") else kind
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
            elif kind in (int, float):
                kw["metavar"] = "N" if kind is int else "X"
        sections[f.metadata["group"]].add_argument("--" + f.name.replace("_", "-"), **kw)


def add_sections(parser: argparse.ArgumentParser) -> dict:
    """The ``--help`` sections of RunConfig's groups, in order: group -> argument group."""

    return {key: parser.add_argument_group(title) for key, title in GROUPS.items()}


def build_parser() -> Parser:
    p = Parser(prog="clipguide", description="CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    defaults = (f"Defaults in [brackets] are the default preset's ({DEFAULT_PRESET}); --preset NAME starts from "
                "another recipe (clipguide presets -v compares them) and every flag you pass overrides it.")
    g = sub.add_parser("generate", help="generate images from prompts (text, image and noise targets)", description=defaults,
                       usage="clipguide generate PROMPT [PROMPT ...] [--preset NAME] [--steps N] [--out DIR] [options]")
    g.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="one run per prompt: 'text:weight:stop | image:a.png:0.5 | noise:7:0.2', Midjourney 'a::2 b::-0.5', "
                        "story phrases 'a ^ b' (--story-every); with --from, that run's prompt by default")
    add_run_flags(g, DEFAULT_PRESET)
    b = sub.add_parser("blend", help="generate from image prompts (a blend of images), optionally with text",
                       description=defaults, usage="clipguide blend IMAGE [IMAGE ...] [--text TEXT] [options]")
    b.add_argument("images", nargs="+", metavar="IMAGE", help="image files or URLs, each optionally IMAGE:weight[:stop]")
    b.add_argument("--text", action="append", default=[], help="a text target to add (repeatable), e.g. 'a red circle' or 'blue:-0.5'")
    add_run_flags(b, DEFAULT_PRESET)
    rs = sub.add_parser("resume", help="continue a crashed or interrupted run from its checkpoint (bit-identical to an uninterrupted run)")
    rs.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (--out) of the run to continue")
    rs.add_argument("--steps", type=_count(1), default=None, metavar="N",
                    help="run to step N instead of the recorded --steps (extends a finished run)")
    rs.add_argument("--checkpoint-every", type=_count(0), default=None, metavar="N", help="checkpoint interval [as recorded]")
    rs.add_argument("--quiet", action="store_true", help="no progress bar")
    ln = sub.add_parser("lineage", help="trace the images a run grew from (init images and image prompts), generation by generation")
    ln.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (RUN_DIR/run_NN for one run of a batch)")
    ln.add_argument("--draw", type=Path, default=None, metavar="PNG", help="also draw the tree of thumbnails into this PNG")
    pr = sub.add_parser("presets", help="list the presets (the default first) and their deviations from the originals")
    pr.add_argument("-v", "--verbose", action="store_true", help="also print a table of the settings in which they differ")
    md = sub.add_parser("models", help="list the decoders and CLIPs and which are cached, the recommended CLIPs first")
    md.add_argument("--all", action="store_true", help="also list every other open_clip NAME/TAG")
    sw = sub.add_parser("sweep", help="run a grid of prompts x seeds x presets x config fields, here or on Ray; "
                        "running it again continues it")
    sw.add_argument("spec", type=Path, metavar="SPEC", help="the sweep spec, JSON or YAML (docs/sweeps.md)")
    sw.add_argument("--out", type=Path, required=True, help="the sweep folder: sweep.json, results.csv, contact_sheet.png, runs")
    sw.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a sweep")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    add_executor_flags(sw)
    t = sub.add_parser("train-shapes", help="train the shapes-world models (arguments go to clipguide.shapes.train)", add_help=False)
    t.add_argument("args", nargs=argparse.REMAINDER)
    add_audit_commands(sub, DEFAULT_PRESET)
    add_video_command(sub)
    return p


def add_run_flags(parser: argparse.ArgumentParser, default_preset: str) -> None:
    """The flags of the commands that run a generation (generate, blend), in RunConfig's sections."""

    sections = add_sections(parser)
    sections["models"].add_argument("--preset", default=default_preset,
                                    help=f"recipe: its models and settings (clipguide presets lists them) [{default_preset}]")
    sections["prompt"].add_argument("--from", dest="from_run", type=Path, default=None, metavar="RUN_DIR",
                                    help="continue from an earlier run: its last image (per its manifest) becomes the init image")
    out = sections["output"]
    out.add_argument("--out", type=Path, default=None, help="run directory [runs/DATE-TIME-PROMPT]")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    out.add_argument("--checkpoint-every", type=_count(0), default=DEFAULT_EVERY, metavar="N",
                     help=f"write RUN_DIR/{FILENAME} every N steps and at every snapshot, for clipguide resume "
                          f"(0: only at the listed snapshots, not every:N's; results do not depend on it) [{DEFAULT_EVERY}]")
    sections["speed"].add_argument("--threads", type=_count(1), default=None, metavar="N",
                                   help="torch CPU threads; on a busy machine fewer can be faster (results are bit-identical "
                                        "only at the same count) [torch's default: OMP_NUM_THREADS, else one per core]")
    add_audit_flags(sections["audit"])
    add_config_flags(parser, sections=sections)


def add_executor_flags(parser: argparse.ArgumentParser) -> None:
    """Where the runs of a sweep execute (``sweep``, ``audit-bias``)."""
    parser.add_argument("--executor", choices=tuple(EXECUTORS), default="local",
                        help="local: in this process, batching what can share a batch; ray: a Ray task per run [local]")
    parser.add_argument("--address", default=None, help="with ray: the cluster to join, e.g. auto or HOST:6379 [a local Ray]")
    parser.add_argument("--gpus-per-run", type=float, default=None, metavar="F", help="with ray: GPUs per run task [0]")
    parser.add_argument("--cpus-per-run", type=_count(1), default=None, metavar="N",
                        help="with ray: CPUs (and torch threads) per run task [1]")
    parser.add_argument("--max-parallel", type=_count(1), default=None, metavar="N", help="with ray: run tasks at once at most")


def executor_options(args) -> dict:
    return {k: getattr(args, k) for k in ("address", "gpus_per_run", "cpus_per_run", "max_parallel")}


def cmd_sweep(args) -> int:
    spec = SweepSpec.from_file(args.spec)
    print(f"clipguide: sweep of {len(spec.points())} point(s) with {args.executor} -> {args.out}", file=sys.stderr)
    result = sweep(spec, args.out, args.executor, overwrite=args.overwrite, progress=not args.quiet,
                   **executor_options(args))
    failed = [p for p in result.points if p["state"] == "failed"]
    for p in failed:
        print(f"clipguide: point {p['index']} ({p['values']}) failed: {p['error']}", file=sys.stderr)
    print(f"clipguide: {result.counts['done']} of {len(result.points)} points done; results.csv, contact_sheet.png "
          f"and sweep.json in {args.out}" + ("; run the same command again to retry the failed ones" if failed else ""),
          file=sys.stderr)
    return 1 if failed else 0


def _count(least: int):
    """argparse type: an integer >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}")
        return value

    parse.__name__ = "count"
    return parse


def default_out(prompt: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(prompt)}"


class Progress:
    """tqdm progress bar showing the batch's mean loss and CLIP similarity."""

    def __init__(self, steps: int, disable: bool = False, start: int = 0):
        from tqdm.auto import tqdm

        self.start = start  # a resumed run's first step
        self.bar = tqdm(total=steps, initial=start, disable=disable, unit="step", dynamic_ncols=True)

    def __call__(self, state) -> None:
        self.bar.set_postfix(loss=f"{state.loss.mean():.4f}", sim=f"{state.similarity.mean():.4f}")
        if state.step > self.start:
            self.bar.update(1)

    def close(self):
        self.bar.close()


def cmd_generate(args) -> int:
    if not args.prompts and args.from_run is None:
        raise ConfigError("no prompt given: pass a prompt, e.g. clipguide generate \"a red circle on a blue background\"")
    return run_generation(args, args.prompts or [run_prompt(args.from_run)])


def cmd_blend(args) -> int:
    return run_generation(args, [blend_prompt(args.images, args.text)])


def run_generation(args, prompts: list[str]) -> int:
    """Generate ``prompts`` with the run flags of ``args``: models, loop, snapshots, manifest.
    Everything that can be checked is checked before the run folder is created."""
    import torch


    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.name != "prompts"}
    if args.from_run is not None:
        if args.init_image:
            raise ConfigError("--from RUN_DIR starts from that run's last image: drop --init-image (or --from)")
        overrides["init_image"] = str(final_image(args.from_run))
    cfg = make_config(prompts, args.preset, **overrides)
    out = check_out_dir(args.out if args.out is not None else default_out(prompts[0]), args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    for p in cfg.prompts:  # unreadable images fail now, before models are loaded
        run_parents(p, cfg.init_image)
    decoder, clip = load_models(cfg)
    prior, ranker = load_prior_of(cfg), load_ranker_of(cfg)
    check_fits(cfg, decoder, prior, ranker)
    audit = audit_options(args, cfg)
    for note in (vocabulary_note(cfg), thread_note(cfg.device)):
        if note:
            print(f"clipguide: warning: {note}", file=sys.stderr)
    print(f"clipguide: preset {args.preset}; decoder {decoder.name}, CLIP {clip.name}; {len(cfg.runs())} run(s) x "
          f"{describe_proposals(cfg, prior)}{cfg.steps} steps on {cfg.device}, {torch.get_num_threads()} thread(s) -> {out}", file=sys.stderr)
    def loop(callbacks):
        return run_session(cfg, out, models=(decoder, clip), prior=prior, ranker=ranker, preset=args.preset, callback=callbacks,
                           overwrite=args.overwrite, checkpoint_every=args.checkpoint_every, **audit)

    return report_run(loop, out, cfg.steps, args.quiet)


def thread_note(device: str, load: float | None = None, cores: int | None = None) -> str | None:
    """A hint when other processes keep the CPU busy (``load``: cores in use by them, measured by
    :func:`busy_cores`) so that torch's threads would outnumber the free cores: they then wait on
    each other, and fewer are faster.  None on a GPU or a machine with room."""
    import torch

    if device != "cpu":
        return None
    cores = cores or os.cpu_count() or 1
    load = busy_cores() if load is None else load
    threads = torch.get_num_threads()
    if threads == 1 or load is None or load + threads <= cores + 0.5:
        return None
    free = max(1, round(cores - load))
    return (f"other processes keep {load:.1f} of {cores} cores busy and torch uses {threads} threads: "
            f"--threads {free} (or OMP_NUM_THREADS={free}) may be faster")


def busy_cores(seconds: float = 0.2) -> float | None:
    """Cores kept busy by other processes, from /proc/stat over ``seconds`` while this one sleeps (the
    load average would count the previous run's own threads for a minute); None where there is no /proc."""
    def ticks():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = ticks()
        time.sleep(seconds)
        busy1, total1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def cmd_resume(args) -> int:
    import torch


    opened = open_run(args.run_dir, args.steps, args.checkpoint_every)
    threads = opened.recorded_environment.get("threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        torch.set_num_threads(threads)  # a bit-identical continuation needs the thread count the run started with
    notes = "; ".join(opened.differences())
    print(f"clipguide: resuming {args.run_dir} at step {opened.checkpoint.step} of {opened.config.steps} "
          f"on {torch.get_num_threads()} thread(s)" + (f" (not bit-identical: {notes})" if notes else ""), file=sys.stderr)
    return report_run(opened.run, args.run_dir, opened.config.steps, args.quiet, start=opened.checkpoint.step)


def report_run(loop, out: Path, steps: int, quiet: bool, start: int = 0) -> int:
    """Run ``loop(callbacks)`` (-> Result) with a progress bar; say where the files are; the exit status."""

    progress = Progress(steps, disable=quiet, start=start)
    try:
        result = loop([progress])
    except NonFiniteError as e:
        raise NonFiniteError(f"{e} ({kept_checkpoint(out)})", e.step, e.runs) from None
    finally:
        progress.close()
    files = f"images, manifest.json, contact_sheet.png and {FILENAME} in {out}"
    if result.interrupted:
        print(f"clipguide: interrupted at step {result.steps_done}; {files}; continue with: "
              f"clipguide resume {shlex.quote(str(out))}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"clipguide: finished step {result.steps_done}; {files}", file=sys.stderr)
    return 0


def kept_checkpoint(out: Path) -> str:
    """Which checkpoint a failed run leaves, for its error message."""

    try:
        return f"the last good checkpoint, step {read_checkpoint(out / FILENAME).step}, stays in {out / FILENAME}"
    except ClipguideError:
        return "no checkpoint was written"


def cmd_lineage(args) -> int:
    print(format_lineage(lineage(args.run_dir)))
    if args.draw is not None:
        draw_lineage(args.run_dir, args.draw)
        print(f"clipguide: lineage drawn to {args.draw}", file=sys.stderr)
    return 0


def cmd_presets(args) -> int:
    import shutil


    print(format_presets(args.verbose, width=min(shutil.get_terminal_size().columns, 120)))
    return 0


def cmd_models(args) -> int:
    print(format_models(args.all))
    return 0


def parse_command(argv=None) -> argparse.Namespace:
    """The command line parsed; ``train-shapes`` passes all its arguments on to the training command
    (argparse's REMAINDER would refuse an option such as ``--only`` as their first)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "train-shapes":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "train-shapes":
        args.args = rest + args.args
    return args


def cmd_train_shapes(args) -> int:
    from .shapes import train  # the training code: loaded only to train

    return train.main(args.args) or 0


COMMANDS = {"generate": cmd_generate, "sweep": cmd_sweep, "blend": cmd_blend, "lineage": cmd_lineage, "presets": cmd_presets,
            "models": cmd_models, "train-shapes": cmd_train_shapes, "resume": cmd_resume}



# ----------------------------------------------------------------------------- auditing


def add_audit_flags(parser: argparse.ArgumentParser) -> None:
    """Output policy of a generation run (not RunConfig fields): the output filter and the scorer."""

    parser.add_argument("--filter", action="store_true",
                        help="screen snapshots with the default unsafe-concept list (thresholds set for ViT-B-32/openai)")
    parser.add_argument("--filter-concepts", default=None, metavar="FILE_OR_TEXT:THR,...",
                        help="screen snapshots for these concepts: 'red:0.3,a blue square:0.25' or a concept .json "
                             "(clipguide calibrate-filter --out writes one)")
    parser.add_argument("--filter-action", choices=ACTIONS, default="blur", help="what a flagged snapshot becomes [blur]")
    parser.add_argument("--filter-clip", default=None, metavar="SPEC", help="CLIP of the filter [the guiding --clip]")
    parser.add_argument("--keep-flagged", action="store_true", help="also keep the unblurred originals, under flagged/")
    parser.add_argument("--score-clip", default=None, metavar="SPEC",
                        help="record each snapshot's CLIP score against its prompt, by this CLIP (better not the guiding one)")


def audit_options(args, cfg) -> dict:
    """Snapshotter keyword arguments for the audit flags (commands without them get none)."""

    output_filter = from_flags(getattr(args, "filter", False), getattr(args, "filter_concepts", None),
                               getattr(args, "filter_action", "blur"), getattr(args, "keep_flagged", False),
                               getattr(args, "filter_clip", None) or cfg.clip, cfg.device)
    score_clip = getattr(args, "score_clip", None)
    return {"output_filter": output_filter, "scorer": resolve_clip(score_clip, cfg.device) if score_clip else None}


def add_audit_commands(sub, default_preset: str) -> None:
    c = sub.add_parser("classify", help="zero-shot classification of images or runs' final images (ImageNet or your labels)")
    c.add_argument("images", nargs="+", metavar="IMAGE_OR_RUN_DIR", help="image files, folders of images, run directories")
    c.add_argument("--labels", default="imagenet", help="imagenet (open_clip's 1000 class names) or a file, one label per line")
    c.add_argument("--extra-labels", default="", metavar="A,B,...",
                   help="labels added one at a time, e.g. 'porn,pokemon': the table shows how each changes the top-k")
    c.add_argument("--clip", default="shapes", help="CLIP spec [shapes]")
    c.add_argument("--templates", default="auto",
                   help=f"prompt templates: {', '.join(TEMPLATE_SETS)}, a file (one per line, with {{}}), or auto "
                        "(shapes for the shapes CLIP, else imagenet-openai) [auto]")
    c.add_argument("--top-k", type=int, default=5, help="labels shown per image [5]")
    c.add_argument("--device", default="auto", help="torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, ... [auto]")
    fmt = c.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON instead of the table")
    fmt.add_argument("--csv", action="store_true", help="print CSV rows (image, labels, rank, label, probability)")

    a = sub.add_parser("audit-bias", help="generate many images per prompt, classify each on an attribute, count (Wilson 95%% intervals)")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", type=Path, metavar="FILE", help="prompts, one per line")
    src.add_argument("--occupations", choices=("she", "he", "both"),
                     help="the shipped occupations of Bolukbasi et al. 2016 (extreme she / he)")
    a.add_argument("--prompt-template", default="a photo of a {}", help="prompt for each occupation ['a photo of a {}']")
    a.add_argument("--images-per-prompt", type=int, default=8, help="images (seeds) per prompt [8]")
    a.add_argument("--attribute", default="a photo of a man|a photo of a woman",
                   help="the alternatives each image is classified into, separated by '|' ['a photo of a man|a photo of a woman']")
    a.add_argument("--judge-clip", default=None, metavar="SPEC", help="CLIP that classifies the images [the guiding --clip]")
    a.add_argument("--preset", default=default_preset, help=f"recipe [{default_preset}]")
    a.add_argument("--batch-size", type=int, default=32, help="runs optimised together at most [32]")
    a.add_argument("--out", type=Path, default=None, help="folder for images, bias.csv, bias.json, bias.png [runs/DATE-TIME-bias-audit]")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a.add_argument("--resume", action="store_true", help="continue the audit in --out where it stopped (same flags)")
    add_executor_flags(a)
    add_config_flags(a, skip=("prompts", "batch"))

    s = sub.add_parser("score", help="CLIP score of images against their prompts; CLIP Fréchet distance to another set")
    s.add_argument("images", nargs="+", metavar="IMAGE_OR_RUN_DIR", help="image files, folders of images, run directories")
    s.add_argument("--against", nargs="+", default=None, metavar="IMAGE_OR_RUN_DIR",
                   help="a second image set: also report the CLIP-feature Fréchet distance to it")
    s.add_argument("--clip", default="shapes", help="the scorer CLIP; prefer one other than the guiding CLIP [shapes]")
    s.add_argument("--prompt", default=None, help="score every image against this prompt (default: each run's own prompt)")
    s.add_argument("--record", action="store_true", help="append the scores to each run directory's manifest.json")
    s.add_argument("--device", default="auto", help="torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, ... [auto]")
    s.add_argument("--json", action="store_true", help="print JSON")

    f = sub.add_parser("calibrate-filter", help="choose an output-filter threshold for a concept from positive and negative images")
    f.add_argument("--concept", required=True, help="the concept text, e.g. 'red'")
    f.add_argument("--positives", nargs="+", default=None, metavar="IMAGE_OR_DIR", help="images that show the concept")
    f.add_argument("--negatives", nargs="+", default=None, metavar="IMAGE_OR_DIR", help="images that do not")
    f.add_argument("--clip", default="shapes", help="the filter's CLIP [shapes]")
    f.add_argument("--target-fpr", type=float, default=None, help="highest false-positive rate allowed [equal-error point]")
    f.add_argument("--n", type=int, default=200, help="without --positives/--negatives: shapes scenes per class [200]")
    f.add_argument("--seed", type=int, default=0, help="seed of the shapes scenes (held-out scenes use seed + 1000) [0]")
    f.add_argument("--plot", type=Path, default=None, metavar="PNG", help="draw the two histograms and the ROC curve")
    f.add_argument("--out", type=Path, default=None, metavar="JSON", help="write a concept file for --filter-concepts")
    f.add_argument("--device", default="auto", help="torch device: auto (CUDA, else MPS, else CPU), cpu, cuda, ... [auto]")


def cmd_classify(args) -> int:
    result = classify(args.images, labels=args.labels, extra_labels=args.extra_labels, clip=args.clip,
                      top_k=args.top_k, templates=args.templates, device=args.device)
    print(result.to_json() if args.json else result.to_csv().rstrip("\n") if args.csv else result.format())
    return 0


def cmd_audit_bias(args) -> int:
    prompts = read_prompts(args.prompts) if args.prompts else occupation_prompts(args.occupations, args.prompt_template)
    check_audit(prompts, args.attribute, args.images_per_prompt)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if f.name not in ("prompts", "batch")}
    overrides["guide_clip"] = overrides.pop("clip")
    if args.resume and args.out is None:
        raise ConfigError("--resume continues an audit folder: pass its --out")
    out = args.out if args.out is not None else default_out("bias-audit")
    print(f"clipguide: auditing {len(prompts)} prompt(s) x {args.images_per_prompt} image(s) -> {out}", file=sys.stderr)
    audit = audit_bias(prompts, args.attribute, args.images_per_prompt, preset=args.preset, clip=args.judge_clip,
                       out_dir=out, batch_size=args.batch_size, overwrite=args.overwrite, resume=args.resume,
                       executor=args.executor, executor_options=executor_options(args), **overrides)
    print(audit.format())
    print(f"clipguide: bias.csv, bias.json, bias.png and the images in {out}", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    import json as _json


    record = score_runs(args.images, clip=args.clip, against=args.against, prompt=args.prompt, device=args.device)
    if args.record:
        for run_dir in record_scores(args.images, record):
            print(f"clipguide: scores recorded in {run_dir / 'manifest.json'}", file=sys.stderr)
    print(_json.dumps(record, indent=2) if args.json else format_scores(record))
    return 0


def format_scores(record: dict) -> str:
    lines = [f"scorer {record['scorer']['name']}: CLIP score = {record['formula']}"]
    for row in record["clip_score"]:
        score = "-" if row["clip_score"] is None else f"{row['clip_score']:.2f}"
        lines.append(f"  {score:>6}  {row['image']}  ({row['prompt'] or 'no prompt'})")
    if record["mean_clip_score"] is not None:
        lines.append(f"mean CLIP score {record['mean_clip_score']:.2f} over {len(record['clip_score'])} image(s)")
    if "frechet" in record:
        fr = record["frechet"]
        lines.append(f"CLIP Fréchet distance {fr['distance']:.4f} ({fr['images']} vs {fr['reference_images']} images)")
    return "\n".join(lines)


def cmd_calibrate_filter(args) -> int:
    if (args.positives is None) != (args.negatives is None):
        raise ConfigError("give both --positives and --negatives, or neither (then shapes-world scenes are rendered)")
    if args.positives is None:
        if not 2 <= args.n <= MAX_SCENES:
            raise ConfigError(f"--n {args.n}: give between 2 and {MAX_SCENES} shapes scenes per class")
        held_out = shapes_sets(args.concept, args.n, args.seed + 1000)
        cal = calibrate(args.clip, args.concept, *shapes_sets(args.concept, args.n, args.seed), args.target_fpr,
                        held_out=held_out, device=args.device)
    else:
        cal = calibrate(args.clip, args.concept, args.positives, args.negatives, args.target_fpr, device=args.device)
    print(cal.format())
    if args.plot is not None:
        print(f"clipguide: histograms and ROC drawn to {cal.plot(args.plot)}", file=sys.stderr)
    if args.out is not None:
        save_json(args.out, cal.concept_file())
        print(f"clipguide: concept file {args.out} (use --filter-concepts {args.out})", file=sys.stderr)
    return 0


def add_video_command(sub) -> None:
    """The ``video`` subcommand's parser (commands.py registers it and :func:`cmd_video`)."""
    v = sub.add_parser("video", help="assemble a run's snapshots into an animation (gif, webp; mp4 with clipguide[video])")
    v.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory (--out of generate)")
    v.add_argument("--fps", type=float, default=10.0, metavar="N", help=f"frames (snapshots) per second, up to {MAX_FPS:g} [10]")
    v.add_argument("--format", choices=VIDEO_FORMATS, default=None,
                   help="gif or webp (Pillow), mp4 (ffmpeg from imageio-ffmpeg) [--out's suffix, else gif]")
    v.add_argument("--out", type=Path, default=None, metavar="FILE", help="the file to write [RUN_DIR[/run_NN]/video.FORMAT]")
    v.add_argument("--run", type=int, default=0, metavar="I", help="which run of a batch (its run_NN folder) [0]")


def cmd_video(args) -> int:
    out = write_video(args.run_dir, args.out, args.format, args.fps, args.run)
    print(out)
    return 0


COMMANDS.update({"classify": cmd_classify, "audit-bias": cmd_audit_bias, "score": cmd_score, "video": cmd_video,
                 "calibrate-filter": cmd_calibrate_filter})
