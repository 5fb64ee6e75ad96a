"""Non-square images (``--size W,H``, nerdyrodent's ``-s W H``): the spellings of a width and a height,
a run of 128 x 64 on the shapes world (images, snapshots, manifest, checkpoint, bit-for-bit resume),
the token grid of every latent and decoder kind, the cutouts of a non-square image, the starts (init
image, init noise) and the zoom at W x H, and the one-line refusals.  A square run is unchanged:
tests/test_pinned.py pins its bytes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_resume import Crash, crash_at
from test_vqgan import TINY

import clipguide
from clipguide import ConfigError, RunConfig, get_preset, optimise
from clipguide.cli import main
from clipguide.engine import cutouts as cutouts_module
from clipguide.engine.cutouts import make_cutouts
from clipguide.engine.latents import encode_init_image, make_latent
from clipguide.engine.loop import grid_of
from clipguide.engine.noise_init import encode_init_noise
from clipguide.engine.proposals import check_prior
from clipguide.engine.state import make_generators
from clipguide.engine.zoom import zoom_image
from clipguide.records.checkpoints import FILENAME, read_checkpoint
from clipguide.records.images import resize_to_area
from clipguide.records.manifest import read_manifest
from clipguide.testing import random_vqgan

W, H = 128, 64  # the shapes dVAE's factor is 8: a 8 x 16 token grid
SMALL = dict(size=(W, H), cutn=4)


def shapes_cfg(**kw):
    return get_preset("shapes").replace(**{"prompts": ("a red circle on a blue background",), "steps": 3, **SMALL, **kw})


# ------------------------------------------------------------------------------------------ spellings


def test_a_width_and_a_height_are_spelled_as_a_pair_a_string_or_height_and_a_square_as_today():
    want = RunConfig(size=W, height=H)
    for spelling in ((W, H), [W, H], f"{W}x{H}", f"{W},{H}", f"{W}X{H}"):
        cfg = RunConfig(size=spelling)
        assert (cfg.size, cfg.height, cfg.dims()) == (W, H, (W, H)) and cfg.to_dict() == want.to_dict(), spelling
    square = RunConfig(size=96)
    assert square.height == 0 and square.dims() == (96, 96)
    # one spelling per image size: a square pair, or a height equal to the width, is stored as height 0
    assert RunConfig(size=(96, 96)).to_dict() == RunConfig(size=96, height=96).to_dict() == square.to_dict()
    assert want.replace(size=(64, 96)).dims() == (64, 96)  # a pair replaces the height too
    assert want.replace(size=256).dims() == (256, H)  # a width alone keeps the height
    assert want.replace(size=(H, H)).height == 0
    assert RunConfig.from_dict(want.to_dict()).dims() == (W, H)  # what manifests and checkpoints hold


@pytest.mark.parametrize("kw, needle", [
    (dict(size=(128, 64), height=32), "two heights"),
    (dict(size=(128, 64, 32)), "W,H or WxH"),
    (dict(size="128 by 64"), "W,H or WxH"),
    (dict(size=64, height=4), "--height must be 0"),
    (dict(size=(4, 64)), "--size must be at least 8"),
])
def test_a_bad_size_is_one_line(kw, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        RunConfig(**kw)
    assert "\n" not in str(e.value)


def test_a_side_that_is_not_a_multiple_of_the_factor_names_the_side_and_the_nearest_values(capsys, tmp_path):
    decoder = SimpleNamespace(downsample=8)
    assert grid_of(RunConfig(size=(W, H)), decoder) == (H // 8, W // 8)
    with pytest.raises(ConfigError) as e:
        grid_of(RunConfig(size=(W, 60)), decoder)
    assert str(e.value) == ("--size 128,60: the height 60 is not a multiple of the decoder's factor 8: "
                            "use a height of 56 or 64")
    with pytest.raises(ConfigError, match="the width 100 .* use a width of 96 or 104"):
        grid_of(RunConfig(size=(100, 64)), decoder)
    with pytest.raises(ConfigError, match=r"^--size 36 is not a multiple of the decoder's factor 8: use 32 or 40$"):
        grid_of(RunConfig(size=36), decoder)  # a square says what it said before
    for argv, needles in [(["--size", "128,60"], ("height 60", "56 or 64")), (["--size", "100x64"], ("width 100", "96 or 104")),
                          (["--size", "128", "--height", "60"], ("height 60",)), (["--size", "12,x"], ("--size", "W,H")),
                          (["--size", "128,64", "--height", "32"], ("two heights",))]:
        rc = main(["generate", "a red circle", "--steps", "1", "--cutn", "2", "--quiet", "--out", str(tmp_path / "x"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and all(n in err for n in needles), (argv, err)


# --------------------------------------------------------------------------------- a run of W x H


def test_a_non_square_run_writes_its_size_everywhere_and_resumes_bit_for_bit(tmp_path):
    kw = dict(preset="shapes", steps=5, snapshots=(0, 2, 5), seed=4, **SMALL)
    reference = clipguide.generate("a red circle on a blue background", out_dir=tmp_path / "ref", **kw)
    assert reference.images.shape == (1, 3, H, W)
    assert {k: tuple(v.shape) for k, v in reference.snapshots.items()} == {k: (1, 3, H, W) for k in (0, 2, 5)}
    manifest = read_manifest(tmp_path / "ref")
    assert (manifest["config"]["size"], manifest["config"]["height"]) == (W, H)
    for snap in manifest["snapshots"]:
        assert Image.open(tmp_path / "ref" / snap["file"]).size == (W, H)
    sheet = Image.open(tmp_path / "ref" / "contact_sheet.png").size
    assert sheet[0] > sheet[1]  # three wide tiles in a row
    ck = read_checkpoint(tmp_path / "ref" / FILENAME)
    grid_latent = make_latent(ck.config, 512, (H // 8, W // 8), make_generators([4]))  # tokens and coarse grids
    assert ck.config.dims() == (W, H) and ck.latent["param"].shape == grid_latent.param.shape
    assert grid_latent.param.shape[1] == 8 * 16 + 4 * 8 + 2 * 4  # the shapes preset's pyramid 2,4: per axis

    run = tmp_path / "run"
    with pytest.raises(Crash):
        clipguide.generate("a red circle on a blue background", out_dir=run, callback=crash_at(4), checkpoint_every=3, **kw)
    assert read_checkpoint(run / FILENAME).step == 3
    resumed = clipguide.resume(run)
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.losses, reference.losses)
    assert torch.equal(resumed.latent, reference.latent)

    other = shapes_cfg(steps=5, seed=4, size=(W, 32))
    with pytest.raises(ConfigError, match=r"another config \(height differ\)") as e:  # resumed at another size
        optimise(other, *clipguide.load_models(other), resume_from=ck)
    assert "\n" not in str(e.value)


def test_every_latent_and_decoder_kind_makes_the_non_square_grid(tiny_dvae, tiny_clip):
    """The grid is (h, w) = (H/f, W/f) throughout: per-position logits with coarse grids, the parity
    softmax, Gumbel latents, pixel noise (dVAE) and a taming VQGAN's z (f = 4, attention blocks)."""
    vqgan = random_vqgan(TINY)
    cases = [(tiny_dvae, "shapes", dict(pyramid=(2, 4), noise_scale=1.0, display_noise=True)),
             (tiny_dvae, "aleph2image-delta", {}), (tiny_dvae, "aleph2image-gamma", {}),
             (vqgan, "vqgan-zquantize", {}), (vqgan, "vqgan-codebook", {})]
    for decoder, preset, kw in cases:
        cfg = get_preset(preset).replace(prompts=("a red circle",), size=(64, 32), cutn=2, steps=2, snapshots=(0,), batch=1,
                                         device="cpu", **kw)
        result = optimise(cfg, decoder, tiny_clip)
        assert result.images.shape == (1, 3, 32, 64) and result.snapshots[0].shape == (1, 3, 32, 64), preset
        assert torch.isfinite(result.losses).all(), preset


