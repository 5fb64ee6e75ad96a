"""Every preset runs with the real architectures (OpenAI dVAE decoder or its taming VQGAN, CLIP ViT-B/32), random weights."""

import pytest
import torch

from clipguide import get_preset, optimise
from clipguide.presets import PRESETS
from clipguide.testing import VQGAN_ARCHITECTURES, random_clip, random_dalle_decoder, random_vqgan
from test_options import NO_PRIOR


@pytest.fixture(scope="module")
def real_models():
    return random_dalle_decoder(), random_clip("ViT-B-32-quickgelu")


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_runs_on_real_architectures(real_models, preset):
    decoder, clip = real_models
    assert decoder.vocab_size == 8192 and clip.image_size == 224
    if get_preset(preset).decoder in VQGAN_ARCHITECTURES:  # VQGAN presets: their checkpoint's architecture
        decoder = random_vqgan(VQGAN_ARCHITECTURES[get_preset(preset).decoder])
    cfg = get_preset(preset).replace(prompts=("an armchair in the shape of an avocado",), size=32, cutn=2, steps=2, snapshots=(0,),
                                     **(NO_PRIOR if get_preset(preset).prior else {}))  # shapes-prior models the shapes dVAE
    r = optimise(cfg, decoder, clip)
    assert r.images.shape == (cfg.batch, 3, 32, 32) and r.steps_done == 2
    assert torch.isfinite(r.losses).all() and r.images.min() >= 0 and r.images.max() <= 1
    assert not torch.equal(r.latent, optimise(cfg.replace(steps=1), decoder, clip).latent)


def test_decoder_is_frozen(real_models):
    decoder, _ = real_models
    assert not any(p.requires_grad for p in decoder.module.parameters())
