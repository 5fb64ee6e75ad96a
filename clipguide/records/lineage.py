"""Lineage of generations: the images a run grew from, traced back through manifests.

Each run's manifest lists its ``parents`` (its init image and image prompts, with
file and sha256).  A parent that clipguide made carries its provenance in its PNG
``clipguide`` text chunk (run directory and run index), which leads to the manifest
of the run that made it, and so on back to images clipguide did not make.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from ..errors import ConfigError
from . import manifest
from .files import read_png_text, save_png
from .images import is_url, load_image, sha256_of
from .manifest import MANIFEST

MAX_DEPTH = 64  # generations followed at most (a guard against cyclic --overwrite histories)


@dataclass
class Node:
    """One image of a lineage and the parents it was made from."""

    image: str  # file path (or URL) of the image
    role: str  # "run" (the image asked about), "init_image" or "image_prompt"
    sha256: str | None = None  # digest recorded by the child's manifest (for the root: the file's)
    status: str = "ok"  # "ok", "modified" (differs from the recorded digest), "missing", "url"
    run_dir: str | None = None  # the run that made the image, if clipguide made it
    run: int | None = None
    prompt: str | None = None
    parents: list["Node"] = field(default_factory=list)

    def walk(self, depth: int = 0):
        """(depth, node) pairs, depth first."""
        yield depth, self
        for p in self.parents:
            yield from p.walk(depth + 1)


def read_manifest(run_dir: Path) -> dict:
    """The checked manifest of a run directory (:func:`clipguide.records.manifest.read_manifest`)."""
    return manifest.read_manifest(Path(run_dir))


def resolve_run(path) -> tuple[Path, int | None]:
    """(run directory, run index or None) of ``RUN_DIR`` or ``RUN_DIR/run_NN``."""
    p = Path(path).expanduser()
    if (p / MANIFEST).is_file():
        return p, None
    if re.fullmatch(r"run_\d+", p.name) and (p.parent / MANIFEST).is_file():
        return p.parent, int(p.name[4:])
    raise ConfigError(f"{path} is not a clipguide run directory (it has no {MANIFEST}): give the --out of an earlier run")


def _pick_run(run_dir: Path, manifest: dict, run: int | None) -> int:
    runs = manifest.get("runs", [])
    if run is None and len(runs) > 1:
        raise ConfigError(f"{run_dir} holds {len(runs)} runs: pick one, e.g. {run_dir / 'run_00'}")
    run = run or 0
    if not 0 <= run < max(len(runs), 1):
        raise ConfigError(f"{run_dir} has no run {run}: it holds runs 0..{len(runs) - 1}")
    return run


def final_image(path, run: int | None = None) -> Path:
    """The last snapshot of a run (``RUN_DIR`` or ``RUN_DIR/run_NN``) per its manifest."""
    run_dir, picked = resolve_run(path)
    manifest = read_manifest(run_dir)
    run = _pick_run(run_dir, manifest, picked if run is None else run)
    snaps = [s for s in manifest.get("snapshots", []) if s.get("run") == run]
    if not snaps:
        raise ConfigError(f"run {run} of {run_dir} saved no snapshot yet: wait for it, or start from another run")
    return run_dir / max(snaps, key=lambda s: s["step"])["file"]


def run_prompt(path) -> str:
    """The prompt of a run (``RUN_DIR`` or ``RUN_DIR/run_NN``), to continue it."""
    run_dir, run = resolve_run(path)
    manifest = read_manifest(run_dir)
    return manifest["runs"][_pick_run(run_dir, manifest, run)]["prompt"]


def origin_of(image) -> tuple[Path, int] | None:
    """(run directory, run index) of the run that made ``image``, if clipguide made it: from
    the PNG's provenance, else from a manifest beside it listing it."""
    path = Path(image)
    if not path.is_file():
        return None
    try:
        prov = read_png_text(path).get("clipguide") or {}
    except (OSError, ValueError, SyntaxError):  # not a (readable) PNG: not ours
        prov = {}
    run_dir = prov.get("run_dir")
    if run_dir and (Path(run_dir) / MANIFEST).is_file():
        return Path(run_dir), int(prov.get("run", 0))
    return _listed_in_nearby_manifest(path)