# ---------------------------------------------------------------------------------------- cutouts


class Spy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = cutouts_module.crop_resize

        def spy(image, sizes, offsets, flips, cut_size, method):
            self.calls.append((list(sizes), [list(o) for o in offsets]))
            return real(image, sizes, offsets, flips, cut_size, method)

        monkeypatch.setattr(cutouts_module, "crop_resize", spy)


@pytest.mark.parametrize("kw", [dict(cut="crowson"), dict(cut="uniform", cut_range=(0.3, 1.0)),
                                dict(cut="normal", cut_range=(0.8, 0.3, 0.2, 1.0)), dict(cut_whole=0.5, cut_mirror=0.5)])
def test_the_cutouts_of_a_non_square_image_are_of_the_short_side_and_span_the_long_axis(monkeypatch, kw):
    spy = Spy(monkeypatch)
    image = torch.rand(1, 3, H, W)
    cuts = make_cutouts(image, RunConfig(cutn=400, cut_affine=0.0, **kw), 32, make_generators([3]))
    assert cuts.shape == (400, 3, 32, 32)
    (sizes, offsets), = spy.calls
    mirrored = kw.get("cut_mirror", 0)
    assert max(sizes) <= H * (1 + mirrored)
    ys, xs = [o[0] for o in offsets], [o[1] for o in offsets]
    for s, y, x in zip(sizes, ys, xs):
        if s <= H:  # a crop: inside the image on both axes
            assert 0 <= y <= H - s and 0 <= x <= W - s
        else:  # a zoomed-out whole view: the image's short side lies inside it
            assert H - s <= y <= 0 and 0 <= x <= W - s
    assert min(xs) < 8 and max(x + s for x, s in zip(xs, sizes)) > W - 8  # the left and right ends are seen
    assert max(xs) > W - H - 16  # offsets reach across the long axis, not only the short side's span


