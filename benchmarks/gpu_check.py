"""The GPU check of issue 36: everything clipguide needs measured or verified on a GPU, in one go.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine, about 8 minutes at most
    python benchmarks/gpu_check.py --smoke --out /tmp/x.json       # every section on the CPU, tiny sizes, < 1 minute

Sections, in order (each has a time budget, and one that fails or overruns is recorded in the JSON
with its error while the others still run; the JSON is rewritten after every section):

* ``environment``: GPU, driver, torch / CUDA / cuDNN versions, clipguide, TF32 and matmul-precision settings;
* ``tests``: the tests that take the ``test_device`` fixture, run by pytest with ``--device DEVICE``;
* ``step_time``: ``dvae-codebook`` and ``vqgan-zquantize`` at 256 px x 32 cutouts (OpenAI's dVAE and
  taming's f16-16384 VQGAN with CLIP ViT-B/32, random weights) at fp32, bf16 and fp32 under
  fp16 autocast: steps/s after warm-up, peak GPU memory;
* ``batch``: ``dvae-codebook`` bf16 at batch 1, 4, 16: images/s and batch-16 / 16-sequential-runs ratio;
* ``resume``: a run resumed on the device from a checkpoint file against the uninterrupted run, bit for bit;
* ``determinism``: the same seed twice, with and without ``torch.use_deterministic_algorithms``;
* ``compile``: the step-time rows with ``RunConfig.compile`` (``--compile``) on, when that field exists.

``--smoke`` runs all of it on the CPU with the shapes-world models at 64 px, 2 cutouts and a few
steps: tests/test_gpu_check.py runs it, so the script works before it meets a GPU.
"""

from __future__ import annotations

import os

# cuBLAS sizes its workspace once, at the first cuBLAS call of the process.  With the default
# configuration its split-K matmuls may reduce in a different order from one call to the next, so
# torch.use_deterministic_algorithms(True) refuses cuBLAS work unless this is set to a fixed
# workspace (":4096:8" or ":16:8") before CUDA starts: it has to be here, before torch is imported.
# It holds for the whole process, so the non-deterministic timings are taken with it too (recorded).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import argparse  # noqa: E402
import ast  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import clipguide  # noqa: E402
from clipguide import RunConfig, get_preset, optimise  # noqa: E402
from common import build_step, peak_rss_mib  # noqa: E402  (benchmarks/ is on sys.path when a script there runs)

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("dvae-codebook", "vqgan-zquantize")
PRECISIONS = ("fp32", "bf16", "fp16-autocast")  # the last: fp32 models and cfg, the step under torch.autocast(fp16)
PROMPT = "a photo of an avocado armchair"
HAS_COMPILE = "compile" in RunConfig.__dataclass_fields__


@dataclass(frozen=True)
class Sizes:
    """The sizes of a check: the full one for the GPU, the smoke one for the CPU."""

    size: int
    cutn: int
    warmup: int  # untimed steps before each timing
    steps: int  # timed steps
    batches: tuple
    run_steps: int  # steps of the runs that resume and determinism compare
    resume_at: int
    budgets: dict = field(default_factory=dict)  # section -> seconds
    total: float = 430.0  # seconds for all sections together (the compile section gets what is left)


FULL = Sizes(256, 32, 3, 20, (1, 4, 16), 10, 4, dict(environment=20, tests=100, step_time=80, batch=50, resume=40,
                                                   determinism=60, compile=240), total=430.0)
SMOKE = Sizes(64, 2, 1, 2, (1, 2, 4), 3, 1, dict(environment=10, tests=40, step_time=20, batch=10, resume=20,
                                                 determinism=15, compile=30), total=150.0)


# --------------------------------------------------------------------------- devices, timing, budgets


class Overrun(Exception):
    """A section ran past its budget."""


