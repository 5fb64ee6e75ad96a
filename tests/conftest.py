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


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory, tiny_clip):
    """Tiny CLIP and dVAE saved in clipguide's model formats (.json + .safetensors): (decoder.json, clip.json)."""
    import json

    from dall_e.encoder import Encoder
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    clip_json = root / "tiny-clip.json"
    clip_json.write_text(json.dumps({"kind": "open_clip", "model_name": "tiny", "model_cfg": TINY_CLIP_CFG}))
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, root / "tiny-clip.safetensors")
    dvae = random_dalle_decoder(**TINY_DVAE).module
    enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    tensors = {f"decoder.{k}": v for k, v in dvae.state_dict().items()}
    tensors.update({f"encoder.{k}": v for k, v in enc.state_dict().items()})
    dec_json = root / "tiny-dvae.json"
    dec_json.write_text(json.dumps({"kind": "dall_e", "decoder": TINY_DVAE,
                                    "encoder": {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "tiny-dvae.safetensors")
    return dec_json, clip_json