def _listed_in_nearby_manifest(path: Path) -> tuple[Path, int] | None:
    """Images copied with their run directory, or written before provenance named it."""
    target = path.resolve()
    for run_dir in (path.parent, path.parent.parent):
        if not (run_dir / MANIFEST).is_file():
            continue
        for snap in read_manifest(run_dir).get("snapshots", []):
            if (run_dir / snap["file"]).resolve() == target:
                return run_dir, int(snap["run"])
    return None


def lineage(path, run: int | None = None, max_depth: int = MAX_DEPTH) -> Node:
    """The lineage tree of a run's final image (``RUN_DIR`` or ``RUN_DIR/run_NN``)."""
    image = final_image(path, run)
    return _node(str(image), "run", sha256_of(str(image)), max_depth, set())


def _node(image: str, role: str, sha: str | None, depth: int, seen: set) -> Node:
    node = Node(image, role, sha, status=_status(image, sha))
    origin = origin_of(image) if node.status in ("ok", "modified") else None
    if origin is None:
        return node
    run_dir, run = origin
    record = read_manifest(run_dir).get("runs", [])
    entry = record[run] if run < len(record) else {}
    node.run_dir, node.run, node.prompt = str(run_dir), run, entry.get("prompt")
    key = (str(run_dir.resolve()), run)
    if depth <= 0 or key in seen:
        return node
    seen = seen | {key}
    node.parents = [_node(p["file"], p["role"], p.get("sha256"), depth - 1, seen) for p in entry.get("parents", [])]
    return node


def _status(image: str, sha: str | None) -> str:
    if is_url(image):
        return "url"
    if not Path(image).is_file():
        return "missing"
    return "ok" if sha is None or sha256_of(image) == sha else "modified"


def format_lineage(node: Node) -> str:
    """The tree as indented text, one image a line."""
    lines = []
    for depth, n in node.walk():
        made = f" <- run {n.run} of {n.run_dir}: {n.prompt!r}" if n.run_dir else ""
        flag = "" if n.status == "ok" else f" [{n.status}]"
        digest = f" sha256 {n.sha256[:12]}" if n.sha256 else ""
        lines.append(f"{'   ' * depth}{n.role}: {n.image}{digest}{flag}{made}")
    return "\n".join(lines)


def draw_lineage(path, out_png, run: int | None = None, thumb: int = 96) -> Path:
    """Draw the lineage of a run as a tree of thumbnails: the run's image on top, each
    generation of parents one row further down, lines joining child and parent."""
    root = lineage(path, run)
    xs = _layout(root)
    depth = max(d for d, _ in root.walk()) + 1
    cell_w, cell_h = thumb + 24, thumb + 40
    sheet = Image.new("RGB", (int(max(xs.values()) * cell_w) + cell_w, depth * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for d, n in root.walk():
        x, y = int(xs[id(n)] * cell_w) + 12, d * cell_h + 4
        for p in n.parents:  # from below the child's labels to the top of the parent
            px = int(xs[id(p)] * cell_w) + 12
            draw.line([(x + thumb // 2, y + thumb + 28), (px + thumb // 2, y + cell_h)], fill="grey", width=2)
        sheet.paste(_thumbnail(n, thumb), (x, y))
        draw.text((x, y + thumb + 2), n.role.replace("_", " "), fill="black")
        draw.text((x, y + thumb + 14), (n.prompt or Path(n.image).name)[:18], fill="dimgray")
    out = Path(out_png)
    save_png(out, sheet, {"Description": f"clipguide lineage of {path}"})
    return out


def _layout(root: Node) -> dict[int, float]:
    """Horizontal slot of every node: leaves left to right, each child above the middle of its parents."""
    xs: dict[int, float] = {}
    next_leaf = [0]

    def place(n: Node) -> float:
        if not n.parents:
            xs[id(n)] = next_leaf[0]
            next_leaf[0] += 1
        else:
            xs[id(n)] = sum(place(p) for p in n.parents) / len(n.parents)
        return xs[id(n)]

    place(root)
    return xs


def _thumbnail(node: Node, size: int) -> Image.Image:
    if node.status in ("ok", "modified"):
        try:
            im = load_image(node.image)
            im.thumbnail((size, size))
            tile = Image.new("RGB", (size, size), "white")
            tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
            return tile
        except ConfigError:
            pass
    tile = Image.new("RGB", (size, size), "lightgrey")
    ImageDraw.Draw(tile).text((4, size // 2 - 6), node.status, fill="black")
    return tile
