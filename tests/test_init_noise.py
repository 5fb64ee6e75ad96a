"""Init noise (issue 37, nerdyrodent's -in pixels|gradient): a run starts from the decoder's encoding of
a noise image its own seed draws, as --init-image starts from an image's."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from test_resume import Crash, crash_at

import clipguide
from clipguide import ConfigError, get_preset, optimise
from clipguide.cli import main
from clipguide.engine.noise_init import gradient_image, noise_image, pixel_noise
from clipguide.models.decoders import load_decoder
from clipguide.testing import random_vqgan


@pytest.fixture
def model_flags(tiny_model_files):
    dec, clip = tiny_model_files  # the tiny dVAE (with its encoder) and CLIP in their file formats
    return dict(preset="shapes", decoder=str(dec), clip=str(clip), size=32, cutn=2)
from test_vqgan import TINY


@pytest.fixture(scope="module")
def encoding_dvae(tiny_model_files):
    return load_decoder(str(tiny_model_files[0]))  # the tiny dVAE with its encoder


def cfg_of(**kw):
    return get_preset("shapes").replace(**{"prompts": ("a red circle",), "size": 32, "cutn": 2, "steps": 2,
                                           "snapshots": (0,), "decoder": "t", "clip": "t", "pyramid": (), "pyramid_every": 0,
                                           **kw})


def start_of(cfg, decoder, clip):
    """(the latent's parameter before the first update, the first decoded image)."""
    seen = {}
    result = optimise(cfg, decoder, clip, lambda s: seen.setdefault("param", s.checkpoint().latent["param"]))
    return seen["param"], result.snapshots[0]


def test_the_images_are_seeded_noise_and_ramps():
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a, b = pixel_noise(g(1), 40, 24), pixel_noise(g(1), 40, 24)
    assert a.shape == (3, 24, 40) and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, pixel_noise(g(2), 40, 24)) and a.min() < 20 and a.max() > 235
    ramp = gradient_image(g(1), 40, 24).int()
    red, green, blue = ramp
    assert (red == red[:1]).all() and (red[:, 1:] >= red[:, :-1]).all() and red[0, 0] == 0  # across, from black
    assert (green == green[:, :1]).all() and (green[1:] >= green[:-1]).all() and green[0, 0] == 0  # down
    assert (blue == blue[:, :1]).all() and blue[-1, 0] < 128  # down, to a level below 128
    assert not torch.equal(ramp, gradient_image(g(2), 40, 24).int())


@pytest.mark.parametrize("kind", ["pixels", "gradient"])
def test_the_run_starts_from_the_encoding_of_its_seeds_image(encoding_dvae, tiny_clip, kind):
    param, first = start_of(cfg_of(init_noise=kind, seed=4), encoding_dvae, tiny_clip)
    image = noise_image(kind, torch.Generator().manual_seed(4), 32, 32)
    logits = encoding_dvae.encode_logits(image[None].float() / 255)  # [1, V, h, w]; the parameter: [1, h·w, V]
    assert torch.equal(param, logits.flatten(2).transpose(1, 2))
    _, default = start_of(cfg_of(seed=4), encoding_dvae, tiny_clip)
    _, again = start_of(cfg_of(init_noise=kind, seed=4), encoding_dvae, tiny_clip)
    _, other = start_of(cfg_of(init_noise=kind, seed=5), encoding_dvae, tiny_clip)
    assert torch.equal(first, again) and not torch.equal(first, other) and not torch.equal(first, default)


def test_each_run_of_a_batch_starts_from_its_own_image(encoding_dvae, tiny_clip):
    param, _ = start_of(cfg_of(init_noise="pixels", seed=4, batch=2), encoding_dvae, tiny_clip)
    alone, _ = start_of(cfg_of(init_noise="pixels", seed=5), encoding_dvae, tiny_clip)
    assert torch.equal(param[1:], alone) and not torch.equal(param[0], param[1])


def test_a_vqgan_z_starts_from_the_noise_images_encoding(tiny_clip):
    vqgan = random_vqgan(TINY)
    cfg = get_preset("vqgan-zquantize").replace(prompts=("x",), size=32, cutn=2, steps=1, snapshots=(0,), decoder="t",
                                                clip="t", init_noise="gradient")
    param, first = start_of(cfg, vqgan, tiny_clip)
    image = noise_image("gradient", torch.Generator().manual_seed(0), 32, 32)
    assert torch.equal(param, vqgan.encode(image[None].float() / 255).float())
    assert not torch.equal(first, start_of(cfg.replace(init_noise=""), vqgan, tiny_clip)[1])


def test_the_manifest_records_the_start_and_the_run_resumes_bit_for_bit(model_flags, tmp_path):
    kw = dict(steps=6, snapshots=(3,), seed=2, init_noise="gradient", **model_flags)
    reference = clipguide.generate("a red circle", out_dir=tmp_path / "ref", **kw)
    record = json.loads((tmp_path / "ref" / "manifest.json").read_text())["runs"][0]
    image = noise_image("gradient", torch.Generator().manual_seed(2), 32, 32)
    assert record["parents"] == [] and record["init_noise"] == {
        "kind": "gradient", "seed": 2, "size": [32, 32],
        "sha256": hashlib.sha256(image.permute(1, 2, 0).contiguous().numpy().tobytes()).hexdigest()}
    with pytest.raises(Crash):
        clipguide.generate("a red circle", out_dir=tmp_path / "run", callback=crash_at(5), checkpoint_every=2, **kw)
    resumed = clipguide.resume(tmp_path / "run")
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.losses, reference.losses)


def test_bad_init_noise_is_one_line_exit_2(model_flags, tmp_path, capsys, encoding_dvae):
    flags = [f"--{k}={v}" for k, v in model_flags.items()]
    for bad, part in ((["--init-noise", "perlin"], "not one of pixels, gradient"),
                      (["--init-noise", "pixels", "--init-image", __file__], "--init-image and --init-noise both")):
        assert main(["generate", "x", *bad, "--out", str(tmp_path / "no"), "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and part in err, err
    assert not (tmp_path / "no").exists()
    with pytest.raises(ConfigError, match="--init-noise needs a decoder that encodes images"):
        optimise(get_preset("vqgan-codebook").replace(prompts=("x",), size=32, init_noise="pixels", decoder="t", clip="t"),
                 random_vqgan(TINY), None)
