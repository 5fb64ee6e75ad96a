"""Points per hour of a 16-point shapes sweep (4 prompts x 4 seeds), three ways, in one run:

* local sequential: each point its own run (``max_batch`` 1), this process, --threads threads;
* local batched: points that may share a batch in one optimise call (``max_batch`` 4, 16), the same threads;
* Ray: a task per point on a local Ray with --workers CPUs, one torch thread per task.

Each sweep writes its folders as a user's would (snapshots, manifests, checkpoints, results).  The
Ray row is timed twice: the sweep alone (Ray already started), and with ``ray.init`` included.

    python benchmarks/sweep_throughput.py --steps 50 --threads 2 --workers 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from clipguide.sweeps.driver import sweep

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a purple background", "a blue circle on an orange background"]


def timed_sweep(spec: dict, out: Path, executor: str = "local", **options) -> float:
    start = time.perf_counter()
    result = sweep(spec, out, executor, progress=False, **options)
    assert result.complete, result.counts
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="steps per point")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the local sweeps")
    p.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray (one task per CPU)")
    p.add_argument("--batches", default="4,16", help="max_batch values of the local batched rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = {"preset": "shapes", "steps": args.steps, "snapshots": [], "axes": {"prompt": PROMPTS, "seed": [0, 1, 2, 3]}}
    n = 4 * len(PROMPTS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep({**spec, "steps": 1, "max_batch": 1}, tmp / "warm", progress=False)  # models loaded and cached once
        rows.append(("local sequential", timed_sweep({**spec, "max_batch": 1}, tmp / "seq")))
        for b in map(int, args.batches.split(",")):
            rows.append((f"local batched ({b})", timed_sweep({**spec, "max_batch": b}, tmp / f"batch{b}")))
        import ray  # the [ray] extra

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - start
        seconds = timed_sweep({**spec, "max_batch": 1}, tmp / "ray", "ray")
        ray.shutdown()
        rows.append((f"ray, {args.workers} workers", seconds))
        rows.append((f"ray, {args.workers} workers + ray.init", seconds + init))
    print(f"{n} points x {args.steps} steps, shapes default (128 px); local: {args.threads} torch threads; "
          f"ray: 1 thread per task; {torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cores")
    base = rows[0][1]
    print(f"{'executor':32s} {'seconds':>8s} {'points/hour':>12s} {'vs sequential':>14s}")
    for name, seconds in rows:
        print(f"{name:32s} {seconds:8.1f} {n / seconds * 3600:12.0f} {base / seconds:13.2f}x")


if __name__ == "__main__":
    main()
