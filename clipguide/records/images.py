"""Reading user-given images (image prompts, init images) from files and URLs, safely.

An image that cannot be used is a one-line :class:`ConfigError` naming it and the fix:
a missing file, an unreachable URL (fetched with a timeout), a file PIL cannot read,
a truncated file (never silently padded), and a decompression bomb: more pixels than
PIL's ``Image.MAX_IMAGE_PIXELS`` is refused outright, where PIL itself only warns.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import math
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError

MAX_BYTES = 64 * 2**20  # larger files are refused before they are read
URL_TIMEOUT = 30.0  # seconds per URL request


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def locate(source: str) -> str:
    """Where an image comes from, as recorded in manifests: the URL, or the absolute path."""
    return source if is_url(source) else str(Path(source).expanduser().resolve())


def read_bytes(source: str, what: str = "image") -> bytes:
    """The bytes of an image file or URL (``what`` names it in errors, e.g. "image prompt")."""
    if is_url(source):
        return _fetch(source, what)
    if "\x00" in source:  # no file system takes it, and Path.resolve raises on it
        raise ConfigError(f"{what} {source!r} holds a NUL character: give the image's path")
    path = Path(source).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise ConfigError(f"{what} {source!r} {problem} (looked for {path.resolve()}): check the path")
    if path.stat().st_size > MAX_BYTES:
        raise ConfigError(f"{what} {source!r} is larger than {MAX_BYTES >> 20} MiB: use a smaller image")
    return path.read_bytes()


def _fetch(url: str, what: str) -> bytes:
    try:
        data = _download(url)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError and timeouts are OSErrors
        detail = " ".join(str(getattr(e, "reason", None) or e).split())[:200]
        raise ConfigError(f"{what} {url!r} cannot be read ({detail}): check the URL and the network, "
                          "or download the image and give its path") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} {url!r} is larger than {MAX_BYTES >> 20} MiB: use a smaller image")
    return data


@functools.lru_cache(maxsize=8)
def _download(url: str) -> bytes:
    """GET a URL once per process: the manifest hashes the very bytes the prompt encodes."""
    request = urllib.request.Request(url, headers={"User-Agent": "clipguide"})
    with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
        return response.read(MAX_BYTES + 1)


def sha256_of(source: str, what: str = "image") -> str:
    return hashlib.sha256(read_bytes(source, what)).hexdigest()


def load_image(source: str, what: str = "image") -> Image.Image:
    """An RGB PIL image from a path or URL; unusable images raise a one-line ConfigError."""
    return decode_image(read_bytes(source, what), source, what)


def decode_image(data: bytes, source: str, what: str = "image") -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ConfigError(f"{what} {source!r} has more pixels than PIL's limit of {Image.MAX_IMAGE_PIXELS} "
                              "(Image.MAX_IMAGE_PIXELS; a decompression bomb?): use a smaller image") from None
        except UnidentifiedImageError:
            raise ConfigError(f"{what} {source!r} is not an image PIL can read: give a PNG, JPEG or WebP file") from None
        except Exception as e:  # noqa: BLE001 - decoders of untrusted data raise OSError, SyntaxError, zlib.error, ...
            detail = " ".join(str(e).split())[:120]
            raise ConfigError(f"{what} {source!r} is truncated or corrupt ({detail}): give a complete image file") from None


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def resize_to_area(image: Image.Image, width: int, height: int | None = None) -> Image.Image:
    """Crowson's ``resize_image``: at most the area of a ``width`` x ``height`` output (a square when
    ``height`` is None), the image's own aspect ratio kept (Lanczos)."""
    w, h = image.size
    area = min(w * h, width * (width if height is None else height))
    ratio = w / h
    size = max(1, round(math.sqrt(area * ratio))), max(1, round(math.sqrt(area / ratio)))
    return image.resize(size, Image.LANCZOS)
