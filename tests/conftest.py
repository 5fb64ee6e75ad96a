"""Shared fixtures: tiny models of the real architectures (random weights), built in-process."""

from __future__ import annotations

import pytest

from clipguide.testing import random_clip, random_dalle_decoder

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_DVAE = dict(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_clip():
    return random_clip("tiny", model_cfg=TINY_CLIP_CFG)


@pytest.fixture(scope="session")
def tiny_dvae():
    return random_dalle_decoder(**TINY_DVAE)
