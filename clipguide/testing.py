"""Random-weight models of the real architectures, for tests and speed benchmarks.

Speed does not depend on weight values, and no pretrained weights can be
downloaded offline, so benchmarks and loader tests use these.
"""

from __future__ import annotations

import torch


def random_dalle_decoder(seed: int = 0, **kwargs):
    """OpenAI's dVAE decoder architecture (8192 codes, f=8 unless ``kwargs`` say otherwise), random weights."""
    from dall_e.decoder import Decoder

    from .decoders import DalleDecoder
    from .decoders.dalle_files import freeze

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = freeze(Decoder(**kwargs))
    return DalleDecoder(module, name=f"random-dalle-decoder-{seed}")


def random_clip(model_name: str = "ViT-B-32-quickgelu", seed: int = 0, model_cfg: dict | None = None, context_length=None):
    """An open_clip model (by name, or from a config dict) with random weights, wrapped as :class:`Clip`."""
    import open_clip

    from .clip import Clip

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg) if model_cfg else open_clip.create_model(model_name, pretrained=None)
    cfg = model_cfg or open_clip.get_model_config(model_name)
    ctx = context_length or cfg["text_cfg"].get("context_length", 77)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=ctx)
    return Clip(model, tokenizer, name=f"random-{model_name}-{seed}", embed_dim=cfg["embed_dim"])
