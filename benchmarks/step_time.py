"""Seconds per optimisation step and achieved GFLOP/s, real architectures with random weights.

The workload of issue 2: OpenAI's dVAE decoder at 256 px (32x32 tokens of 8192
codes) + CLIP ViT-B/32 on 32 cutouts, one run, forward + backward + optimiser
step, for each dVAE preset; and of issue 4: taming's ImageNet f16-16384 VQGAN at
256 px (16x16 tokens) + the same CLIP for the VQGAN presets.  Weights are random:
speed does not depend on them.

    python benchmarks/step_time.py --threads 1 --steps 3
    python benchmarks/step_time.py --size 256 --height 192   # a non-square image (nerdyrodent's -s W H)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipguide.presets import get_preset
from clipguide.testing import VQGAN_F16_16384, random_clip, random_dalle_decoder, random_vqgan
from common import build_step, peak_rss_mib

DVAE_PRESETS = ("dvae-codebook", "aleph2image-delta", "aleph2image", "aleph2image-gamma")
VQGAN_PRESETS = ("vqgan-codebook", "vqgan-zquantize")  # both on the f16-16384 architecture


def measure(name, decoder, clip, size, cutn, steps, height=0):
    cfg = get_preset(name).replace(prompts=("a photo of an avocado armchair",), size=size, height=height, cutn=cutn, batch=1,
                                 device="cpu")  # the random models are built on the CPU
    once = build_step(cfg, decoder, clip)
    with FlopCounterMode(display=False) as counter:
        once()  # also the warm-up
    gflop = counter.get_total_flops() / 1e9
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    sec = (time.perf_counter() - t0) / steps
    return gflop, sec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=3, help="timed steps per preset (after one warm-up step)")
    p.add_argument("--size", type=int, default=256, help="image width (and height unless --height) in pixels")
    p.add_argument("--height", type=int, default=0, help="image height in pixels (0: --size, a square)")
    p.add_argument("--cutn", type=int, default=32)
    p.add_argument("--presets", default=",".join(DVAE_PRESETS + VQGAN_PRESETS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = random_clip("ViT-B-32-quickgelu")
    builders = {"dVAE": random_dalle_decoder, "VQGAN f16-16384": lambda: random_vqgan(VQGAN_F16_16384)}
    decoders = {}  # built on first use
    print(f"decoder at {args.size}x{args.height or args.size}px + ViT-B/32 x {args.cutn} cutouts, random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'preset':20s} {'decoder':16s} {'GFLOP/step':>11s} {'s/step':>8s} {'GFLOP/s':>8s}")
    for name in args.presets.split(","):
        kind = "VQGAN f16-16384" if name in VQGAN_PRESETS else "dVAE"
        if kind not in decoders:
            decoders[kind] = builders[kind]()
        gflop, sec = measure(name, decoders[kind], clip, args.size, args.cutn, args.steps, args.height)
        print(f"{name:20s} {kind:16s} {gflop:11.1f} {sec:8.2f} {gflop / sec:8.1f}", flush=True)
    print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
