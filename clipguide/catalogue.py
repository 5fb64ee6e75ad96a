"""The catalogue: what ``clipguide presets`` and ``clipguide models`` print.

Both listings are returned as strings, so the CLI only prints them and tests can read them.
Cache status comes from the files on disk alone: listing the models never downloads or
touches the network.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import open_clip

from .config import RunConfig, _flag, short_value
from .models.clip import (
    RECOMMENDED_CLIPS,
    SHAPES_CLIP,
    _cached_pretrained,
    list_clip_models,
)
from .models.decoders import DECODERS, local_files
from .models.weights import cache_dir
from .presets import COMMON_DEVIATIONS, DEFAULT_PRESET, PRESETS, Preset

NOT_CACHED = "not cached: downloaded on first use"
MISSING_SHIPPED = "missing: run clipguide train-shapes"
SAME_FIELDS_NOTE = ("fields not shown are the same in every preset "
                    "(clipguide generate --help lists them with the default preset's values)")
OTHER_CLIP_SPECS = ("also: a config .json, NAME/PATH to a local weights file, "
                    "or A+B to guide with several (e.g. shapes+ViT-B-32/openai)")


# ----------------------------------------------------------------------------- presets


def presets_in_order() -> list[Preset]:
    """The default preset first (it is what a bare ``clipguide generate`` runs), then the table's order."""
    return [PRESETS[DEFAULT_PRESET]] + [p for name, p in PRESETS.items() if name != DEFAULT_PRESET]


def format_presets(verbose: bool = False, width: int = 100) -> str:
    """The presets with their summaries and deviations, wrapped to ``width``; ``verbose`` adds
    a table of the config fields on which they differ."""
    presets = presets_in_order()
    lines = []
    for p in presets:
        if lines:
            lines.append("")
        lines.append(p.name + (" (default)" if p.name == DEFAULT_PRESET else ""))
        lines += _wrap(p.summary, width, "  ")
        if p.deviations:
            lines += _wrap(p.deviations, width, "  deviations: ", "    ")
    lines += ["", "deviations of every notebook preset:"]
    lines += [line for text in COMMON_DEVIATIONS for line in _wrap(text, width, "  * ", "    ")]
    if verbose:
        lines += ["", *_wrap("config fields that differ between presets:", width, ""), ""]
        lines += _table([""] + [p.name for p in presets], _differing_fields(presets), width)
        lines += [""] + _wrap(SAME_FIELDS_NOTE, width, "")
    return "\n".join(lines)


def _wrap(text: str, width: int, first: str, rest: str | None = None) -> list[str]:
    # Names like shapes-dvae and ranges like 0.8-0.99 stay whole: split, they read as two words.
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=first if rest is None else rest,
                         break_on_hyphens=False, break_long_words=False)


def _differing_fields(presets: list[Preset]) -> list[list[str]]:
    """[flag, value in each preset] for every RunConfig field (in declaration order) that is not
    the same in all ``presets``; prompts are the user's, never a preset's."""
    rows = []
    for f in dataclasses.fields(RunConfig):
        values = [getattr(p.config, f.name) for p in presets]
        if f.name != "prompts" and any(v != values[0] for v in values):
            rows.append([_flag(f.name)] + [short_value(v) for v in values])
    return rows


def _table(header: list[str], rows: list[list[str]], width: int) -> list[str]:
    """Aligned columns.  Column 0 labels the rows; when the other columns do not fit ``width``
    they are split into blocks, one under the other, each repeating column 0."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    blocks, block, used = [], [], widths[0]
    for i in range(1, len(header)):
        if block and used + 2 + widths[i] > width:  # a column alone in a block may still be too wide
            blocks.append(block)
            block, used = [], widths[0]
        block.append(i)
        used += 2 + widths[i]
    blocks.append(block)
    lines = []
    for block in blocks:
        if lines:
            lines.append("")
        for row in [header, *rows]:
            lines.append("  ".join(row[i].ljust(widths[i]) for i in [0, *block]).rstrip())
    return lines


# ----------------------------------------------------------------------------- models


def decoder_status(name: str) -> str:
    """Whether registry decoder ``name`` can be used now: shipped, cached, or what using it involves."""
    present = all(p.is_file() for p in local_files(name))
    if "path" in DECODERS[name]:
        return "shipped" if present else MISSING_SHIPPED
    return "cached" if present else NOT_CACHED


def clip_cached(spec: str, cache: Path | None = None) -> bool:
    """Whether the weights of open_clip ``NAME/TAG`` are in ``cache`` (default: the clipguide
    cache's open_clip folder), looked up without any download."""
    name, tag = spec.split("/")
    cache = cache_dir() / "open_clip" if cache is None else cache
    return _cached_pretrained(open_clip.get_pretrained_cfg(name, tag), cache) is not None


def _shipped_status(config: Path) -> str:
    # A shipped model is a .json with its weights in the sibling .safetensors; both are needed.
    present = config.is_file() and config.with_suffix(".safetensors").is_file()
    return "shipped" if present else MISSING_SHIPPED


def format_models(show_all: bool = False) -> str:
    """The decoders and CLIPs with their cache status: shapes, the recommended open_clip tags and
    any other cached ones, then the count of the rest (``show_all``: the rest, one a line)."""
    lines = [f"decoders (cache: {cache_dir()}):"]
    lines += _aligned([(name, f"{entry['about']} [{decoder_status(name)}]") for name, entry in DECODERS.items()])
    clip_cache = cache_dir() / "open_clip"
    every = [f"{name}/{tag}" for name, tag in list_clip_models()]
    # Looking up all ~200 tags takes about 0.1 s (local files only), so cached weights beyond
    # the recommended ones are found and listed up front.
    cached = {spec for spec in every if clip_cached(spec, clip_cache)}
    shown = list(RECOMMENDED_CLIPS) + [s for s in every if s in cached and s not in RECOMMENDED_CLIPS]
    rows = [("shapes", f"shapes-world CLIP [{_shipped_status(SHAPES_CLIP)}]")]
    rows += [(s, f"{'recommended ' if s in RECOMMENDED_CLIPS else ''}[{'cached' if s in cached else NOT_CACHED}]")
             for s in shown]
    lines += ["", f"CLIPs (open_clip cache: {clip_cache}):", *_aligned(rows)]
    rest = [s for s in every if s not in shown]
    if show_all:
        lines.append(f"  other open_clip NAME/TAG models ({NOT_CACHED}):")
        lines += [f"    {s}" for s in rest]
    else:
        lines.append(f"  {len(rest)} more open_clip NAME/TAG models: clipguide models --all")
    lines.append(f"  {OTHER_CLIP_SPECS}")
    return "\n".join(lines)


def _aligned(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in rows)
    return [f"  {name.ljust(width)}  {text}" for name, text in rows]
