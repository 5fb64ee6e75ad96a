"""Run checkpoints: continue a crashed or interrupted run from where it stopped.

A run directory holds one small checkpoint, ``checkpoint.safetensors``: everything the loop
needs to go on bit for bit — the latent (with its moving average, temperature and anchor),
the optimiser's moments, every run's generator state, the step and the loss history.  It is
a safetensors file (plain tensors plus a JSON header: nothing in it can run code), its
header and every tensor carry a sha256 checked on reading, and it is written atomically
(temporary file + rename), so a crash or a full disk leaves the previous checkpoint whole.

A checkpoint "at step k" follows the loop's order (callbacks see step k before update k):
the latent and optimiser after k updates, the generators as they were before forward k drew
from them, and the losses of steps 0..k-1.  Resuming recomputes forward k from there, so the
continued run is the uninterrupted one, bit for bit, on the same torch, thread count and device.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .config import RunConfig
from .errors import CheckpointError, ConfigError, NonFiniteError, WeightsError
from .snapshots import Snapshotter, atomic_write, environment, read_manifest, remove_temporaries

FILENAME = "checkpoint.safetensors"
FORMAT, VERSION = "clipguide-checkpoint", 1
META_KEY, META_SHA = "clipguide", "clipguide_sha256"  # the header's JSON record and its sha256
MAX_HEADER = 16 * 2**20
DEFAULT_EVERY = 50
OUTPUT_ONLY = ("steps", "snapshots")  # config fields a resume may change: they do not alter the computation


@dataclass(eq=False)
class Checkpoint:
    """The loop's state after ``step`` updates (see the module docstring for what "at step k" holds)."""

    step: int
    config: RunConfig
    latent: dict  # Latent.state_dict(): param, EMA, anchor, inverse temperature
    optimiser: dict  # torch optimiser state_dict: {"state": {index: {name: tensor}}, "param_groups": [...]}
    generators: list  # one ByteTensor per run: torch.Generator.get_state() before forward `step`
    losses: torch.Tensor  # [step, B]: steps 0..step-1
    similarities: torch.Tensor  # [step, B]
    info: dict = field(default_factory=dict)  # recorded with the file: models, preset, environment, every

    def restore(self, cfg: RunConfig, latent, optimiser, generators) -> None:
        """Load this state into a fresh loop of ``cfg`` (the config it was made with; ``steps``
        and ``snapshots`` may differ)."""
        differ = differing(self.config, cfg)
        if differ:
            raise ConfigError(f"the checkpoint was made with another config ({', '.join(differ)} differ): "
                              "resume it with its own config (only --steps may change)")
        if self.step > cfg.steps:
            raise ConfigError(f"the checkpoint is at step {self.step}, beyond --steps {cfg.steps}: "
                              f"pass --steps {self.step} or more")
        if len(self.losses) != self.step or len(self.similarities) != self.step:
            raise CheckpointError(f"the checkpoint at step {self.step} holds a loss history of {len(self.losses)} "
                                  "steps: it was not used")
        try:
            latent.load_state_dict(self.latent, strict=True)
            optimiser.load_state_dict(self.optimiser)
            for g, state in zip(generators, self.generators, strict=True):
                g.set_state(state)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the checkpoint does not fit this run ({_detail(e)}): it was not used") from None


def differing(a: RunConfig, b: RunConfig) -> list[str]:
    """The fields in which two configs describe different computations."""
    a, b = a.to_dict(), b.to_dict()
    return [k for k in a if k not in OUTPUT_ONLY and a[k] != b[k]]


def write_checkpoint(path, checkpoint: Checkpoint, info: dict | None = None) -> int:
    """Write ``checkpoint`` to ``path`` atomically; returns its size in bytes.  A NaN or
    infinite value is refused (:class:`NonFiniteError`): the previous checkpoint stays."""
    tensors, meta = _encode(checkpoint)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"refusing to write checkpoint {path} at step {checkpoint.step}: its {name} "
                                 "holds NaN or inf (the previous checkpoint is kept)", checkpoint.step, [])
    text = json.dumps({**meta, **(info or {})}, sort_keys=True, default=str)
    blob = save_tensors(tensors, metadata={META_KEY: text, META_SHA: _sha256(text.encode())})
    atomic_write(Path(path), lambda f: f.write(blob))
    return len(blob)


