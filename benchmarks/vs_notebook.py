"""clipguide's step against the 2021 notebook loop, side by side in one process.

The reference loops are written from ../shared/reference/methods.md as the notebooks ran
them, fp32: Crowson's OpenAI dVAE+CLIP (§2: straight-through categorical one-hot, dall_e
decoder, Laplace pixel sample, one Lanczos resample per cutout, spherical loss, AdamW) and
Crowson's VQGAN z+quantize (§4: nearest-code straight-through, Adam, per-channel box clamp).
CLIP is ViT-B/32 in OpenAI's sequence-first layout, as the `clip` package runs it.
clipguide's own step runs the matching preset (dvae-codebook, vqgan-zquantize) at each
--precision.  Same models (real architectures, random weights: speed does not depend on
them), same size, cutouts and step count.  Timed rounds alternate between the loops, so
machine noise hits them alike; the best round of each is reported.  Peak RSS is measured
per loop in a fresh subprocess (models + one step), as a user's process would see it.

    python benchmarks/vs_notebook.py --threads 2 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from clipguide.engine.losses import spherical_distance
from clipguide.engine.state import DTYPES
from clipguide.engine.ops import clamp_with_grad, laplace_noise, replace_grad, resample, vector_quantize
from clipguide.models.dalle import dalle_blacklist
from clipguide.presets import get_preset
from clipguide.testing import VQGAN_F16_16384, random_clip, random_dalle_decoder, random_vqgan
from common import build_step, peak_rss_mib

PROMPT = "an armchair in the shape of an avocado"


def openai_layout_clip():
    """ViT-B/32 as OpenAI's `clip` package runs it: MultiheadAttention on sequence-first tensors."""
    import open_clip

    from clipguide.models.clip import Clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    model.visual.transformer.batch_first = False
    for block in model.visual.transformer.resblocks:
        block.attn.batch_first = False
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), name="ViT-B-32 (OpenAI layout)", embed_dim=512)


def notebook_cutouts(x, cutn: int, cut_size: int, g):
    """MakeCutouts (docs/methods.md §1): a size and offset per cutout, one resample call each."""
    side = min(x.shape[-2:])
    lo = min(side, cut_size)
    cuts = []
    for _ in range(cutn):
        size = int(torch.rand([], generator=g) * (side - lo) + lo)
        ox = torch.randint(0, side - size + 1, (), generator=g)
        oy = torch.randint(0, side - size + 1, (), generator=g)
        cuts.append(resample(x[:, :, oy : oy + size, ox : ox + size], cut_size))
    return clamp_with_grad(torch.cat(cuts), 0, 1)


def notebook_update(img, clip, target, opt, cutn: int, g) -> None:
    """The shared tail of both notebook loops: cutouts, CLIP, spherical loss, one optimiser step."""
    emb = clip.encode_image(notebook_cutouts(img, cutn, clip.image_size, g))
    loss = spherical_distance(F.normalize(emb, dim=-1)[:, None], F.normalize(target, dim=-1)[None]).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def notebook_dvae_step(decoder, clip, size: int, cutn: int):
    """One closure = one iteration of Crowson's OpenAI dVAE+CLIP loop (docs/methods.md §2)."""
    g = torch.Generator().manual_seed(0)
    toks = size // 8
    logits = torch.randn(toks * toks, 8192, generator=g).requires_grad_()
    bias = torch.zeros(8192)
    bias[dalle_blacklist(8192)] = -100
    target = clip.encode_text([PROMPT])
    opt = torch.optim.AdamW([logits], lr=0.05, weight_decay=0)
    module = copy.deepcopy(decoder.module).to(memory_format=torch.contiguous_format)  # the notebook's NCHW layout

    def step():
        probs = (logits + bias).softmax(1)
        one_hot = F.one_hot(torch.multinomial(probs, 1, generator=g)[:, 0], 8192).to(probs.dtype)
        z = replace_grad(one_hot, probs).view(1, toks, toks, 8192).permute(0, 3, 1, 2)
        out = module(z.contiguous()).float()
        loc = out[:, :3] + out[:, 3:6].exp() * laplace_noise(out[:, :3].shape[1:], [g], "cpu")
        img = clamp_with_grad((torch.sigmoid(loc) - 0.1) / 0.8, 0, 1)
        notebook_update(img, clip, target, opt, cutn, g)

    return step


