"""Where a sweep's runs execute: here, one after another (``local``), or as Ray tasks (``ray``).

An executor takes the runs still to do and calls ``report(group, outcomes)`` -- or ``fail(group,
message)`` -- in the driver as each finishes, so the driver alone writes ``sweep.json``.  Ray
(Moritz et al. 2018, "Ray: A Distributed Framework for Emerging AI Applications") runs each group
as a task with its CPU/GPU resources on ``ray.init(address=...)``: a laptop's own Ray or a cluster.
A task whose worker dies is retried by Ray and continues from the run's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.devices import resolve_device
from ..errors import ClipguideError, ConfigError, error_detail
from .worker import run_group


@dataclass
class RunOptions:
    """What every run of a sweep shares: checkpoint interval, scorer, step callback (local only)."""

    every: int
    score: str | None = None
    callback: object = None


@dataclass
class LocalExecutor:
    """Runs the groups in this process, in order (the thread count is this process's)."""

    def default_max_batch(self, device: str) -> int:
        """Runs per batch when the spec does not say: 8 on an accelerator, where a batch fills the device,
        and 1 on the CPU, where it does not pay (benchmarks/sweep_throughput.py: 0.95-1.00x on 2 cores)."""
        return 1 if resolve_device(device) == "cpu" else 8

    def run(self, out, groups, opts: RunOptions, report, fail) -> None:
        for group in groups:
            try:
                outcomes = run_group(out, group, opts.every, opts.score, opts.callback)
            except ClipguideError as e:
                fail(group, str(e))
                continue
            report(group, outcomes)


@dataclass
class RayExecutor:
    """One Ray task per group, ``cpus_per_run`` CPUs (and torch threads) and ``gpus_per_run`` GPUs each,
    at most ``max_parallel`` in flight; Ray retries a task whose worker died ``max_retries`` times."""

    address: str | None = None
    gpus_per_run: float = 0.0
    cpus_per_run: int = 1
    max_parallel: int | None = None
    max_retries: int = 3

    def default_max_batch(self, device: str) -> int:
        return 1  # one task per point: the cluster's workers run them side by side

    def run(self, out, groups, opts: RunOptions, report, fail) -> None:
        if opts.callback is not None:
            raise ConfigError("a step callback runs in this process: use the local executor with a callback")
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(run_task).options(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                            max_retries=self.max_retries, retry_exceptions=False)
        queue, pending = list(groups), {}
        try:
            while queue or pending:
                while queue and (self.max_parallel is None or len(pending) < self.max_parallel):
                    group = queue.pop(0)
                    pending[task.remote(str(out), group, opts.every, opts.score, self.cpus_per_run)] = group
                ready, _ = ray.wait(list(pending), num_returns=1)
                group = pending.pop(ready[0])
                try:
                    report(group, ray.get(ready[0]))
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None)
                    fail(group, str(cause) if isinstance(cause, ClipguideError) else error_detail(e))
        except KeyboardInterrupt:
            for ref in pending:  # each run's checkpoint is on disk: the sweep continues from it when run again
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()


def run_task(out: str, group, every: int, score, threads: int) -> list[dict]:
    """The body of a Ray task (a module function, so workers import it rather than unpickle code)."""
    return run_group(out, group, every, score, None, threads)


def import_ray():
    """Ray, or a one-line error naming the extra that installs it."""
    try:
        import ray  # optional: the [ray] extra
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'clipguide[ray]' (or pip install ray)") from None
    return ray


#: executor name -> class (the CLI's --executor choices)
EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}
