"""``sweep.json``: a sweep's spec, its points and runs, and the state of each point.

The driver is its only writer (workers return their outcomes to it) and writes it atomically after
every change, so a sweep stopped at any moment, by Ctrl-C or a crash, is read back as it was.  A point
is ``pending``, ``done`` or ``failed`` (with its error); a point whose run folder holds a checkpoint
continues from it when the sweep runs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, error_detail
from ..records.files import atomic_write
from ..records.manifest import run_subdir
from .groups import Group
from .spec import Point, SweepSpec

LEDGER = "sweep.json"
STATES = ("pending", "done", "failed")
#: what a worker reports per point, recorded as is
OUTCOME_KEYS = ("file", "loss", "clip_similarity", "clip_score", "steps_done")


def new_ledger(spec: SweepSpec, points: list[Point], groups: list[Group], max_batch: int) -> dict:
    """The ledger of a sweep that has not started: every point pending."""
    group_of = {i: g for g in groups for i in g.points}
    ledger = {
        "clipguide": __version__,
        "spec": spec.to_dict(),
        "max_batch": max_batch,
        "runs": [{"index": g.index, "run_dir": g.run_dir, "preset": g.preset, "points": list(g.points)} for g in groups],
        "points": [{"index": p.index, "values": p.values, "run": group_of[p.index].index,
                    "run_dir": group_of[p.index].run_dir, "subdir": subdir_of(group_of[p.index], p.index),
                    "state": "pending"} for p in points],
    }
    return json.loads(json.dumps(ledger))  # as read back: lists, not tuples, so ledgers compare


def subdir_of(group: Group, index: int) -> str:
    """The folder of point ``index`` inside its run folder (the run folder itself when it is alone)."""
    return run_subdir(len(group.points), group.points.index(index))


def read_ledger(out: Path) -> dict | None:
    """The ledger in ``out``, or None when there is none."""
    path = out / LEDGER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({error_detail(e)}): restore it, or start the sweep in a new --out") from None
    if not isinstance(data, dict) or not isinstance(data.get("points"), list) or not isinstance(data.get("runs"), list):
        raise ConfigError(f"{path} is not a sweep ledger: start the sweep in a new --out")
    return data


def check_same_sweep(old: dict, new: dict, out: Path) -> None:
    """Refuse to continue a sweep whose spec (or run layout) changed: its runs would mix two sweeps."""
    changed = [k for k in sorted(set(old["spec"]) | set(new["spec"])) if old["spec"].get(k) != new["spec"].get(k)]
    if old.get("max_batch") != new["max_batch"]:
        changed.append("max_batch")
    if changed:
        raise ConfigError(f"the sweep in {out} was made with other settings ({', '.join(changed)} differ): "
                          "run it with the same spec to continue it, or use a new --out (or --overwrite)")


def save_ledger(out: Path, ledger: dict) -> None:
    """Written atomically, keys in their order (the axes' order is the grid's)."""
    blob = json.dumps(ledger, indent=2).encode()
    atomic_write(out / LEDGER, lambda f: f.write(blob))


def record(ledger: dict, index: int, state: str, outcome: dict | None = None, error: str | None = None) -> None:
    """Set point ``index``'s state, with its outcome or error."""
    entry = ledger["points"][index]
    for key in (*OUTCOME_KEYS, "error"):
        entry.pop(key, None)
    entry["state"] = state
    entry.update({k: v for k, v in (outcome or {}).items() if k in OUTCOME_KEYS})
    if error is not None:
        entry["error"] = error


def counts(ledger: dict) -> dict:
    """Points per state."""
    return {s: sum(p["state"] == s for p in ledger["points"]) for s in STATES}
