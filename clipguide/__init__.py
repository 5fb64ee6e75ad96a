"""clipguide: CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN)."""

__version__ = "0.1.0"

from .config import RunConfig
from .checkpoint import Checkpoint, Checkpointer, resume
from .errors import CheckpointError, ClipguideError, ConfigError, NonFiniteError, OutputError, WeightsError
from .generation import generate, load_models
from .optimise import Result, StepState, optimise
from .presets import PRESETS, get_preset
from .prompts import PromptError, parse_prompt
from .replay import ReplayReport, replay
from .snapshots import Snapshotter

# The audit tools import open_clip (~2 s): loaded on first use, so the CLI starts fast.
_LAZY = {"Classification": "classification", "classify": "classification", "OutputFilter": "output_filter",
         "BiasAudit": "bias", "audit_bias": "bias", "clip_frechet_distance": "scores", "clip_score": "scores"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'clipguide' has no attribute {name!r}")


def load_clip(spec: str, device: str = "cpu"):
    """A CLIP by spec (see :func:`clipguide.clip.load_clip`)."""
    from .clip import load_clip as _load

    return _load(spec, device=device)


def load_decoder(spec: str, device: str = "cpu"):
    """A decoder by spec (see :func:`clipguide.decoders.load_decoder`)."""
    from .decoders import load_decoder as _load

    return _load(spec, device=device)


__all__ = [
    "RunConfig", "Result", "StepState", "Snapshotter", "optimise", "generate", "load_models",
    "load_clip", "load_decoder", "PRESETS", "get_preset", "ClipguideError", "ConfigError", "WeightsError",
    "PromptError", "parse_prompt", "replay", "ReplayReport",
    "classify", "Classification", "OutputFilter", "audit_bias", "BiasAudit", "clip_score", "clip_frechet_distance",
    "resume", "Checkpoint", "Checkpointer", "CheckpointError", "NonFiniteError", "OutputError",
]
