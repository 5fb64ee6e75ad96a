"""clipguide: CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN).

Importing the package loads nothing heavy: each public name below is imported from its
module on first use (PEP 562), so ``import clipguide`` and the command line start at once
and a Ctrl-C while torch loads reaches the CLI's own handler (one line, exit 130).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "RunConfig": "config",
    "Checkpoint": "checkpoint", "Checkpointer": "checkpoint", "resume": "checkpoint",
    "CheckpointError": "errors", "ClipguideError": "errors", "ConfigError": "errors", "NonFiniteError": "errors",
    "OutputError": "errors", "WeightsError": "errors",
    "generate": "generation", "load_models": "generation",
    "Result": "optimise", "StepState": "optimise", "optimise": "optimise",
    "PRESETS": "presets", "get_preset": "presets",
    "PromptError": "prompts", "parse_prompt": "prompts",
    "ReplayReport": "replay", "replay": "replay",
    "Snapshotter": "snapshots",
    "load_clip": "clip", "load_decoder": "decoders",
    "Classification": "classification", "classify": "classification", "OutputFilter": "output_filter",
    "BiasAudit": "bias", "audit_bias": "bias", "clip_frechet_distance": "scores", "clip_score": "scores",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipguide' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package: ``clipguide.optimise`` and
    ``clipguide.replay`` would become modules, not the functions the package exports."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return  # the module stays reachable as sys.modules["clipguide.NAME"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