def test_pooled_views_pool_the_whole_non_square_image_to_a_square():
    image = torch.rand(1, 3, H, W)
    cuts = make_cutouts(image, RunConfig(cutn=3, cut="pooled"), 32, make_generators([0]))
    want = (F.adaptive_avg_pool2d(image, 32) + F.adaptive_max_pool2d(image, 32)) / 2
    assert cuts.shape == (3, 3, 32, 32) and torch.equal(cuts, want.expand(3, -1, -1, -1))


# ----------------------------------------------------------------------------- starts, zoom, prior


def test_init_image_and_init_noise_are_made_at_the_output_size(shapes_models, tmp_path):
    decoder, _ = shapes_models
    path = tmp_path / "init.png"
    Image.new("RGB", (300, 100), "red").save(path)
    grid = grid_of(RunConfig(size=(W, H)), decoder)
    seen = []
    real = decoder.encode_logits
    decoder.encode_logits = lambda x: seen.append(tuple(x.shape)) or real(x)
    try:
        image = encode_init_image(RunConfig(size=(W, H), init_image=str(path)), decoder, grid, 2)
        noise = encode_init_noise(RunConfig(size=(W, H), init_noise="gradient"), decoder, grid, make_generators([1]))
    finally:
        del decoder.encode_logits
    assert seen == [(1, 3, H, W), (1, 3, H, W)]
    assert image.shape == (2, decoder.vocab_size, H // 8, W // 8) and noise.shape == (1, decoder.vocab_size, H // 8, W // 8)
    run = clipguide.generate("a red circle", preset="shapes", steps=1, out_dir=tmp_path / "run", init_noise="pixels", **SMALL)
    assert read_manifest(tmp_path / "run")["runs"][0]["init_noise"]["size"] == [W, H] and run.images.shape[-2:] == (H, W)
    assert resize_to_area(Image.new("RGB", (400, 100)), W, H).size == (181, 45)  # image prompts: W x H's area, aspect kept
    assert resize_to_area(Image.new("RGB", (400, 100)), 64).size == resize_to_area(Image.new("RGB", (400, 100)), 64, 64).size


def test_a_non_square_zoom_is_the_encoding_of_the_zoomed_image(shapes_models):
    """As tests/test_zoom.py at 128 x 64: after update N-1 the latent is the encoding of the zoomed image."""
    decoder, clip = shapes_models
    zoom = dict(zoom_every=2, zoom_scale=1.25, zoom_shift=(8, -3))
    plain = optimise(shapes_cfg(steps=2, snapshots=(0, 1)), decoder, clip)
    zoomed = optimise(shapes_cfg(steps=2, snapshots=(0, 1), **zoom), decoder, clip)
    for k in (0, 1):
        assert torch.equal(zoomed.snapshots[k], plain.snapshots[k])
    target = zoom_image(plain.images, 1.25, (8, -3))
    start = decoder.encode_logits(target)
    assert start.shape[-2:] == (H // 8, W // 8)
    expected = decoder.decode(F.one_hot(start.argmax(1), decoder.vocab_size).permute(0, 3, 1, 2).float()).clamp(0, 1)
    assert zoomed.images.shape == (1, 3, H, W) and torch.allclose(zoomed.images, expected, atol=1e-5)


def test_a_prior_of_another_grid_is_refused_naming_both_grids():
    prior = SimpleNamespace(vocab_size=512, grid=(8, 8))
    cfg = RunConfig(size=(W, H), prior="p.json", prior_weight=1.0)
    check_prior(cfg.replace(size=64), prior, 512, (8, 8))
    with pytest.raises(ConfigError, match=r"models 8x8 grids of 512 codes, but this run has 8x16 of 512.*--size W,H"):
        check_prior(cfg, prior, 512, (H // 8, W // 8))
