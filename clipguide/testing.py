"""Random-weight models of the real architectures, for tests and speed benchmarks.

Speed does not depend on weight values, and no pretrained weights can be
downloaded offline, so benchmarks and loader tests use these.
"""

from __future__ import annotations

import torch

from .models.clip import Clip, custom_attention
from .models.dalle import DalleDecoder
from .models.dalle_files import freeze
from .models.vqgan import TamingConfig, VQGANDecoder, build_parts


def random_dalle_decoder(seed: int = 0, **kwargs):
    """OpenAI's dVAE decoder architecture (8192 codes, f=8 unless ``kwargs`` say otherwise), random weights."""
    from dall_e.decoder import Decoder


    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = freeze(Decoder(**kwargs))
    return DalleDecoder(module, name=f"random-dalle-decoder-{seed}")


def random_clip(model_name: str = "ViT-B-32-quickgelu", seed: int = 0, model_cfg: dict | None = None, context_length=None):
    """An open_clip model (by name, or from a config dict) with random weights, wrapped as :class:`Clip`."""
    import open_clip


    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = custom_attention(model_cfg or open_clip.get_model_config(model_name))
        model = open_clip.CLIP(**cfg) if model_cfg else open_clip.create_model(model_name, pretrained=None, vision_cfg=cfg["vision_cfg"])
    ctx = context_length or cfg["text_cfg"].get("context_length", 77)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
    return Clip(model, tokenizer, name=f"random-{model_name}-{seed}", embed_dim=cfg["embed_dim"])


# taming's vqgan_imagenet_f16_16384 (configs/model.yaml of its heibox share): ~72 M parameters in
# the decoder and encoder, 16384 x 256 codebook.
VQGAN_F16_16384 = {
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0},
    "n_embed": 16384,
    "embed_dim": 256,
}
# taming's Gumbel-quantized f8 OpenImages model (vqgan_gumbel_f8_8192)
VQGAN_GUMBEL_F8_8192 = {
    "ddconfig": {**VQGAN_F16_16384["ddconfig"], "ch_mult": [1, 1, 2, 4], "attn_resolutions": [32]},
    "n_embed": 8192,
    "embed_dim": 256,
    "quantizer": "gumbel",
}
# registry name -> architecture, for random stand-ins of the published checkpoints
VQGAN_ARCHITECTURES = {
    "vqgan-imagenet-f16-1024": {**VQGAN_F16_16384, "n_embed": 1024},
    "vqgan-imagenet-f16-16384": VQGAN_F16_16384,
    "vqgan-gumbel-f8-8192": VQGAN_GUMBEL_F8_8192,
}


def random_vqgan(arch: dict = VQGAN_F16_16384, seed: int = 0):
    """A taming VQGAN of architecture ``arch`` ({"ddconfig", "n_embed", "embed_dim"}, optional
    "quantizer": "vq" or "gumbel") with random weights.

    The codebook is drawn from N(0, 1) instead of taming's U(±1/V) init: trained codebooks
    spread far wider, and z+quantize's clamp box is the codebook's range.
    """

    cfg = TamingConfig(arch.get("quantizer", "vq"), dict(arch["ddconfig"]), arch["n_embed"], arch["embed_dim"], source="random")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        parts = build_parts(cfg)
        state = {f"{p}.{k}": v for p, m in parts.items() for k, v in m.state_dict().items()}
        decoder = VQGANDecoder.from_state(cfg, state, name=f"random-vqgan-{seed}")
        with torch.no_grad():
            decoder.codebook.normal_()
    return decoder
