""":func:`sweep`: expand a spec, run its points with an executor, keep ``sweep.json`` current, and
write the results.  Running the same sweep again skips finished points and continues the others
from their checkpoints, so an interrupted sweep ends as an uninterrupted one would, bit for bit."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ConfigError
from ..run.checkpoints import DEFAULT_EVERY
from ..run.snapshots import prepare_out_dir
from .executors import EXECUTORS, RunOptions
from .groups import Group, group_points
from .ledger import (
    check_same_sweep,
    counts,
    new_ledger,
    read_ledger,
    record,
    save_ledger,
)
from .results import RESULTS, SHEET, classify_points, write_results, write_sheet
from .spec import SweepSpec


@dataclass
class SweepResult:
    """A sweep's folder and its points as ``sweep.json`` records them (values, run folder, state, figures)."""

    out_dir: Path
    points: list
    counts: dict  # state -> points

    @property
    def complete(self) -> bool:
        return self.counts["done"] == len(self.points)

    def require_complete(self, what: str, fix: str) -> None:
        """Raise ConfigError naming how many ``what`` did not finish and the first one's error, and ``fix``."""
        failed = [p for p in self.points if p["state"] != "done"]
        if failed:
            raise ConfigError(f"{len(failed)} {what} failed (first: {failed[0].get('error')}): {fix}")


def as_spec(spec) -> SweepSpec:
    """A :class:`SweepSpec` from itself, its dict, or the path of its JSON/YAML file."""
    if isinstance(spec, SweepSpec):
        return spec
    return SweepSpec.from_dict(spec) if isinstance(spec, dict) else SweepSpec.from_file(spec)


def make_executor(executor="local", **options):
    """An executor from its name (:data:`EXECUTORS`) and options, or itself."""
    if not isinstance(executor, str):
        return executor
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r} is not one of {', '.join(EXECUTORS)}")
    cls = EXECUTORS[executor]
    given = {k: v for k, v in options.items() if v is not None}
    stray = [k for k in given if k not in cls.__dataclass_fields__]
    if stray:
        raise ConfigError(f"--{stray[0].replace('_', '-')} is for --executor ray, not {executor}: drop it or add --executor ray")
    return cls(**given)


def sweep(spec, out_dir, executor="local", *, address: str | None = None, gpus_per_run: float | None = None,
          cpus_per_run: int | None = None, max_parallel: int | None = None, callback=None, overwrite: bool = False,
          progress: bool = True) -> SweepResult:
    """Run every point of ``spec`` (a :class:`SweepSpec`, its dict or a spec file) into ``out_dir``.

    ``executor``: ``"local"`` (this process; points that may share a batch run together) or ``"ray"``
    (a task per run on ``ray.init(address=address)``, with ``gpus_per_run``/``cpus_per_run`` resources
    and at most ``max_parallel`` at once).  Each run folder is made by :func:`clipguide.run_session`.
    A folder that holds this sweep continues it; ``overwrite`` starts it again.  ``callback`` sees every
    step of every run (local only).  Ctrl-C stops at the next step, writes the checkpoint and raises
    KeyboardInterrupt.  Failed points are recorded with their error; running again retries them.
    """
    spec = as_spec(spec)
    runner = make_executor(executor, address=address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
                           max_parallel=max_parallel)
    out = Path(out_dir).expanduser()
    ledger, groups = open_ledger(spec, out, runner, overwrite)
    opts = RunOptions(spec.options.get("checkpoint_every", DEFAULT_EVERY), spec.options.get("score"), callback)
    todo = [g for g in groups if any(ledger["points"][i]["state"] != "done" for i in g.points)]
    bar = tqdm(total=len(ledger["points"]), initial=counts(ledger)["done"], unit="point", disable=not progress)
    try:
        runner.run(out, todo, opts, *ledger_writers(out, ledger, bar))
    finally:
        bar.close()
        finish(out, ledger, spec)
    return SweepResult(out, ledger["points"], counts(ledger))


def open_ledger(spec: SweepSpec, out: Path, runner, overwrite: bool) -> tuple[dict, list[Group]]:
    """The sweep's ledger (the one in ``out`` when it holds this sweep) and its runs; refuses another sweep's folder."""
    points = spec.points()
    old = read_ledger(out) if out.is_dir() else None
    max_batch = (spec.options.get("max_batch") or (old or {}).get("max_batch")
                 or runner.default_max_batch(points[0].config.device))
    groups = group_points(points, max_batch)
    ledger = new_ledger(spec, points, groups, max_batch)
    if old is not None and not overwrite:
        check_same_sweep(old, ledger, out)
        ledger = old
    else:
        if old is None and out.is_dir() and any(out.iterdir()) and not overwrite:
            raise ConfigError(f"{out} exists and holds no sweep: choose a new --out, or pass --overwrite")
        clear(out, old)
    prepare_out_dir(out, overwrite=True)
    save_ledger(out, ledger)
    return ledger, groups


def clear(out: Path, old: dict | None) -> None:
    """Remove what an earlier sweep in ``out`` wrote (its run folders and results), so nothing of it is continued."""
    for run in (old or {}).get("runs", []):
        folder = (out / str(run.get("run_dir", ""))).resolve()
        if folder.parent == out.resolve() and folder.is_dir():
            shutil.rmtree(folder)
    for name in (RESULTS, SHEET):
        (out / name).unlink(missing_ok=True)


def ledger_writers(out: Path, ledger: dict, bar):
    """(report, fail) for an executor: record a run's points in the ledger and save it at once."""

    def report(group: Group, outcomes: list[dict]) -> None:
        stopped = any(o.get("interrupted") for o in outcomes)
        if not stopped:
            for index, outcome in zip(group.points, outcomes):
                record(ledger, index, "done", outcome)
            bar.update(len(group.points))
        save_ledger(out, ledger)
        if stopped:
            raise KeyboardInterrupt  # the run's checkpoint is on disk: running the sweep again continues it

    def fail(group: Group, message: str) -> None:
        for index in group.points:
            record(ledger, index, "failed", error=message)
        save_ledger(out, ledger)
        if not bar.disable:
            bar.write(f"clipguide: sweep run {group.run_dir} failed: {message}")

    return report, fail


def finish(out: Path, ledger: dict, spec: SweepSpec) -> None:
    """Labels (when the spec asks), ``results.csv``, the contact sheet and the ledger, for the points done so far."""
    classify_spec = spec.options.get("classify")
    if classify_spec and all(p["state"] == "done" for p in ledger["points"]):
        classify_points(out, ledger, classify_spec, "auto")
    write_results(out, ledger)
    write_sheet(out, ledger)
    save_ledger(out, ledger)