@contextlib.contextmanager
def budget(seconds: float):
    """Raise :class:`Overrun` in this (main) thread after ``seconds``: between Python bytecodes, so a
    long CUDA call or compilation is interrupted when it next returns to Python."""
    def expire(signum, frame):
        raise Overrun(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device: torch.device) -> None:
    """Free what earlier measurements left and restart the peak-memory count."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    """Peak GPU memory allocated since :func:`fresh_memory`, MiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def autocast_of(precision: str, device: torch.device):
    if precision == "fp16-autocast":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def time_steps(once, device: torch.device, sizes: Sizes, precision: str) -> dict:
    """Warm-up steps (timed apart), then ``sizes.steps`` timed steps between device synchronisations."""
    sync(device)
    t0 = time.perf_counter()
    with autocast_of(precision, device):
        for k in range(sizes.warmup):
            once(k)
        sync(device)
        t1 = time.perf_counter()
        for k in range(sizes.warmup, sizes.warmup + sizes.steps):
            once(k)
        sync(device)
    sec = (time.perf_counter() - t1) / sizes.steps
    return {"warmup_s": round(t1 - t0, 3), "ms_per_step": round(sec * 1e3, 3), "steps_per_s": round(1 / sec, 2),
            "peak_gpu_mib": peak_mib(device)}


def attempt(rows: list, row: dict, fn) -> dict:
    """Append ``row`` updated with ``fn()``, or with the error it raised (an overrun propagates)."""
    rows.append(row)
    try:
        row.update(fn())
    except Overrun:
        row["error"] = "cut by the section's budget"
        raise
    except Exception as e:  # noqa: BLE001 - a failing row is a finding, recorded; the others still run
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        if isinstance(e, torch.OutOfMemoryError):
            torch.cuda.empty_cache()
    return row


# --------------------------------------------------------------------------- models and configs


class Models:
    """The models of the workloads, built on first use and kept on the device: for the full check
    the real architectures with random weights, for the smoke check the shapes-world models."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke, self._cache = device, smoke, {}

    def _get(self, key, build):
        if key not in self._cache:
            self._cache[key] = build().to(self.device)
        return self._cache[key]

    def clip(self):
        from clipguide.testing import random_clip

        return self._get("clip", lambda: clipguide.load_clip("shapes") if self.smoke else random_clip("ViT-B-32-quickgelu"))

    def decoder(self, preset: str):
        from clipguide.testing import VQGAN_F16_16384, random_dalle_decoder, random_vqgan

        if preset.startswith("vqgan"):
            build = (lambda: clipguide.load_decoder("shapes-vqgan")) if self.smoke else (lambda: random_vqgan(VQGAN_F16_16384))
            return self._get("vqgan", build)
        build = (lambda: clipguide.load_decoder("shapes-dvae")) if self.smoke else random_dalle_decoder
        return self._get("dvae", build)

    def shapes(self):
        """The shipped shapes-world dVAE and CLIP (the resume check's default workload)."""
        return (self._get("shapes-dvae", lambda: clipguide.load_decoder("shapes-dvae")),
                self._get("shapes-clip", lambda: clipguide.load_clip("shapes")))


def config(preset: str, precision: str, sizes: Sizes, device: torch.device, batch: int = 1, **kw) -> RunConfig:
    """``preset`` at the check's size and cutouts on ``device``; fp16-autocast runs an fp32 config."""
    cfg_precision = "fp32" if precision == "fp16-autocast" else precision
    return get_preset(preset).replace(prompts=(PROMPT,), size=sizes.size, cutn=sizes.cutn, batch=batch,
                                      precision=cfg_precision, device=str(device), **kw)


def measure(models: Models, preset: str, precision: str, sizes: Sizes, batch: int = 1, **kw) -> dict:
    """One step-time row: steps/s and peak GPU memory of ``preset``'s optimiser step."""
    device = models.device
    decoder, clip = models.decoder(preset), models.clip()
    fresh_memory(device)
    once = build_step(config(preset, precision, sizes, device, batch, **kw), decoder, clip)
    return time_steps(once, device, sizes, precision)


# --------------------------------------------------------------------------- sections


def section_environment(ctx, out: dict) -> None:
    import numpy

    out.update(clipguide=clipguide.__version__, torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), numpy=numpy.__version__, python=platform.python_version(),
               platform=platform.platform(), device=str(ctx.device), threads=torch.get_num_threads(),
               cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"), compile_field=HAS_COMPILE)
    out["matmul"] = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision(),
                     "cuda.matmul.allow_bf16_reduced_precision_reduction":
                         torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
                     "cuda.matmul.allow_fp16_reduced_precision_reduction":
                         torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
                     "cudnn.benchmark": torch.backends.cudnn.benchmark,
                     "cudnn.deterministic": torch.backends.cudnn.deterministic}
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_mib=props.total_memory // 2**20,
                   multiprocessors=props.multi_processor_count, gpu_count=torch.cuda.device_count())
    out["nvidia_smi"] = nvidia_smi()


