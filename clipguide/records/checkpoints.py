"""The checkpoint file, ``checkpoint.safetensors``: everything the loop needs to go on bit for bit.

The latent (with its moving average, temperature and anchor), the optimiser's moments, every run's
generator state, the step and the loss history (:class:`~clipguide.engine.state.Checkpoint`), as a
safetensors file (plain tensors plus a JSON header: nothing in it can run code) whose header and
every tensor carry a sha256 checked on reading, written atomically (temporary file + rename), so a
crash or a full disk leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..config import RunConfig
from ..engine.state import Checkpoint
from ..errors import CheckpointError, ConfigError, NonFiniteError, error_detail
from .files import atomic_write

FORMAT, VERSION = "clipguide-checkpoint", 1


META_KEY, META_SHA = "clipguide", "clipguide_sha256"  # the header's JSON record and its sha256


FILENAME = "checkpoint.safetensors"


MAX_HEADER = 16 * 2**20


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
        raise _corrupt(path, f"unreadable tensors: {error_detail(e)}") from None
    _verify(tensors, meta, path)
    try:
        return _decode(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise _corrupt(path, f"malformed record: {error_detail(e)}") from None


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
