"""Weight files: the download cache, sha256 checks and the registry of published files.

Files live under :func:`cache_dir` (``$CLIPGUIDE_CACHE``, default ``~/.cache/clipguide``).
Each downloaded file gets a ``<file>.sha256`` sidecar in ``sha256sum`` format, written on
first download (or first use of a file placed there by hand) and checked on every later
use, so a file that changes on disk is caught before it is unpickled.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ..errors import WeightsError

# Published weight files (data, not code paths).  sha256 None: upstream publishes no
# digest, so the one seen on first download is recorded and enforced from then on.
DALLE_FILES = {
    "decoder": {"url": "https://cdn.openai.com/dall-e/decoder.pkl", "sha256": None},
    "encoder": {"url": "https://cdn.openai.com/dall-e/encoder.pkl", "sha256": None},
}

_CHUNK = 1 << 20
_TIMEOUT_S = 30


def cache_dir() -> Path:
    """The weights cache: ``$CLIPGUIDE_CACHE`` or ``~/.cache/clipguide`` (user-expanded)."""
    return Path(os.environ.get("CLIPGUIDE_CACHE", "~/.cache/clipguide")).expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weight files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, *, subdir: str, filename: str | None = None, sha256: str | None = None) -> Path:
    """The cached copy of ``url`` under ``cache_dir()/subdir``, downloaded first if missing.

    The digest is checked against the sidecar and against ``sha256`` (when given) on every
    call; a mismatch raises :class:`WeightsError` naming the file and both digests.
    """
    target = cache_dir() / subdir / (filename or Path(urlparse(url).path).name)
    if target.is_file():
        verify_sha256(target, sha256)
    else:
        _download(url, target, sha256)
    return target


def verify_sha256(path: Path, expected: str | None = None) -> str:
    """Check ``path`` against its sidecar and ``expected``; record the sidecar if absent."""
    actual = sha256_file(path)
    sidecar = _sidecar(path)
    recorded = sidecar.read_text().split()[0] if sidecar.is_file() else None
    for want, source in ((recorded, f"recorded in {sidecar.name}"), (expected, "expected by the registry")):
        if want and want.lower() != actual:
            raise WeightsError(
                f"sha256 mismatch for {path}: {source} {want.lower()}, actual {actual}; "
                "the file is corrupt or was replaced: delete it to re-download"
            )
    if recorded is None:
        _write_sidecar(path, actual)
    return actual


def is_reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether the server of ``url`` answers at all (an HTTP error status still counts).

    Used to fail fast offline before handing a download to a library that retries for a minute.
    """
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, digest: str) -> None:
    _sidecar(path).write_text(f"{digest}  {path.name}\n")  # `sha256sum -c` reads this


def _download(url: str, target: Path, expected: str | None) -> None:
    """Stream ``url`` to a temp file beside ``target``, check it, then rename it into place
    (os.replace is atomic, so an interrupted download never leaves a half file at ``target``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _stream(url, out, target)
        if expected and expected.lower() != digest:
            raise WeightsError(
                f"sha256 mismatch for {target.name} downloaded from {url}: expected {expected.lower()}, "
                f"actual {digest}; the upstream file changed: check the URL or update the registry digest"
            )
        os.replace(tmp, target)
        _write_sidecar(target, digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _stream(url: str, out, target: Path) -> str:
    """Copy ``url`` into ``out``, returning the sha256; one-line WeightsError when unreachable."""
    from tqdm.auto import tqdm

    digest, n_read, total = hashlib.sha256(), 0, None
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as src:
            total = int(src.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
                for chunk in iter(lambda: src.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    n_read += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise WeightsError(
            f"{target.name} is not in {target.parent} and {url} cannot be reached ({reason}): "
            f"download it on a connected machine and place it at {target}"
        ) from None
    except OSError as e:  # the network worked; writing the cache did not
        raise WeightsError(f"cannot write {target} ({e}): free some space or point CLIPGUIDE_CACHE elsewhere") from None
    if total is not None and n_read != total:
        raise WeightsError(f"download of {url} was cut short ({n_read} of {total} bytes): try again")
    return digest.hexdigest()
