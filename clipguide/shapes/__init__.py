"""The shapes world: procedural scenes, a pixel judge and tiny models trained on them.

Submodules: :mod:`clipguide.shapes.scenes`, :mod:`clipguide.shapes.judge`,
:mod:`clipguide.shapes.quality`, :mod:`clipguide.shapes.training` (the shipped models' training, by
model; only ``clipguide train-shapes`` imports it, and it imports taming only to build a VQGAN).
(``clipguide.shapes.judge`` is the judge module; call ``judge.judge(image)``.)
Shipped model files live in :data:`MODELS_DIR`.
"""

from ..paths import SHAPES_MODELS
from .judge import Verdict, judge_batch
from .scenes import (BACKGROUNDS, COLOURS, SHAPES, TEMPLATES, Scene, attributes_of_prompt, canonical_prompts, caption,
                     parse_caption, render, render_distractors, sample_scenes, to_tensor)

MODELS_DIR = SHAPES_MODELS  # the shipped model files

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "TEMPLATES", "Scene", "Verdict", "MODELS_DIR",
           "attributes_of_prompt", "caption", "canonical_prompts", "judge_batch", "parse_caption",
           "render", "render_distractors", "sample_scenes", "to_tensor"]
