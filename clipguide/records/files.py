"""Files written atomically (a temporary file in the same folder, then ``os.replace``): a crash
never leaves a half-written PNG or JSON.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import OutputError

TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # atomic_write's temporary files: .NAME.XXXXXXXX.tmp


def slug(text: str, limit: int = 40) -> str:
    """A folder-name form of ``text``: lower case, each run of other characters one hyphen, at most ``limit``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "run"


def atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temporary file, then rename it over ``path``: a crash or
    a full disk leaves the previous ``path`` whole.  An OSError is a one-line :class:`OutputError`."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp's files are private (0600); outputs get the usual mode
                os.fchmod(f.fileno(), 0o666 & ~UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _sync_directory(path.parent)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(f"cannot write {path} ({e.strerror or e}): {_write_hint(e.errno)}") from None
        raise


def _sync_directory(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut.  Best effort: the file itself
    is complete and in place already, and some systems cannot open or sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, AttributeError):  # AttributeError: no O_DIRECTORY (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_hint(code) -> str:
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "free some disk space (the previous files are intact; clipguide resume RUN_DIR continues a run)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the directory writable or choose another --out"
    return "check the disk (the previous files are intact)"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def remove_temporaries(out_dir) -> list[Path]:
    """Delete the temporary files of writes that a killed process left half done (never used:
    the rename that would publish them did not happen); returns them."""
    out_dir = Path(out_dir)
    found = [p for d in (out_dir, *sorted(out_dir.glob("run_*"))) for p in d.glob(".*.tmp")
             if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> RGB image, rounding (torchvision's to_pil_image truncates)."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def save_png(path: Path, image: Image.Image, text: dict | None = None) -> None:
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


def save_json(path: Path, data: dict) -> None:
    blob = json.dumps(data, indent=2, sort_keys=True, default=str).encode()
    atomic_write(path, lambda f: f.write(blob))


def read_png_text(path) -> dict:
    """The text chunks of a PNG written by clipguide (``clipguide`` holds the provenance JSON)."""
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}))
    if "clipguide" in text:
        text["clipguide"] = json.loads(text["clipguide"])
    return text