def notebook_vqgan_step(decoder, clip, size: int, cutn: int):
    """One iteration of Crowson's VQGAN z+quantize loop (docs/methods.md §4)."""
    g = torch.Generator().manual_seed(0)
    toks, book = size // 16, decoder.codebook
    codes = torch.randint(book.shape[0], (toks * toks,), generator=g)
    z = book[codes].T.reshape(1, -1, toks, toks).clone().requires_grad_()
    z_min, z_max = book.min(0).values.view(1, -1, 1, 1), book.max(0).values.view(1, -1, 1, 1)
    target = clip.encode_text([PROMPT])
    opt = torch.optim.Adam([z], lr=0.05)

    def step():
        z_q = vector_quantize(z, book)
        img = clamp_with_grad((decoder.decoder(decoder.post_quant_conv(z_q)) + 1) / 2, 0, 1)
        notebook_update(img, clip, target, opt, cutn, g)
        with torch.no_grad():
            z.copy_(z.maximum(z_min).minimum(z_max))

    return step


def clipguide_step(preset: str, decoder, clip, size: int, cutn: int, precision: str, cut_batch: int = 0):
    """One iteration of clipguide's loop for ``preset`` (the same code path as optimise())."""
    cfg = get_preset(preset).replace(prompts=(PROMPT,), size=size, cutn=cutn, batch=1, precision=precision,
                                     cut_batch=cut_batch)
    return build_step(cfg, decoder, clip)


def build(name: str, size: int, cutn: int, models: dict, alone: bool = False, cut_batch: int = 0):
    """The step closure of loop ``name`` ('notebook-dvae', 'clipguide-dvae-bf16', ...).  ``alone``:
    the only loop of this process, so its models are held as ``load_models`` holds them for a
    run (a bf16 run keeps no fp32 image tower or decoder)."""
    kind = "vqgan" if "vqgan" in name else "dvae"
    if kind not in models:
        models[kind] = random_vqgan(VQGAN_F16_16384) if kind == "vqgan" else random_dalle_decoder()
    if name.startswith("notebook"):
        if "notebook-clip" not in models:
            models["notebook-clip"] = openai_layout_clip()
        fn = notebook_vqgan_step if kind == "vqgan" else notebook_dvae_step
        return fn(models[kind], models["notebook-clip"], size, cutn)
    if "clip" not in models:
        models["clip"] = random_clip("ViT-B-32-quickgelu")
    preset, precision = "vqgan-zquantize" if kind == "vqgan" else "dvae-codebook", name.rsplit("-", 1)[1]
    if alone:
        dtype = DTYPES[precision]
        models[kind], models["clip"] = models[kind].cast(dtype), models["clip"].cast(dtype, in_place=True)
    return clipguide_step(preset, models[kind], models["clip"], size, cutn, precision, cut_batch)


def probe_rss_mib(name: str, args) -> float:
    """Peak RSS of a fresh process that builds loop ``name`` (models held as for a real run) and runs one step."""
    cmd = [sys.executable, __file__, "--rss-probe", name, "--threads", str(args.threads), "--size", str(args.size),
           "--cutn", str(args.cutn), "--cut-batch", str(args.cut_batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=3, help="timed rounds (after one warm-up step of each loop)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cutn", type=int, default=32)
    p.add_argument("--cut-batch", type=int, default=0, help="clipguide's cutouts per CLIP pass in the backward (0 = all)")
    p.add_argument("--precisions", default="fp32,bf16", help="clipguide variants to time")
    p.add_argument("--decoders", default="dvae,vqgan", help="dvae (docs/methods.md §2) and/or vqgan (§4, f16-16384)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-loop peak-RSS subprocesses")
    p.add_argument("--rss-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_probe:
        build(args.rss_probe, args.size, args.cutn, {}, alone=True, cut_batch=args.cut_batch)()
        print(peak_rss_mib())
        return
    print(f"{args.size}px, ViT-B/32 x {args.cutn} cutouts (clipguide: {args.cut_batch or args.cutn} per CLIP pass), random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), best of {args.steps} alternating rounds")
    for kind in args.decoders.split(","):
        names = [f"notebook-{kind}"] + [f"clipguide-{kind}-{p}" for p in args.precisions.split(",")]
        compare(names, args)


def compare(names: list[str], args) -> None:
    models, steps, gflop = {}, {}, {}
    for name in names:
        steps[name] = build(name, args.size, args.cutn, models, cut_batch=args.cut_batch)
        with FlopCounterMode(display=False) as counter:
            steps[name]()  # also the warm-up
        gflop[name] = counter.get_total_flops() / 1e9
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.steps):
        for name in names:
            t0 = time.perf_counter()
            steps[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
    ref = best[names[0]]
    print(f"{'loop':24s} {'GFLOP/step':>10s} {'s/step':>7s} {'GFLOP/s':>8s} {'speed-up':>8s} {'peak RSS':>9s}")
    for name in names:
        rss = "" if args.no_rss else f"{probe_rss_mib(name, args):6.0f} MiB"
        print(f"{name:24s} {gflop[name]:10.1f} {best[name]:7.2f} {gflop[name] / best[name]:8.1f} "
              f"{ref / best[name]:7.2f}x {rss:>9s}", flush=True)


if __name__ == "__main__":
    main()
