"""What every training stage shares: logging, the step budget, the learning-rate schedule, one optimiser
step, saving a model, the decoders' scene crops and the reconstruction measure."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .. import judge as J
from .. import scenes as S

#: What the json files record under ``trained_by`` when no command line is given.
COMMAND = "python -m clipguide.shapes.train"

# Reference step rates (steps per minute, 1 thread, reference machine) and default budgets (minutes).
STEPS_PER_MIN = {"clip": 55.0, "dvae": 170.0, "dvaeft": 110.0, "vqgan": 60.0, "vqganft": 60.0, "clipft": 30.0,
                 "clipframe": 150.0, "cliprobust": 55.0, "prior": 60.0, "priorft": 50.0, "clipprior": 120.0}
DEFAULT_MINUTES = {"clip": 18.0, "dvae": 14.0, "dvaeft": 6.0, "vqgan": 10.0, "vqganft": 5.0, "clipft": 8.0, "clipframe": 1.0,
                   "cliprobust": 11.0, "prior": 25.0, "priorft": 70.0, "clipprior": 5.0}
EVAL_SCENES = 200  # fresh scenes the decoders' reconstructions are measured on


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Progress:
    """A stage's clock and loss history, and its log line every ``every`` steps and at the last one."""

    def __init__(self, tag: str, steps: int, every: int):
        self.tag, self.steps, self.every = tag, steps, every
        self.t0, self.hist = time.time(), []

    def due(self, step: int) -> bool:
        """Whether (0-based) ``step`` logs."""
        return (step + 1) % self.every == 0 or step == self.steps - 1

    def recent(self) -> float:
        """The mean loss of the last ``every`` steps."""
        return np.mean(self.hist[-self.every:])

    def log(self, step: int, what: str) -> None:
        log(f"{self.tag} step {step + 1}/{self.steps} {what} {(time.time() - self.t0) / (step + 1):.3f}s/step")

    def seconds(self) -> float:
        return time.time() - self.t0


def stage_steps(kind: str, minutes: float | None, steps: int | None) -> int:
    """The step count of stage ``kind``: ``steps`` if given, else ``minutes`` (default: the stage's) at the reference speed."""
    if steps is not None:
        return int(steps)
    m = DEFAULT_MINUTES[kind] if minutes is None else float(minutes)
    return max(1, int(round(m * STEPS_PER_MIN[kind])))


def lr_at(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.02) -> float:
    """Linear warm-up to ``peak``, then a cosine down to ``floor``·peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr(opt, step: int, total: int, peak: float, warmup: int) -> None:
    for gp in opt.param_groups:
        gp["lr"] = lr_at(step, total, peak, warmup=warmup)


def descend(opt, loss, params) -> None:
    """One clipped gradient step (max norm 1)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def seeded(seed: int, gen_offset: int, torch_offset: int | None = None):
    """Seed torch's global RNG with ``seed + torch_offset`` (default: ``gen_offset``); return the stage's own
    (torch generator, numpy generator), both seeded with ``seed + gen_offset``."""
    torch.manual_seed(seed + (gen_offset if torch_offset is None else torch_offset))
    return torch.Generator().manual_seed(seed + gen_offset), np.random.default_rng(seed + gen_offset)


def prefixed_tensors(**modules) -> dict:
    """State dicts of named modules as one flat dict with "name." prefixes (the shipped format)."""
    return {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}


def save(out_dir: Path, name: str, state: dict, meta: dict, trained_by: str = COMMAND) -> None:
    """Write ``name.safetensors`` and ``name.json`` (``meta``, with ``trained_by`` unless it has one) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    meta.setdefault("trained_by", trained_by)
    save_file(state, str(out_dir / f"{name}.safetensors"))
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(f"wrote {out_dir / name}.safetensors ({(out_dir / f'{name}.safetensors').stat().st_size / 1e6:.2f} MB)")


def read_meta(out_dir: Path, name: str) -> dict:
    return json.loads((Path(out_dir) / f"{name}.json").read_text())


# ---------------------------------------------------------------------------- the decoders' data and measure
def random_crops(x, crop: int, gen):
    """One ``crop``-pixel square crop per image at a random offset (the image itself if it is not larger)."""
    if crop >= x.shape[-1]:
        return x
    n, side = x.shape[0], x.shape[-1]
    oy = torch.randint(0, side - crop + 1, (n,), generator=gen)
    ox = torch.randint(0, side - crop + 1, (n,), generator=gen)
    return torch.stack([x[i, :, oy[i]:oy[i] + crop, ox[i]:ox[i] + crop] for i in range(n)])


def scene_crops(batch: int, crop: int, rng, gen):
    """``batch`` fresh 128 px scenes, randomly cropped to ``crop`` px: the decoders' training batch."""
    return random_crops(S.to_tensor(S.render(S.sample_scenes(batch, rng=rng), 128)), crop, gen)


def psnr(a, b) -> float:
    mse = torch.mean((a - b) ** 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def eval_recon(fn, n: int = EVAL_SCENES, seed: int = 4242, batch: int = 25) -> dict:
    """PSNR, codes used and the judge's accuracy on ``fn(x)`` -> (reconstruction, codes) of ``n`` fresh scenes."""
    scenes = S.sample_scenes(n, seed)
    psnrs, verdicts, codes = [], [], set()
    for i in range(0, n, batch):
        x = S.to_tensor(S.render(scenes[i:i + batch], 128))
        r, z = fn(x)
        psnrs.append(psnr(r, x))
        codes.update(torch.unique(z).tolist())
        verdicts += J.judge_batch(r)
    acc = J.accuracy(verdicts, [s.attributes for s in scenes])
    return {"psnr_db": float(np.mean(psnrs)), "codes_used": len(codes), "judge_on_reconstructions": acc,
            "scenes": n}


def usage_term(q):
    """KL(mean code distribution || uniform) of code probabilities ``q`` [B, V, h, w] (codebook usage), and that mean."""
    qbar = q.mean(dim=(0, 2, 3))
    return math.log(q.shape[1]) + (qbar * torch.log(qbar + 1e-10)).sum(), qbar
