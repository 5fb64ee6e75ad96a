"""A run's snapshots as an animation (``clipguide video RUN_DIR``): GIF or WebP through Pillow, mp4
through the ffmpeg that ``imageio-ffmpeg`` ships in its wheel (``pip install clipguide[video]``).

The frames are one run's snapshots in step order, as its ``manifest.json`` lists them.  The run's
provenance (prompt, seed, preset, models, config, the frames' steps: what a snapshot PNG's text
chunk holds, plus the fps) goes into the file's metadata: a GIF comment, the XMP packet of a WebP,
the ``comment`` tag of an mp4; :func:`read_video_provenance` reads it back from all three.

GIF and WebP encoders merge a frame identical to the one before into it (its duration added), so
such files may hold fewer frames than snapshots while lasting as long; mp4 keeps every frame.  GIF
counts time in hundredths of a second: 1000/fps ms is rounded to 10 ms there.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, OutputError
from .files import atomic_write
from .manifest import read_manifest, run_subdir

FORMATS = ("gif", "webp", "mp4")
MAX_FPS = 100.0  # GIF's finest delay is 10 ms
EXTRA = "clipguide[video]"  # the extra that installs imageio-ffmpeg


def run_frames(run_dir, run: int = 0) -> tuple[list[Path], list[int], dict]:
    """Run ``run``'s snapshot files in step order, their steps, and the manifest of ``run_dir``
    (one-line :class:`ConfigError` for a folder that is not a run's, a run out of range, no snapshots)."""
    run_dir = Path(run_dir).expanduser()
    manifest = read_manifest(run_dir)
    runs = len(manifest["runs"])
    if not 0 <= run < runs:
        raise ConfigError(f"--run {run} is out of range: {run_dir} holds {runs} run(s), 0..{runs - 1}")
    snaps = sorted((s for s in manifest["snapshots"] if s["run"] == run), key=lambda s: s["step"])
    if not snaps:
        raise ConfigError(f"run {run} of {run_dir} has no snapshots yet: nothing to animate")
    files = [run_dir / s["file"] for s in snaps]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"snapshot {missing[0]} listed in the manifest is missing: restore it, or resume the run")
    return files, [s["step"] for s in snaps], manifest


def provenance(manifest: dict, run: int, steps: list[int], fps: float, run_dir) -> dict:
    """What the animation records: the run (as its snapshots' PNG text does) and its frames."""
    record = manifest["runs"][run]
    return {"clipguide": {
        "prompt": record["prompt"], "seed": record["seed"], "run": run, "run_dir": str(run_dir),
        "preset": manifest.get("preset"), "models": manifest["models"], "config": manifest["config"],
        "version": manifest["environment"]["clipguide"], "steps": steps, "fps": fps}}


def load_frames(files: list[Path]) -> list[Image.Image]:
    frames = []
    for f in files:
        try:
            with Image.open(f) as im:
                frames.append(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - truncated, not an image: Pillow raises many types
            raise ConfigError(f"snapshot {f} is unreadable ({type(e).__name__}): restore it, or resume the run") from None
    if len({im.size for im in frames}) > 1:
        raise ConfigError(f"the snapshots of {files[0].parent} differ in size: they are not one run's")
    return frames


def write_video(run_dir, out=None, fmt: str | None = None, fps: float = 10.0, run: int = 0) -> Path:
    """Assemble run ``run``'s snapshots into ``out`` (default RUN_DIR[/run_NN]/video.FMT) at ``fps``
    frames per second, written atomically, with the run's provenance in the metadata; returns the path."""
    fmt = check_format(out, fmt)
    if not 0 < fps <= MAX_FPS:
        raise ConfigError(f"--fps must be more than 0 and at most {MAX_FPS:g}, got {fps:g}")
    files, steps, manifest = run_frames(run_dir, run)
    run_dir = Path(run_dir).expanduser()
    out = Path(out).expanduser() if out is not None else run_dir / run_subdir(len(manifest["runs"]), run) / f"video.{fmt}"
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {out} is a folder or in a folder that does not exist: name a file in an existing folder")
    text = json.dumps(provenance(manifest, run, steps, fps, run_dir), sort_keys=True)  # ASCII: \\u escapes
    WRITERS[fmt](out, load_frames(files), fps, text)
    return out


def check_format(out, fmt: str | None) -> str:
    """The format: ``fmt``, else the suffix of ``out``, else gif; a suffix that names another format is refused."""
    suffix = Path(out).suffix.lower().lstrip(".") if out is not None else ""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt and suffix in FORMATS and suffix != fmt:
        raise ConfigError(f"--out {out} names a .{suffix} file but --format is {fmt}: make them agree")
    return fmt or (suffix if suffix in FORMATS else "gif")


def write_gif(out: Path, frames: list[Image.Image], fps: float, text: str) -> None:
    atomic_write(out, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                               duration=1000 / fps, loop=0, comment=text.encode()))


