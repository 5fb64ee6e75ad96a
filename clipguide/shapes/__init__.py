"""The shapes world: procedural scenes, a pixel judge and tiny models trained on them.

Submodules: :mod:`clipguide.shapes.scenes`, :mod:`clipguide.shapes.judge`,
:mod:`clipguide.shapes.train` (imports torch / open_clip / dall_e / taming lazily).
(``clipguide.shapes.judge`` is the judge module; call ``judge.judge(image)``.)
Shipped model files live in :data:`MODELS_DIR`.
"""

from pathlib import Path

from .judge import Verdict, judge_batch
from .scenes import (BACKGROUNDS, COLOURS, SHAPES, TEMPLATES, Scene, attributes_of_prompt, caption,
                     canonical_prompts, parse_caption, render, render_distractors, sample_scenes, to_tensor)

MODELS_DIR = Path(__file__).resolve().parent / "models"

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "TEMPLATES", "Scene", "Verdict", "MODELS_DIR",
           "attributes_of_prompt", "caption", "canonical_prompts", "judge_batch", "parse_caption",
           "render", "render_distractors", "sample_scenes", "to_tensor"]