def read_checkpoint(path) -> Checkpoint:
    """The checkpoint in ``path``, checked: a missing, truncated, altered or foreign file is a
    one-line :class:`CheckpointError` naming it (it is never used)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: this run has no checkpoint to resume from "
                              "(runs write one every --checkpoint-every steps and at every snapshot)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({e.strerror}): check its permissions") from None
    meta = _header(data, path)
    try:
        tensors = load_tensors(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for malformed files
        raise _corrupt(path, f"unreadable tensors: {_detail(e)}") from None
    _verify(tensors, meta, path)
    try:
        return _decode(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _corrupt(path, f"malformed record: {_detail(e)}") from None


class Checkpointer:
    """Step callback writing ``OUT/checkpoint.safetensors`` every ``every`` steps (0: none
    between snapshots), at every snapshot step and the last step, and on :meth:`finish`
    (after Ctrl-C too).  Pass it after the :class:`Snapshotter`, so that a checkpoint is never
    ahead of the snapshots on disk.  A fresh run removes an older run's checkpoint; a resumed one
    passes ``resumed_at``, the step of the checkpoint it starts from."""

    def __init__(self, out_dir, every: int = DEFAULT_EVERY, *, models: dict | None = None, preset: str | None = None,
                 resumed_at: int | None = None):
        if not isinstance(every, int) or every < 0:
            raise ConfigError(f"--checkpoint-every must be 0 (only at snapshots) or a number of steps, got {every}")
        self.path = Path(out_dir) / FILENAME
        self.every, self.step = every, resumed_at  # step: that of the checkpoint on disk
        self.info = {"models": models, "preset": preset, "every": every}
        if resumed_at is None:
            self.path.unlink(missing_ok=True)

    def due(self, cfg: RunConfig, step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step in cfg.snapshots or step == cfg.steps

    def __call__(self, state) -> None:
        self.info["models"] = self.info["models"] or state.models  # the loop's own description
        if state.step != self.step and self.due(state.config, state.step):
            self.write(state.checkpoint())

    def finish(self, result) -> None:
        """Write the state the loop stopped in, unless that checkpoint is on disk already."""
        self.info["models"] = self.info["models"] or result.models
        if result.checkpoint is not None and result.checkpoint.step != self.step:
            self.write(result.checkpoint)

    def write(self, checkpoint: Checkpoint) -> None:
        write_checkpoint(self.path, checkpoint, {**self.info, "environment": environment()})
        self.step = checkpoint.step


@dataclass(eq=False)
class Resumption:
    """A run directory opened to continue it (:func:`open_run`), its models loaded."""

    run_dir: Path
    checkpoint: Checkpoint
    manifest: dict
    config: RunConfig
    decoder: object
    clip: object
    models: dict
    every: int
    audit: dict = field(default_factory=dict)  # the output filter and scorer the run was made with

    @property
    def recorded_environment(self) -> dict:
        return self.checkpoint.info.get("environment") or {}

    def differences(self) -> list[str]:
        """What differs from the environment the checkpoint was written in (then the
        continuation is not bit-identical to an uninterrupted run)."""
        now, then = environment(), self.recorded_environment
        return [f"{k} {then[k]} -> {now[k]}" for k in ("torch", "clipguide", "threads") if k in then and then[k] != now[k]]

    def run(self, callbacks=()):
        """Continue the run to ``config.steps``: snapshots, manifest and checkpoints go on in the run directory."""
        from .optimise import optimise

        step, preset = self.checkpoint.step, self.manifest.get("preset")
        saver = Snapshotter(self.run_dir, self.config, self.models, preset=preset, overwrite=True, **self.audit)
        saver.adopt(self.manifest, step)
        keeper = Checkpointer(self.run_dir, self.every, models=self.models, preset=preset, resumed_at=step)
        result = optimise(self.config, self.decoder, self.clip, [saver, keeper, *callbacks], resume_from=self.checkpoint)
        saver.finish(result)
        keeper.finish(result)
        return result


def open_run(run_dir, steps: int | None = None, checkpoint_every: int | None = None) -> Resumption:
    """Read and check a run directory's manifest and checkpoint, load its models (the same
    weights, by sha256) and its image inputs (unchanged, by sha256); ``steps`` extends the run."""
    from .generation import describe_models, load_models
    from .prompts import run_parents

    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a directory: give the run directory (--out) of a clipguide run")
    manifest = read_manifest(run_dir)
    checkpoint = read_checkpoint(run_dir / FILENAME)
    differ = differing(RunConfig.from_dict(manifest["config"]), checkpoint.config)
    if differ:
        raise CheckpointError(f"{run_dir / FILENAME} and {run_dir / 'manifest.json'} describe different runs "
                              f"({', '.join(differ)} differ): the checkpoint was not used; start the run again")
    cfg = checkpoint.config
    if steps is not None:
        if steps < checkpoint.step:
            raise ConfigError(f"--steps {steps} is before the checkpoint's step {checkpoint.step}: "
                              f"pass {checkpoint.step} or more")
        cfg = cfg.replace(steps=steps)
    decoder, clip = load_models(cfg)
    models = json.loads(json.dumps(describe_models(decoder, clip, cfg)))
    then = checkpoint.info.get("models") or manifest["models"]
    if then != models:
        raise WeightsError(f"the models differ from those {run_dir} was made with ({_model_change(then, models)}): "
                           "resuming would not continue the same run; restore those weight files")
    for run in manifest["runs"]:
        now = [p["sha256"] for p in run_parents(run["prompt"], cfg.init_image)]
        if now != [p.get("sha256") for p in run["parents"]]:
            files = ", ".join(p.get("file", "?") for p in run["parents"])
            raise ConfigError(f"an input image of {run_dir} ({files}) changed since the run started "
                              "(sha256 differs): restore it to resume the run")
    audit = recorded_audit(manifest, cfg.device, run_dir)
    remove_temporaries(run_dir)
    every = checkpoint.info.get("every", DEFAULT_EVERY) if checkpoint_every is None else checkpoint_every
    return Resumption(run_dir, checkpoint, manifest, cfg, decoder, clip, models, every, audit)


def recorded_audit(manifest: dict, device: str, run_dir: Path) -> dict:
    """Snapshotter options rebuilt from a manifest: the output filter (same CLIP by sha256,
    concepts, thresholds and action) and the scorer, so a resumed run screens and scores its
    snapshots as the run did; a filter that cannot be rebuilt stops the resume."""
    out = {}
    record = manifest.get("filter")
    if record is not None:
        from .output_filter import OutputFilter

        try:
            clip = record["clip"]
            out["output_filter"] = OutputFilter(clip["name"], dict(record["concepts"]), record["action"],
                                                bool(record["keep_flagged"]), device)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"the output filter recorded in {run_dir / 'manifest.json'} cannot be rebuilt "
                              f"({_detail(e)}): refusing to resume without it") from None
        if getattr(out["output_filter"].clip, "sha256", None) != clip.get("sha256"):
            raise WeightsError(f"the output filter's CLIP {clip['name']} differs from the one {run_dir} was screened "
                               "with (sha256): restore its weights to resume")
    scores = manifest.get("scores")
    if isinstance(scores, dict) and isinstance(scores.get("scorer"), dict) and scores["scorer"].get("name"):
        out["scorer"] = scores["scorer"]["name"]
    return out


def resume(run_dir, callback=None, steps: int | None = None, checkpoint_every: int | None = None):
    """Continue the run in ``run_dir`` (written by ``clipguide generate`` or ``generate(out_dir=...)``)
    from its checkpoint, to its ``steps`` or to ``steps`` if given (extending it).

    The steps since the last checkpoint are recomputed; with the torch version, thread count
    and device the run started with, every snapshot is bit-identical to an uninterrupted run
    (a warning names what differs otherwise).  Returns the :class:`~clipguide.Result` of the
    whole run (losses from step 0); its ``snapshots`` are those taken after resuming.
    """
    opened = open_run(run_dir, steps, checkpoint_every)
    differences = opened.differences()
    if differences:
        warnings.warn(f"resuming {opened.run_dir} in another environment ({'; '.join(differences)}): "
                      "the continuation will not be bit-identical to an uninterrupted run", stacklevel=2)
    callbacks = callback if isinstance(callback, list) else [callback] if callback else []
    return opened.run(callbacks)


# ----------------------------------------------------------------------------- file format


def _encode(ck: Checkpoint) -> tuple[dict, dict]:
    tensors = {f"latent.{k}": v for k, v in ck.latent.items()}
    scalars = {}
    for index, state in ck.optimiser["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimiser.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    tensors.update({f"generator.{i}": g for i, g in enumerate(ck.generators)})
    tensors.update(losses=ck.losses, similarities=ck.similarities)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT, "version": VERSION, "step": ck.step, "config": ck.config.to_dict(),
        "param_groups": ck.optimiser["param_groups"], "optimiser_scalars": scalars,
        "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": _digest(v)} for k, v in tensors.items()},
    }
    return tensors, meta


def _header(data: bytes, path: Path) -> dict:
    """The clipguide record in a safetensors header, its checksum verified."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= min(len(data) - 8, MAX_HEADER):
        raise _corrupt(path, f"not a safetensors file, or truncated ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + size])
        record = header["__metadata__"]
        text = record[META_KEY]
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: absurdly nested JSON
        raise _corrupt(path, "its header is not a clipguide checkpoint's") from None
    if not isinstance(text, str) or record.get(META_SHA) != _sha256(text.encode()):
        raise _corrupt(path, "its header fails its sha256")
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _corrupt(path, "its header is not a clipguide checkpoint's")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}, this clipguide reads "
                              f"version {VERSION}: resume it with the clipguide that wrote it")
    return meta