def xmp_packet(text: str) -> bytes:
    """An XMP packet holding the provenance JSON (XML-escaped) as ``clipguide:provenance``."""
    return ('<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
            '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
            'xmlns:clipguide="https://github.com/clipguide/ns/1.0/"><clipguide:provenance>'
            f'{html.escape(text, quote=False)}</clipguide:provenance></rdf:Description></rdf:RDF></x:xmpmeta>'
            '<?xpacket end="w"?>').encode()


def write_webp(out: Path, frames: list[Image.Image], fps: float, text: str) -> None:
    # lossless: a snapshot's pixels survive (lossy WebP would smear the flat shapes' edges)
    atomic_write(out, lambda f: frames[0].save(f, format="WEBP", save_all=True, append_images=frames[1:],
                                               duration=round(1000 / fps), loop=0, lossless=True, xmp=xmp_packet(text)))


def ffmpeg_exe() -> str:
    """The ffmpeg of imageio-ffmpeg (installed with the ``video`` extra), or a one-line error naming the extra."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise ConfigError(f"--format mp4 needs imageio-ffmpeg, which ships ffmpeg: pip install '{EXTRA}' "
                          "(or imageio-ffmpeg), or use --format gif or webp") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


def write_mp4(out: Path, frames: list[Image.Image], fps: float, text: str) -> None:
    """H.264 (yuv420p, CRF 17 as nerdyrodent's CPU path), written by ffmpeg into a temporary folder,
    then copied atomically into place (ffmpeg seeks back in the file it writes)."""
    exe = ffmpeg_exe()
    w, h = frames[0].size
    raw = b"".join(np.asarray(im, dtype=np.uint8).tobytes() for im in frames)
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / "video.mp4"
        cmd = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
               "-r", f"{fps:g}", "-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "17",
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",  # yuv420p needs even sides
               "-metadata", f"comment={text}", "-movflags", "+faststart", str(made)]
        done = subprocess.run(cmd, input=raw, capture_output=True, check=False)
        if done.returncode or not made.is_file():
            detail = " ".join(done.stderr.decode(errors="replace").split())[-200:]
            raise OutputError(f"ffmpeg could not write {out} (exit {done.returncode}: {detail})")
        with open(made, "rb") as src:
            atomic_write(out, lambda f: shutil.copyfileobj(src, f))


WRITERS = {"gif": write_gif, "webp": write_webp, "mp4": write_mp4}


def read_video_provenance(path) -> dict:
    """The provenance that :func:`write_video` put in an animation's metadata ({} if there is none)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        done = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                              capture_output=True, text=True, check=False)
        lines = [ln[len("comment="):] for ln in done.stdout.splitlines() if ln.startswith("comment=")]
        text = re.sub(r"\\(.)", r"\1", lines[0]) if lines else ""  # ffmetadata escapes = ; # \\ with a backslash
    else:
        with Image.open(path) as im:
            info = dict(im.info)
        text = info.get("comment", b"").decode() if "comment" in info else ""
        if "xmp" in info:
            found = re.search(rb"<clipguide:provenance>(.*?)</clipguide:provenance>", info["xmp"], re.DOTALL)
            text = html.unescape(found.group(1).decode()) if found else ""
    return json.loads(text) if text else {}