def nvidia_smi() -> str | None:
    """nvidia-smi's name, driver, memory and clocks line for each GPU (None where there is no nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
    r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=15)
    return (r.stdout or r.stderr).strip()


def device_tests() -> list[str]:
    """The node ids of the tests that take the ``test_device`` fixture (tests/conftest.py)."""
    ids = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(a.arg == "test_device" for a in node.args.args):
                ids.append(f"tests/{path.name}::{node.name}")
    return ids


def section_tests(ctx, out: dict) -> None:
    ids = out["node_ids"] = device_tests()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", str(ctx.device),
               f"--junitxml={xml}", *ids]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(ctx.left() - 3, 1))
        out["returncode"] = r.returncode
        if r.returncode != 0:
            out["output_tail"] = (r.stdout + r.stderr)[-4000:]
        suite = ET.parse(xml).getroot()  # (no file: pytest itself failed, and the tail says why)
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out.update(counts)
    if r.returncode != 0:
        raise RuntimeError(f"pytest exited with {r.returncode}: {counts['failures']} failed, {counts['errors']} errors")


def section_step_time(ctx, out: dict) -> None:
    rows = out["rows"] = []
    out["workload"] = f"{ctx.sizes.size} px, {ctx.sizes.cutn} cutouts, batch 1, " + (
        "shapes-world models" if ctx.smoke else "random-weight dVAE / VQGAN f16-16384 + CLIP ViT-B/32")
    for preset in PRESETS:
        for precision in PRECISIONS:
            attempt(rows, {"preset": preset, "precision": precision},
                    lambda: measure(ctx.models, preset, precision, ctx.sizes))
    height = ctx.sizes.size * 3 // 4  # a non-square image (--size W,H): the grid, cutouts and noise follow
    attempt(rows, {"preset": "dvae-codebook", "precision": "bf16", "height": height},
            lambda: measure(ctx.models, "dvae-codebook", "bf16", ctx.sizes, height=height))


def section_batch(ctx, out: dict) -> None:
    preset, precision = "dvae-codebook", "bf16"
    rows = out["rows"] = []
    out.update(preset=preset, precision=precision)
    for n in ctx.sizes.batches:
        row = attempt(rows, {"batch": n}, lambda: measure(ctx.models, preset, precision, ctx.sizes, batch=n))
        if "steps_per_s" in row:
            row["images_per_s"] = round(n * row["steps_per_s"], 2)
    done = {r["batch"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    big = max(ctx.sizes.batches)
    if 1 in done and big in done:
        out[f"batch_{big}_over_{big}_sequential"] = round(done[big] / done[1], 2)  # issue 36's target: >= 8 at 16


@contextlib.contextmanager
def deterministic(on: bool):
    """``torch.use_deterministic_algorithms(on, warn_only=True)``, restored after; yields the list of
    warnings raised meanwhile (the ops that have no deterministic implementation)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def same_run(a, b) -> dict:
    """Whether two Results are equal bit for bit, and their largest image difference."""
    return {"images_equal": torch.equal(a.images, b.images), "latent_equal": torch.equal(a.latent, b.latent),
            "losses_equal": torch.equal(a.losses, b.losses),
            "max_abs_image_diff": float((a.images - b.images).abs().max())}


def resumed_run(cfg: RunConfig, decoder, clip, at: int, tmp: Path) -> dict:
    """An uninterrupted run against the run resumed from its step-``at`` checkpoint file."""
    from clipguide.records.checkpoints import read_checkpoint, write_checkpoint

    path = tmp / "checkpoint.safetensors"

    def keep(state):
        if state.step == at:
            write_checkpoint(path, state.checkpoint())

    full = optimise(cfg, decoder, clip, keep)
    resumed = optimise(cfg, decoder, clip, resume_from=read_checkpoint(path))
    return {"resumed_at": at, "steps": cfg.steps, **same_run(full, resumed)}