def _verify(tensors: dict, meta: dict, path: Path) -> None:
    listed = meta.get("tensors")
    if not isinstance(listed, dict) or set(listed) != set(tensors):
        raise _corrupt(path, "its tensors are not those its header lists")
    for name, t in tensors.items():
        record = listed[name]
        expected = {"dtype": str(t.dtype), "shape": list(t.shape), "sha256": _digest(t)}
        if not isinstance(record, dict) or any(record.get(k) != v for k, v in expected.items()):
            raise _corrupt(path, f"tensor {name!r} fails its sha256")


def _decode(tensors: dict, meta: dict) -> Checkpoint:
    try:
        cfg = RunConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ValueError(f"config: {e}") from None
    step, b = meta["step"], len(cfg.runs())
    if not isinstance(step, int) or not 0 <= step <= cfg.steps:
        raise ValueError(f"step {step!r} is outside 0..{cfg.steps}")
    state: dict = {}
    for name, t in tensors.items():
        if name.startswith("optimiser."):
            index, key = name[len("optimiser."):].split(".", 1)
            state.setdefault(int(index), {})[key] = t
    for name, value in meta["optimiser_scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    generators = [tensors[f"generator.{i}"] for i in range(b)]
    losses, sims = tensors["losses"], tensors["similarities"]
    if losses.shape != (step, b) or sims.shape != (step, b):
        raise ValueError(f"a loss history of shape {tuple(losses.shape)} for {step} steps of {b} run(s)")
    if not isinstance(meta["param_groups"], list):
        raise ValueError("param_groups is not a list")
    known = {"format", "version", "step", "config", "param_groups", "optimiser_scalars", "tensors"}
    return Checkpoint(
        step=step, config=cfg, latent={k[len("latent."):]: v for k, v in tensors.items() if k.startswith("latent.")},
        optimiser={"state": state, "param_groups": meta["param_groups"]}, generators=generators,
        losses=losses, similarities=sims, info={k: v for k, v in meta.items() if k not in known},
    )


def _digest(t: torch.Tensor) -> str:
    return _sha256(t.reshape(-1).view(torch.uint8).numpy())


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _corrupt(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt ({what}); it was not used: "
                           "restore it from a backup, or start the run again with generate --overwrite")


def _detail(e: Exception) -> str:
    return " ".join(str(e).split())[:200]


def _model_change(then, now: dict) -> str:
    """Which models differ, e.g. "decoder shapes-dvae sha256 3f2a... -> 9c01..."."""
    then = then if isinstance(then, dict) else {}
    out = []
    for role, model in now.items():
        old = then.get(role) if isinstance(then.get(role), dict) else {}
        if old != model:
            out.append(f"{role} {old.get('name')} sha256 {str(old.get('sha256'))[:12]} -> "
                       f"{model.get('name')} sha256 {str(model.get('sha256'))[:12]}")
            if old.get("encoder_sha256") != model.get("encoder_sha256"):  # a dVAE's own encoder.pkl (--init-image)
                out[-1] += (f" (encoder sha256 {str(old.get('encoder_sha256'))[:12]} -> "
                            f"{str(model.get('encoder_sha256'))[:12]})")
    return "; ".join(out) or "different descriptions"
