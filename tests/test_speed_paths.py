"""The fast paths of issue 8 compute what the plain paths compute: batched cutouts, open_clip's
custom attention blocks, the matmul patch embedding, and the bf16 casts of decoder and CLIP."""


import pytest
import torch
import torch.nn.functional as F

from clipguide import get_preset, optimise
from clipguide.models.clip import PatchEmbedding, custom_attention
from clipguide.engine.cutouts import crop_resize
from clipguide.errors import ConfigError
from reference import per_crop  # the notebooks' per-cutout loop with Crowson's resample, written out


@pytest.mark.parametrize("method", ["lanczos", "bilinear"])
@pytest.mark.parametrize("shape,cut", [((3, 48, 48), 20), ((3, 40, 56), 20), ((3, 16, 16), 24)])
def test_batched_crop_resize_equals_the_per_crop_loop(method, shape, cut):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(shape, generator=g, dtype=torch.float64)
    side = min(shape[1:])
    sizes = torch.randint(max(1, side // 2), side + 1, (7,), generator=g).tolist()
    offsets = [(int(torch.randint(0, shape[1] - s + 1, (), generator=g)), int(torch.randint(0, shape[2] - s + 1, (), generator=g)))
               for s in sizes]
    flips = [i % 3 == 0 for i in range(7)]
    x = image.clone().requires_grad_(True)
    y = image.clone().requires_grad_(True)
    a, b = per_crop(x, sizes, offsets, flips, cut, method), crop_resize(y, sizes, offsets, flips, cut, method)
    assert torch.allclose(a, b, atol=1e-10)
    weights = torch.rand(a.shape, generator=g, dtype=torch.float64)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-10)


def test_patch_embedding_is_the_strided_convolution():
    conv = torch.nn.Conv2d(3, 16, 8, stride=8, bias=True)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(38))
    assert torch.allclose(PatchEmbedding(conv)(x), conv(x), atol=1e-5)


def test_custom_attention_blocks_load_the_same_weights_and_compute_the_same(tiny_clip):
    import open_clip

    from conftest import TINY_CLIP_CFG

    plain = open_clip.CLIP(**TINY_CLIP_CFG).eval()
    fast = open_clip.CLIP(**custom_attention(TINY_CLIP_CFG)).eval()
    fast.load_state_dict(plain.state_dict(), strict=True)  # same keys and shapes
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(50))
    with torch.no_grad():
        assert torch.allclose(plain.encode_image(x), fast.encode_image(x), atol=1e-5)
    assert type(fast.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    assert type(tiny_clip.visual.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"


def test_bf16_casts_are_close_to_fp32_and_keep_fp32_interfaces(tiny_clip, tiny_dvae):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(58))
    fast = tiny_clip.cast(torch.bfloat16)
    assert fast is tiny_clip.cast(torch.bfloat16)  # built once
    assert tiny_clip.cast(torch.float32) is tiny_clip and tiny_clip.dtype == torch.float32
    a, b = tiny_clip.encode_image(x), fast.encode_image(x)
    assert b.dtype == torch.float32 and F.cosine_similarity(a, b).min() > 0.99
    codes = F.one_hot(torch.randint(512, (1, 4, 4), generator=torch.Generator().manual_seed(64)), 512).permute(0, 3, 1, 2).float()
    dec = tiny_dvae.cast(torch.bfloat16)
    p, q = tiny_dvae.decode(codes), dec.decode(codes)
    assert q.dtype == torch.float32 and (p - q).abs().max() < 0.05
    assert tiny_dvae.dtype == torch.float32  # the original is untouched


def test_bf16_vqgan_keeps_fp32_quantisation():
    from clipguide.testing import random_vqgan

    from test_vqgan import TINY as TINY_VQGAN

    vq = random_vqgan(TINY_VQGAN)
    fast = vq.cast(torch.bfloat16)
    z = torch.randn(1, vq.e_dim, 4, 4, generator=torch.Generator().manual_seed(78))
    assert torch.equal(vq.quantize_z(z), fast.quantize_z(z))
    p, q = vq.decode_z(z), fast.decode_z(z)
    assert q.dtype == torch.float32 and (p - q).abs().max() < 0.05


def test_bf16_runs_are_reproducible_and_follow_fp32(shapes_models):
    decoder, clip = shapes_models
    cfg = get_preset("shapes").replace(prompts=("a red circle on a blue background",), steps=4, cutn=4)
    fp32 = optimise(cfg, decoder, clip)
    bf16 = optimise(cfg.replace(precision="bf16"), decoder, clip)
    again = optimise(cfg.replace(precision="bf16"), decoder, clip)
    assert torch.equal(bf16.images, again.images)
    assert torch.allclose(fp32.losses[0], bf16.losses[0], rtol=0.02)  # same start, bf16 rounding only
    assert (fp32.images - bf16.images).abs().mean() < 0.05


def test_bf16_models_are_loaded_lean_and_apart_from_fp32():
    from clipguide.models.loading import load_models

    cfg = get_preset("shapes").replace(prompts=("a red circle on a blue background",), precision="bf16")
    decoder, clip = load_models(cfg)
    assert clip.model.visual is clip.visual and {p.dtype for p in clip.visual.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in clip.model.transformer.parameters()} == {torch.float32}  # text tower stays fp32
    assert decoder.dtype == torch.bfloat16 and decoder.encoder is not None  # init images still encode
    plain_decoder, plain_clip = load_models(cfg.replace(precision="fp32"))
    assert plain_clip.dtype == torch.float32 and plain_decoder.dtype == torch.float32
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(105))
    assert F.cosine_similarity(clip.encode_image(x), plain_clip.encode_image(x)).min() > 0.99


def test_cut_batch_backpropagates_cutouts_in_chunks_with_the_same_result(shapes_models):
    """--cut-batch k splits CLIP's backward into chunks of k cutouts: the loss is a mean over cutouts,
    so the gradient is the same sum; loss, regularisers and images must agree with one pass."""
    decoder, clip = shapes_models
    cfg = get_preset("shapes").replace(prompts=("a red circle on a blue background", "a green square"), steps=3,
                                       batch=2, cutn=6, tv_weight=0.5, init_weight=0.3)
    whole = optimise(cfg, decoder, clip)
    for k in (1, 4):  # 4 leaves a ragged last chunk of 2
        chunked = optimise(cfg.replace(cut_batch=k), decoder, clip)
        torch.testing.assert_close(chunked.losses, whole.losses, rtol=1e-5, atol=1e-6)
        # Adam divides by sqrt(v): where a gradient is near zero, the chunked sum's other float order is magnified,
        # so a few logits (5 of 688128 with the robust CLIP) move by ~5e-5 after 3 steps of lr 0.1
        torch.testing.assert_close(chunked.latent, whole.latent, rtol=1e-4, atol=2e-4)
        assert (chunked.images - whole.images).abs().max() < 1e-3


def test_cut_batch_must_not_be_negative():
    with pytest.raises(ConfigError, match="--cut-batch"):
        get_preset("shapes").replace(prompts=("a red circle",), cut_batch=-1).validate()