def resume_cases(ctx) -> list:
    """(name, config, decoder, clip): the shapes default (pyramid levels joining during the run), at
    fp32 and bf16, and the 256 px dVAE workload at bf16."""
    sizes, device = ctx.sizes, ctx.device
    shapes = get_preset("shapes").replace(prompts=(PROMPT,), steps=sizes.run_steps, pyramid_every=1, device=str(device),
                                          **(dict(size=sizes.size, cutn=sizes.cutn) if ctx.smoke else {}))
    dvae = config("dvae-codebook", "bf16", sizes, device, steps=sizes.run_steps)
    return [("shapes fp32", shapes, *ctx.models.shapes()),
            ("shapes bf16", shapes.replace(precision="bf16"), *ctx.models.shapes()),
            ("dvae-codebook bf16", dvae, ctx.models.decoder("dvae-codebook"), ctx.models.clip())]


def section_resume(ctx, out: dict) -> None:
    rows = out["rows"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg, decoder, clip in resume_cases(ctx):
            for det in (False, True):
                def check():
                    with deterministic(det) as caught:
                        row = resumed_run(cfg, decoder, clip, ctx.sizes.resume_at, Path(tmp))
                    return {**row, "nondeterministic_ops": sorted({str(w.message)[:200] for w in caught})}

                attempt(rows, {"case": name, "deterministic": det}, check)
    out["all_equal"] = bool(rows) and all(r.get("images_equal") and r.get("latent_equal") and r.get("losses_equal")
                                          for r in rows)


def twice(cfg: RunConfig, decoder, clip, device: torch.device, det: bool) -> dict:
    """The same seeded run twice, in deterministic mode or not: equal?  And seconds per run."""
    with deterministic(det) as caught:
        times, results = [], []
        for _ in range(2):
            sync(device)
            t0 = time.perf_counter()
            results.append(optimise(cfg, decoder, clip))
            sync(device)
            times.append(time.perf_counter() - t0)
    return {**same_run(*results), "seconds_per_run": round(min(times), 4),
            "nondeterministic_ops": sorted({str(w.message)[:200] for w in caught})}


def section_determinism(ctx, out: dict) -> None:
    rows = out["rows"] = []
    decoder, clip = ctx.models.decoder("dvae-codebook"), ctx.models.clip()
    for precision in ("fp32", "bf16"):
        cfg = config("dvae-codebook", precision, ctx.sizes, ctx.device, steps=ctx.sizes.run_steps)
        optimise(cfg.replace(steps=1), decoder, clip)  # warm-up: kernels loaded, casts made
        for det in (False, True):
            attempt(rows, {"preset": "dvae-codebook", "precision": precision, "deterministic": det},
                    lambda: twice(cfg, decoder, clip, ctx.device, det))
        pair = [r.get("seconds_per_run") for r in rows[-2:]]
        if all(pair):
            rows[-1]["cost_vs_default"] = round(pair[1] / pair[0], 3)  # deterministic / default seconds per run


@contextlib.contextmanager
def eager_compile():
    """torch.compile with the "eager" backend (dynamo traces, nothing is code-generated): the smoke
    check tests the plumbing of --compile on the CPU without minutes of inductor compilation."""
    real = torch.compile

    def compile_eager(*args, **kwargs):
        kwargs.setdefault("backend", "eager")
        return real(*args, **kwargs)

    torch.compile = compile_eager
    try:
        yield
    finally:
        torch.compile = real


def compiled_row(models: Models, preset: str, precision: str, sizes: Sizes) -> dict:
    """A step-time row with ``compile=True``, and the number of graphs dynamo compiled for it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    row = measure(models, preset, precision, sizes, compile=True)
    return {**row, "graphs_compiled": counters["stats"]["unique_graphs"] - before}


def section_compile(ctx, out: dict) -> None:
    if not HAS_COMPILE:
        out["skipped"] = "RunConfig has no `compile` field yet: the --compile rows were not measured"
        return
    out["backend"] = "eager (smoke: plumbing only)" if ctx.smoke else "torch.compile default (inductor)"
    rows = out["rows"] = []
    with eager_compile() if ctx.smoke else contextlib.nullcontext():
        # the likeliest to matter first, in case the budget ends; the smoke check's plumbing needs one
        for precision in ("bf16",) if ctx.smoke else ("bf16", "fp32", "fp16-autocast"):
            for preset in PRESETS:
                attempt(rows, {"preset": preset, "precision": precision},
                        lambda: compiled_row(ctx.models, preset, precision, ctx.sizes))
    if any(r.get("graphs_compiled") == 0 for r in rows):
        out["note"] = "rows with graphs_compiled 0 ran eagerly: build_step's path does not reach the compiled modules"


SECTIONS = {"environment": section_environment, "tests": section_tests, "step_time": section_step_time,
            "batch": section_batch, "resume": section_resume, "determinism": section_determinism,
            "compile": section_compile}


# --------------------------------------------------------------------------- running and reporting


@dataclass
class Context:
    device: torch.device
    smoke: bool
    sizes: Sizes
    models: Models
    deadline: float  # time.perf_counter() at which the whole check ends
    section_end: float = 0.0

    def left(self) -> float:
        """Seconds left to the running section."""
        return self.section_end - time.perf_counter()


def run_section(ctx: Context, name: str, report: dict) -> dict:
    """Run one section within its budget; its error, if any, is recorded in its entry."""
    out = report["sections"][name] = {}
    seconds = min(ctx.sizes.budgets[name], ctx.deadline - time.perf_counter())
    if ctx.deadline - time.perf_counter() < 3:
        out.update(ok=False, error="no time left in the check's total budget")
        return out
    t0 = time.perf_counter()
    ctx.section_end = t0 + seconds
    try:
        with budget(seconds):
            SECTIONS[name](ctx, out)
        out["ok"] = not any("error" in r for r in out.get("rows", ()))
    except Exception as e:  # noqa: BLE001 - one failing section must not stop the others
        out.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc(limit=-6)[-3000:])
    out.update(seconds=round(time.perf_counter() - t0, 2), budget_s=round(seconds, 1))
    return out


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_lines(name: str, out: dict) -> list[str]:
    """A section's entry as a few readable lines."""
    head = f"== {name}: {'ok' if out.get('ok') else 'FAILED'} ({out.get('seconds', 0):.1f} s of {out.get('budget_s', 0):.0f})"
    lines = [head]
    if "error" in out:
        lines.append(f"   error: {out['error'].splitlines()[0] if out['error'] else ''}")
    for key, value in out.items():
        if key not in ("ok", "error", "traceback", "rows", "seconds", "budget_s", "output_tail", "node_ids"):
            lines.append(f"   {key}: {fmt(value) if not isinstance(value, dict) else json.dumps(value)}")
    if "node_ids" in out:
        lines.append(f"   node_ids: {', '.join(t.split('::')[-1] for t in out['node_ids'])}")
    for row in out.get("rows", ()):
        lines.append("   - " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "nondeterministic_ops"))
        if row.get("nondeterministic_ops"):
            lines.append(f"       nondeterministic ops warned: {len(row['nondeterministic_ops'])}")
    return lines


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (rewritten after each section)")
    p.add_argument("--device", default="cuda", help="torch device to check (default cuda)")
    p.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny sizes, in well under a minute")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of: " + ", ".join(SECTIONS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; 1 with --smoke)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device} but CUDA is not available here (use --smoke to check the script on the CPU)",
              file=sys.stderr)
        return 2
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        print(f"gpu_check: unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)
    sizes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    ctx = Context(device, args.smoke, sizes, Models(device, args.smoke), start + sizes.total)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sections": {}}
    print(f"gpu_check on {device}{' (smoke)' if args.smoke else ''}: {sizes.size} px, {sizes.cutn} cutouts; "
          f"budget {sizes.total:.0f} s; writing {args.out}", flush=True)
    for name in SECTIONS:
        if name in args.sections.split(","):
            out = run_section(ctx, name, report)
            try:
                print("\n".join(summary_lines(name, out)), flush=True)
            except Exception as e:  # noqa: BLE001 - the JSON matters more than the summary
                print(f"== {name}: (summary failed: {type(e).__name__}: {e})", flush=True)
            report["seconds"] = round(time.perf_counter() - start, 2)
            report["peak_rss_mib"] = round(peak_rss_mib(), 1)
            write_json(args.out, report)
    failed = [n for n, s in report["sections"].items() if not s.get("ok")]
    print(f"done in {report['seconds']:.0f} s; {'all sections ok' if not failed else 'not ok: ' + ', '.join(failed)}; "
          f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
