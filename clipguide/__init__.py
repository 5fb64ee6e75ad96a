"""clipguide: CLIP-guided image generation through discrete decoders (DALL-E dVAE, VQGAN).

Importing the package loads nothing heavy: each public name below is imported from its
module on first use (PEP 562), so ``import clipguide`` and the command line start at once
and a Ctrl-C while torch loads reaches the CLI's own handler (one line, exit 130).
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "RunConfig": "config",
    "Checkpoint": "engine.state", "Checkpointer": "run.checkpoints", "resume": "run.resume",
    "CheckpointError": "errors", "ClipguideError": "errors", "ConfigError": "errors", "NonFiniteError": "errors",
    "OutputError": "errors", "WeightsError": "errors",
    "generate": "run.generation", "load_models": "models.loading",
    "Result": "engine.state", "StepState": "engine.state", "optimise": "engine.loop",
    "PRESETS": "presets", "get_preset": "presets",
    "PromptError": "engine.prompts", "parse_prompt": "engine.prompts",
    "ReplayReport": "run.replay", "replay": "run.replay",
    "Snapshotter": "run.snapshots", "run_session": "run.session", "describe_models": "engine.loop",
    "load_clip": "models.clip", "load_decoder": "models.decoders", "load_prior": "models.priors",
    "Classification": "audit.classification", "classify": "audit.classification", "OutputFilter": "audit.output_filter",
    "sweep": "sweeps.driver", "SweepSpec": "sweeps.spec", "SweepResult": "sweeps.driver",
    "BiasAudit": "audit.bias", "audit_bias": "audit.bias", "clip_frechet_distance": "audit.scores", "clip_score": "audit.scores",
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

