"""Images per hour for N independent runs optimised in one batch, against N runs one after another.

A batch holds N runs (prompts x seeds, each with its own generator: a run's images do not
depend on its batch-mates), so one step costs one decoder and one CLIP call of N times the
size.  Workloads: ``dvae256`` is the 256 px DALL-E dVAE + ViT-B/32 x 32 cutouts step of
issue 8 (real architectures, random weights), ``shapes`` the shipped shapes-world default.
Images per hour are for a run of --run-steps steps; "sequential" is N runs of batch 1.

    python benchmarks/throughput.py --threads 2 --batches 1,4,16 --precision bf16
    python benchmarks/throughput.py --height 192   # dvae256 at 256 x 192 (a non-square image)
"""

from __future__ import annotations

import argparse
import time

import torch

from clipguide.presets import get_preset
from common import build_step


def workload(name: str):
    """(config, decoder, clip) of a workload, batch 1."""
    if name == "shapes":
        from clipguide import load_clip, load_decoder

        return get_preset("shapes"), load_decoder("shapes-dvae"), load_clip("shapes")
    from clipguide.testing import random_clip, random_dalle_decoder

    cfg = get_preset("dvae-codebook").replace(size=256, cutn=32)
    return cfg, random_dalle_decoder(), random_clip("ViT-B-32-quickgelu")


def seconds_per_step(cfg, decoder, clip, steps: int) -> float:
    """Best of ``steps`` timed optimiser steps (after one warm-up step) of ``cfg``'s batch."""
    once = build_step(cfg, decoder, clip)
    once(0)
    best = float("inf")
    for k in range(1, steps + 1):
        t0 = time.perf_counter()
        once(k)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workload", choices=("dvae256", "shapes"), default="dvae256")
    p.add_argument("--batches", default="1,4,16", help="batch sizes N to time")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--steps", type=int, default=2, help="timed steps per batch size (after a warm-up step)")
    p.add_argument("--run-steps", type=int, default=4000, help="steps of one run, for images per hour")
    p.add_argument("--device", default="cpu")
    p.add_argument("--height", type=int, default=0, help="image height in pixels (0: the workload's square)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, decoder, clip = workload(args.workload)
    decoder, clip = decoder.to(args.device), clip.to(args.device)
    cfg = cfg.replace(precision=args.precision, device=args.device, prompts=("a red circle on a blue background",),
                      height=args.height)
    width, height = cfg.dims()
    print(f"{args.workload} ({width}x{height}px, {cfg.cutn} cutouts, {args.precision}) on {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); images/hour for {args.run_steps}-step runs")
    print(f"{'N':>3s} {'s/step':>8s} {'s/step/run':>10s} {'images/h':>9s} {'vs sequential':>13s}")
    single = None
    for n in (int(b) for b in args.batches.split(",")):
        sec = seconds_per_step(cfg.replace(batch=n), decoder, clip, args.steps)
        single = single if single is not None else sec / n
        per_hour = 3600 * n / (sec * args.run_steps)
        print(f"{n:3d} {sec:8.2f} {sec / n:10.2f} {per_hour:9.2f} {single * n / sec:12.2f}x", flush=True)


if __name__ == "__main__":
    main()
