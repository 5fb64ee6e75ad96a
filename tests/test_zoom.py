"""The zoom video (``--zoom-every``, nerdyrodent's -zvid): the zoom of an image, its effect on a run
(the image after a zoom step is the decoder's encoding of the zoomed image before it), the optimiser
reset, bit-identical resumes across zooms, and the refusals."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops
from test_resume import assert_same_run, checkpoints_of

from clipguide import ConfigError, RunConfig, get_preset, load_decoder, optimise
from clipguide.engine.loop import check_fits
from clipguide.engine.zoom import check_zoom, zoom_image
from clipguide.records.files import to_pil

SMALL = dict(prompts=("a red circle",), size=64, cutn=4)


def shapes_cfg(**kw):
    return get_preset("shapes").replace(**{**SMALL, "steps": 3, **kw})


def test_zoom_image_zooms_about_the_centre_and_shifts_wrapping_as_imagechops_offset():
    square = torch.zeros(1, 3, 32, 32)
    square[..., 8:24, 8:24] = 1.0  # a centred square of half the side
    assert torch.equal(zoom_image(square, 1.0), square)
    filled = zoom_image(square, 2.0)  # zoomed in 2x: the square fills the frame
    assert filled[..., 1:-1, 1:-1].min() > 0.99
    smaller = zoom_image(square, 0.5)  # zoomed out: a quarter of the side
    assert abs(float(smaller[0, 0].mean()) - 1 / 16) < 0.01
    pixels = torch.rand(1, 3, 16, 16)
    shifted = zoom_image(pixels, 1.0, (3, -2))
    expected = ImageChops.offset(to_pil(pixels[0]), 3, -2)
    assert np.array_equal(np.asarray(to_pil(shifted[0])), np.asarray(expected))


@pytest.mark.parametrize("scale, shift", [(1.5, ()), (1.0, (16, 0)), (0.8, (3, -5))])
def test_the_image_after_a_zoom_step_is_the_encoding_of_the_zoomed_image_before_it(shapes_models, scale, shift):
    """Updates 0..N-2 are the unzoomed run's; after update N-1 the latent is the dVAE encoder's logits
    of the zoomed display image, so step N shows their argmax decode, close to the zoomed image."""
    decoder, clip = shapes_models
    plain = optimise(shapes_cfg(snapshots=(0, 1, 2)), decoder, clip)
    zoomed = optimise(shapes_cfg(snapshots=(0, 1, 2), zoom_every=3, zoom_scale=scale, zoom_shift=shift), decoder, clip)
    for k in (0, 1, 2):
        assert torch.equal(zoomed.snapshots[k], plain.snapshots[k])
    target = zoom_image(plain.images, scale, shift)  # the image the zoom took (step 3 without the zoom), zoomed
    codes = decoder.encode_logits(target).argmax(1)
    expected = decoder.decode(F.one_hot(codes, decoder.vocab_size).permute(0, 3, 1, 2).float()).clamp(0, 1)
    assert torch.allclose(zoomed.images, expected, atol=1e-5)
    # and the decoder redraws the zoomed image closely (measured: mean error 0.014-0.045; what the zoom itself moves,
    # the unzoomed image against the zoomed one: 0.014-0.115, so this is no check of the mechanism, which is above)
    assert (zoomed.images - target).abs().mean() < 0.06


def test_a_zoom_resets_the_optimiser_and_the_anchor(shapes_models):
    decoder, clip = shapes_models
    seen = {}

    def keep(state):
        seen[state.step] = state.checkpoint()

    optimise(shapes_cfg(steps=4, zoom_every=2, zoom_scale=1.25, init_weight=0.5), decoder, clip, keep)
    assert seen[1].optimiser["state"] and not seen[2].optimiser["state"]  # as nerdyrodent re-creates it
    assert seen[3].optimiser["state"] and not seen[4].optimiser["state"]
    assert torch.equal(seen[2].latent["param_init"], seen[2].latent["param"])  # the pull is toward the zoomed start


@pytest.mark.parametrize("at", [2, 3, 4, 6])
def test_a_zoom_run_resumes_bit_for_bit(shapes_models, tmp_path, at):
    """Checkpoints just before, at and between zooms (every 3 steps, 7 steps) continue the uninterrupted run."""
    decoder, clip = shapes_models
    cfg = shapes_cfg(steps=7, snapshots=(2, 3, 5, 6), zoom_every=3, zoom_scale=1.1, zoom_shift=(2, -1))
    full, saved = checkpoints_of(cfg, decoder, clip, tmp_path)
    assert_same_run(full, optimise(cfg, decoder, clip, resume_from=saved[at]), since=at)


def test_zoom_is_off_by_default_and_its_fields_are_checked():
    assert RunConfig().zoom_every == 0
    for bad, words in [(dict(zoom_scale=1.1), "add --zoom-every"), (dict(zoom_shift=(1, 0)), "add --zoom-every"),
                       (dict(zoom_every=-1), "--zoom-every must be"), (dict(zoom_every=2, zoom_scale=0.0), "--zoom-scale"),
                       (dict(zoom_every=2, zoom_shift=(1,)), "DX,DY")]:
        with pytest.raises(ConfigError, match=words):
            RunConfig(prompts=("x",), **bad)


def test_zoom_needs_a_decoder_that_encodes():
    """A dVAE without its encoder, or a VQGAN on code logits, is refused before the run (check_fits)."""
    cfg = RunConfig(prompts=("x",), size=32, zoom_every=2)
    no_encoder = SimpleNamespace(name="plain", vocab_size=512, downsample=8)
    with pytest.raises(ConfigError, match="--zoom-every re-encodes"):
        check_zoom(cfg, no_encoder)
    vqgan = load_decoder("shapes-vqgan")
    with pytest.raises(ConfigError, match="--latent zquantize"):
        check_fits(cfg.replace(size=64), vqgan)
    check_fits(get_preset("vqgan-zquantize").replace(decoder="shapes-vqgan", prompts=("x",), size=64, zoom_every=2), vqgan)


def test_zquantize_zoom_restarts_z_at_the_vqgans_encoding(shapes_models):
    """On a VQGAN the zoomed image is encoded into quantized z, which the next step decodes."""
    _, clip = shapes_models
    vqgan = load_decoder("shapes-vqgan")
    cfg = get_preset("vqgan-zquantize").replace(decoder="shapes-vqgan", clip="shapes", **SMALL, steps=2)
    plain = optimise(cfg, vqgan, clip)
    zoomed = optimise(cfg.replace(zoom_every=2, zoom_scale=1.5), vqgan, clip)
    expected = vqgan.decode_z(vqgan.encode(zoom_image(plain.images, 1.5))).clamp(0, 1)
    assert torch.allclose(zoomed.images, expected, atol=1e-5)
    assert not torch.equal(zoomed.images, plain.images)


def test_zoom_flags_reach_the_manifest(tmp_path):
    import json

    from clipguide.cli import main

    out = tmp_path / "run"
    assert main(["generate", "a red circle", "--preset", "shapes", "--steps", "2", "--size", "64", "--cutn", "2", "--quiet", "--out", str(out),
                 "--zoom-every", "1", "--zoom-scale", "1.05", "--zoom-shift=-2,1"]) == 0
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["zoom_every"], config["zoom_scale"], config["zoom_shift"]) == (1, 1.05, [-2, 1])
    assert Image.open(out / "step_000002.png").size == (64, 64)
