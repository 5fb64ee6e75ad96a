"""clipguide: CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN)."""

__version__ = "0.1.0"

from .config import RunConfig
from .errors import ClipguideError, ConfigError, WeightsError
from .generation import generate, load_models
from .optimise import Result, StepState, optimise
from .presets import PRESETS, get_preset
from .prompts import PromptError, parse_prompt
from .snapshots import Snapshotter


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
    "PromptError", "parse_prompt",
]
