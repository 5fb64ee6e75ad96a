"""A run folder's ``manifest.json``: reading it back, checked, and the environment it records."""

from __future__ import annotations

import functools
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from .. import __version__
from ..config import RunConfig
from ..errors import ConfigError

MANIFEST = "manifest.json"


MAX_MANIFEST_BYTES = 64 * 2**20


def run_subdir(runs: int, i: int) -> str:
    """The folder of run ``i`` of ``runs`` inside a run directory: itself for one run, else ``run_NN``."""
    return "." if runs == 1 else f"run_{i:02d}"


def read_manifest(run_dir) -> dict:
    """The manifest of a run directory (or the path of a ``manifest.json``), checked: what
    readers rely on (config, runs, snapshot files inside the run directory, ...) missing, of
    the wrong type or inconsistent is a one-line :class:`ConfigError` naming the file."""
    path = Path(run_dir).expanduser()
    path = path if path.name == MANIFEST and not path.is_dir() else path / MANIFEST
    fix = "restore it from a backup, or start the run again"
    try:
        too_large = path.stat().st_size > MAX_MANIFEST_BYTES
        data = None if too_large else json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or type(e).__name__}): "
                          f"is {path.parent} a clipguide run directory?") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; absurdly deep nesting
        detail = " ".join(str(e).split())[:120]
        raise ConfigError(f"manifest {path} is not valid JSON ({detail}): {fix}") from None
    if too_large:  # outside the try: a ConfigError is a ValueError, which the JSON handler would rename
        raise ConfigError(f"manifest {path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: it is not clipguide's")
    problem = manifest_problem(data)
    if problem:
        raise ConfigError(f"manifest {path} is corrupt ({problem}): {fix}")
    return data


def manifest_problem(m) -> str | None:
    """What is wrong with a manifest's JSON, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    try:
        runs = RunConfig.from_dict(m.get("config")).runs()
    except ConfigError as e:
        return f"config: {e}"
    return _runs_problem(m.get("runs"), runs) or _snapshots_problem(m.get("snapshots"), len(runs)) or _record_problem(m)


def _runs_problem(records, runs: list) -> str | None:
    if not isinstance(records, list) or len(records) != len(runs):
        return "its runs do not match its config"
    for i, (r, (prompt, seed)) in enumerate(zip(records, runs)):
        layout = run_subdir(len(runs), i)
        if not isinstance(r, dict) or (r.get("index"), r.get("prompt"), r.get("seed"), r.get("dir")) != (i, prompt, seed, layout):
            return f"run {i} does not match its config"
        parents = r.get("parents")
        if not isinstance(parents, list) or not all(isinstance(x, dict) for x in parents):
            return f"the parents of run {i} are not a list of records"
    return None


def _snapshots_problem(snapshots, runs: int) -> str | None:
    if not isinstance(snapshots, list):
        return "snapshots is not a list"
    seen = set()
    for j, snap in enumerate(snapshots):
        problem = _snapshot_problem(snap, runs)
        if problem is None and (snap["run"], snap["step"]) in seen:
            problem = "listed twice"
        if problem:
            return f"snapshot {j}: {problem}"
        seen.add((snap["run"], snap["step"]))
    return None


def _record_problem(m: dict) -> str | None:
    """The rest of what Snapshotter writes and its provenance reads."""
    required = ("preset", "models", "environment", "steps_done")
    for key, kinds in (("models", dict), ("environment", dict), ("preset", (str, type(None))),
                       ("steps_done", int), ("interrupted", bool), ("resumed", list)):
        if key not in m and key in required:
            return f"it has no {key}"
        if key in m and (not isinstance(m[key], kinds) or (kinds is int and (isinstance(m[key], bool) or m[key] < 0))):
            return f"{key} is {m[key]!r:.40}"
    if not isinstance(m["environment"].get("clipguide"), str):
        return "its environment does not name the clipguide version"
    return None


def _snapshot_problem(snap, runs: int) -> str | None:
    if not isinstance(snap, dict):
        return "not a JSON object"
    for key in ("run", "step"):
        if not isinstance(snap.get(key), int) or isinstance(snap.get(key), bool) or snap[key] < 0:
            return f"{key} is {snap.get(key)!r:.40}"
    if snap["run"] >= runs:
        return f"run {snap['run']} does not exist"
    file = snap.get("file")
    if not isinstance(file, str) or not file or "\\" in file or "\0" in file:
        return f"file is {file!r:.60}"
    parts = Path(file).parts
    if Path(file).is_absolute() or ".." in parts or (parts and ":" in parts[0]):
        return f"file {file!r:.60} is outside the run directory"
    for key in ("loss", "clip_similarity"):
        if snap.get(key) is not None and (not isinstance(snap[key], (int, float)) or isinstance(snap[key], bool)):
            return f"{key} is {snap[key]!r:.40}"
    return None


# What a run's bytes depend on besides its config and models, so what a resume and a replay compare: the CPU's
# vendor too, since torch's math libraries take other float kernels on AMD and Intel (docs/reproducibility.md).
ENVIRONMENT_KEYS = ("torch", "clipguide", "python", "threads", "cpu")


def environment() -> dict:
    return {
        "clipguide": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_vendor(),
        "platform": platform.platform(),
        "command": shlex.join(sys.argv),  # the command line that made the files
        "backends": backend_settings(),
    }


def environment_differences(then: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, recorded, now) for each of :data:`ENVIRONMENT_KEYS` that differs; a key the record lacks (written
    before clipguide recorded it) is not called different."""
    return [(k, then[k], now[k]) for k in ENVIRONMENT_KEYS if k in then and then[k] != now[k]]


@functools.cache  # every checkpoint and snapshot records it; the CPU does not change within a process
def cpu_vendor() -> str:
    """The CPU vendor (``AuthenticAMD``, ``GenuineIntel``; the architecture where /proc/cpuinfo does not say)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def backend_settings() -> dict:
    """The torch settings that change a GPU's arithmetic (clipguide leaves torch's defaults: fp32 matrix
    products in full precision, cuDNN convolutions allowed TF32), recorded so a figure can be matched."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
