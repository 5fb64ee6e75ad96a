"""Behaviour pinned bit for bit: a short run of every preset, written to a folder and resumed.

The sha256 hashes below were recorded before the code was restructured; a refactor must keep
them.  Each preset runs on small random-weight models of its real architecture (the dVAE, a
taming VQGAN, an open_clip CLIP, saved in their file formats) or on the shipped shapes models,
on one thread, and compared with the hashes recorded on a CPU of the same vendor (tests/pins.py).  What is hashed: the final images, the per-step losses and similarities, the
checkpoint's tensors (latent, optimiser, generators) and the pixels of every snapshot PNG.
An interrupted run that is resumed must end on the same hashes as the uninterrupted one.

To record new hashes after an intended change of behaviour:
``CLIPGUIDE_PIN_RECORD=1 python -m pytest tests/test_pinned.py -s`` prints the table.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipguide
from clipguide import PRESETS

from pins import RECORD, pins_for
from test_vqgan import TINY, TINY_GUMBEL, tiny_files

STEPS, SNAPSHOTS = 4, (2, 4)

# Per CPU vendor (tests/pins.py).  AuthenticAMD: recorded at 7e38af9, before the restructuring; the entries that run on
# the shipped shapes CLIP (bf16-uniform, cuts, init-image, noise-story, shapes, shapes-rerank, terms) re-recorded in the
# nineteenth round, when it gained stage clipprior.  GenuineIntel: recorded in the twenty-first round from the same
# code (an Intel Xeon with AVX-512), where every run and its resume agree with each other but not with the AMD bytes.
PINNED = {
    "AuthenticAMD": {
        'aleph2image': {'images': '224c0a7d9c70a4b2', 'losses': '96462b3638d297ea', 'checkpoint': '7c18b79f8a6d2cdf', 'pngs': '318d924e6426d6a8'},
        'aleph2image-delta': {'images': '23dab4cba04c7f62', 'losses': '1d88525525fe753c', 'checkpoint': '4b34f7669644ab52', 'pngs': 'b06f48f119d2226f'},
        'aleph2image-gamma': {'images': '44c2f1d7c62aea82', 'losses': 'c82a1d6d08c89c19', 'checkpoint': 'a853c622957d6cf8', 'pngs': '59cbe5463599e4e9'},
        'bf16-uniform': {'images': 'cf7d1b070d352733', 'losses': '6287202af09c36df', 'checkpoint': 'be18e4493dbba616', 'pngs': 'b9139a944e9f9b5d'},
        'cuts': {'images': '480c45dc54df31b5', 'losses': '28ba2a793a604ef3', 'checkpoint': '6f46abfd446ae800', 'pngs': '03fe216496a0a020'},
        'dvae-codebook': {'images': 'c1e6737f64a76356', 'losses': '2614cd8e6f2b3b3a', 'checkpoint': 'b1ff448aa67a4c03', 'pngs': '4440821eddfe8df8'},
        'init-image': {'images': 'c0e473616794d5c9', 'losses': '3dd5dd892c1cda6f', 'checkpoint': 'b750c132f9390f62', 'pngs': '64f680cd0bc9ab0f'},
        'noise-story': {'images': '56f310052cf9a800', 'losses': '4b1eba8f20846a03', 'checkpoint': '4dcf43a532fc8f5f', 'pngs': 'f782178753deab85'},
        'shapes': {'images': '725ad712442b23a9', 'losses': 'ef777865cae79487', 'checkpoint': '09cbbfc23e22720b', 'pngs': '3e6414e4b37f4a04'},
        # the default since the eighteenth round (16 candidates, shortlist 4, the 4 best completed once per cut): re-recorded
        # in the twentieth, when it gained the completions (with prior_resample=0 it kept the nineteenth round's bytes)
        'shapes-rerank': {'images': '0cf6b57ce5049908', 'losses': 'b19829a338e56a13', 'checkpoint': 'a6ad0f38df91a79f', 'pngs': '35bf1b0bbd0b42ef'},
        'terms': {'images': 'e75bbdc5c149aa92', 'losses': '36befa8190303db5', 'checkpoint': '41a30b7ef4b9bf8b', 'pngs': 'df7b9cd4b9269b9f'},
        'vqgan-codebook': {'images': '23de0af7522d6ce0', 'losses': '0c4c77156f8cfd68', 'checkpoint': 'ca7ced8d17885c16', 'pngs': '92a369a8e9ffe820'},
        'vqgan-gumbel': {'images': '9bd33d2fa73b58a0', 'losses': '1eb07abdeabaf114', 'checkpoint': '77457a0c884ef953', 'pngs': 'e89a4a08eb82e77b'},
        'vqgan-zquantize': {'images': 'd70854cd466cd44e', 'losses': '06d4e603bd8215aa', 'checkpoint': '33ddae1ebfe5948a', 'pngs': 'e738d78a2c23b042'},
        # recorded when the preset was added (kornia 0.9.0, torch 2.14.1); its 4 tiny steps keep vqgan-zquantize's codes
        'vqgan-nerdyrodent': {'images': 'd70854cd466cd44e', 'losses': '91d6e48a0cb1780e', 'checkpoint': 'afe097c354c7dde7', 'pngs': 'e738d78a2c23b042'},
    },
    "GenuineIntel": {
        'aleph2image': {'images': '12b172707fdf6f8f', 'losses': '6199d3dc0db333ca', 'checkpoint': 'fa3f9cd6991bae86', 'pngs': '6a38ba0b3e71a474'},
        'aleph2image-delta': {'images': '3468276bbe6d10c6', 'losses': '37c856e04e186317', 'checkpoint': '45ccaadd2fe43d86', 'pngs': 'b06f48f119d2226f'},
        'aleph2image-gamma': {'images': '1d8bc6550cfc3103', 'losses': '84b1063bc5d941ea', 'checkpoint': '4f45c83b51f3d0d5', 'pngs': '59cbe5463599e4e9'},
        'bf16-uniform': {'images': '74eec15c04f1d7db', 'losses': 'd3d7c44ba1324cd6', 'checkpoint': '0c62366812a6a9f5', 'pngs': '5f32f912cfc42545'},
        'cuts': {'images': 'af4ff7c9331d1b7b', 'losses': '5677d12aef2076e0', 'checkpoint': '712a91165f3d3318', 'pngs': '03fe216496a0a020'},
        'dvae-codebook': {'images': '9ff62d1e781f94f0', 'losses': '5fc151ad50cdba89', 'checkpoint': 'b5980df954c2ee03', 'pngs': '4440821eddfe8df8'},
        'init-image': {'images': '7922dfdb439a8e74', 'losses': '28ec3449355fce38', 'checkpoint': 'c5f6cb8bc70e6b31', 'pngs': '64f680cd0bc9ab0f'},
        'noise-story': {'images': 'f97e6fe9bb113c2e', 'losses': '38d060a07f6da1af', 'checkpoint': '58a3965ae10d4674', 'pngs': 'adf7a260b47af2c9'},
        'shapes': {'images': '6f57f9a9e651f7ba', 'losses': '1c09b5b8c17e6541', 'checkpoint': 'cb25bce3095d3bf9', 'pngs': '3e6414e4b37f4a04'},
        'shapes-rerank': {'images': '3bb4add8c9d13852', 'losses': 'feca50e39bfe477e', 'checkpoint': 'e216f358d497c63f', 'pngs': '35bf1b0bbd0b42ef'},
        'terms': {'images': '05f30a264bcdd08f', 'losses': 'f68414560f41c49f', 'checkpoint': '851c3fa46beeccb7', 'pngs': 'df7b9cd4b9269b9f'},
        'vqgan-codebook': {'images': '22e6a1cf7b333ccb', 'losses': 'caa417600bf7029e', 'checkpoint': '7df82a96f6ca1903', 'pngs': '92a369a8e9ffe820'},
        'vqgan-gumbel': {'images': 'f26250f954a2b45a', 'losses': '742b42e19f9fc574', 'checkpoint': 'a2b4a90b8e1e0e8d', 'pngs': '67e54a7aa3b842a3'},
        'vqgan-nerdyrodent': {'images': 'a06724d1aa0ea683', 'losses': 'a16108d89292f697', 'checkpoint': '6da6f71ab76a31b3', 'pngs': 'e738d78a2c23b042'},
        'vqgan-zquantize': {'images': 'a06724d1aa0ea683', 'losses': '4ac44e002a3ab17a', 'checkpoint': 'feb1fced23c47d72', 'pngs': 'e738d78a2c23b042'},
    },
}


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def checkpoint_digest(ck) -> str:
    tensors = [v for _, v in sorted(ck.latent.items())]
    for i, s in sorted(ck.optimiser["state"].items()):
        tensors += [v for _, v in sorted(s.items()) if torch.is_tensor(v)]
    return digest(*tensors, *ck.generators, ck.losses, ck.similarities)


def png_digest(run_dir) -> str:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    h = hashlib.sha256()
    # an interrupted run also keeps the image it stopped on: compare the planned snapshots
    for snap in sorted((s for s in manifest["snapshots"] if s["step"] in SNAPSHOTS), key=lambda s: (s["run"], s["step"])):
        with Image.open(run_dir / snap["file"]) as im:
            h.update(f"{snap['run']}:{snap['step']}:".encode() + np.asarray(im.convert("RGB")).tobytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, tiny_model_files):
    """decoder spec per preset family, and the CLIP spec, all in their real file formats."""
    root = tmp_path_factory.mktemp("pinned")
    dvae_json, clip_json = tiny_model_files
    _, vq_yaml, vq_ckpt = tiny_files(root, TINY, name="vq", seed=3)
    _, gu_yaml, gu_ckpt = tiny_files(root, TINY_GUMBEL, "taming.models.vqgan.GumbelVQ", name="gumbel", seed=4)
    return {"dalle": str(dvae_json), "vqgan-imagenet-f16-1024": f"{vq_yaml}:{vq_ckpt}",
            "vqgan-imagenet-f16-16384": f"{vq_yaml}:{vq_ckpt}",  # vqgan-nerdyrodent's: the same tiny taming VQGAN
            "vqgan-gumbel-f8-8192": f"{gu_yaml}:{gu_ckpt}", "clip": str(clip_json)}


def overrides(preset: str, files: dict) -> dict:
    cfg = PRESETS[preset].config
    small = dict(steps=STEPS, snapshots=SNAPSHOTS, cutn=4, seed=7)
    if cfg.prior:  # its prior models 16 x 16 grids (128 px); fewer candidates and completions, the same stages
        return dict(small, prior_candidates=16, prior_shortlist=4, prior_resample=1)
    if cfg.decoder == "shapes-dvae":
        return dict(small, size=64)
    return dict(small, size=32, decoder=files[cfg.decoder], clip=files["clip"])


class StopAt:
    def __init__(self, step):
        self.step = step

    def __call__(self, state):
        if state.step == self.step:
            raise KeyboardInterrupt


def hashes(result, run_dir) -> dict:
    return {"images": digest(result.images), "losses": digest(result.losses, result.similarities),
            "checkpoint": checkpoint_digest(result.checkpoint), "pngs": png_digest(run_dir)}


# Options the presets leave off, on the shapes models: the objective's terms and the loop's variants.
VARIANTS = {
    "terms": dict(tv_weight=0.5, init_weight=0.2, cut_batch=3, loss="cosine", loss_scale=2.0),
    "noise-story": dict(noise_scale=0.05, display_noise=True, story_every=2, pyramid=(), pyramid_every=0, ema=0.0, lr_warmup=2),
    "cuts": dict(cut="normal", cut_range=(0.8, 0.3, 0.5, 0.98), cut_noise=0.1, cut_mirror=0.5, cut_roll=2, cut_clamp=True, cut_resample="bilinear"),
    "bf16-uniform": dict(precision="bf16", cut="uniform", cut_range=(0.6, 0.95), optimiser="adam", lr_growth=1.01, pyramid_every=2),
}
VARIANT_PROMPT = "a red circle on a blue background:2 | a green square:-0.5"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loop_variants_keep_their_bytes(variant, tmp_path):
    kw = dict(steps=STEPS, snapshots=SNAPSHOTS, cutn=4, seed=11, size=64, **VARIANTS[variant])
    result = clipguide.generate(VARIANT_PROMPT, "shapes", out_dir=tmp_path / "run", **kw)
    got = hashes(result, tmp_path / "run")
    if RECORD:
        print(f"    {variant!r}: {got!r},")
    else:
        assert got == pins_for(PINNED, __file__)[variant], f"variant {variant}: the bytes of a pinned run changed"


def test_init_image_run_keeps_its_bytes(tmp_path):
    from clipguide.shapes import scenes

    image = tmp_path / "init.png"
    Image.fromarray(scenes.render(scenes.sample_scenes(1, 5), 64)[0]).save(image)
    result = clipguide.generate("a blue triangle", "shapes", out_dir=tmp_path / "run", steps=STEPS,
                                snapshots=SNAPSHOTS, cutn=4, size=64, init_image=str(image), init_weight=0.5)
    got = hashes(result, tmp_path / "run")
    if RECORD:
        print(f"    'init-image': {got!r},")
    else:
        assert got == pins_for(PINNED, __file__)["init-image"], "the bytes of a pinned init-image run changed"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_keeps_its_bytes_and_a_resumed_run_ends_on_them(preset, model_files, tmp_path):
    if PRESETS[preset].config.augments:  # Kornia's samplers are part of these bytes (pinned with kornia 0.9.0)
        pytest.importorskip("kornia")
    kw = overrides(preset, model_files)
    whole = clipguide.generate("a red circle on a blue background", preset, out_dir=tmp_path / "whole", **kw)
    got = hashes(whole, tmp_path / "whole")
    part = clipguide.generate("a red circle on a blue background", preset, out_dir=tmp_path / "part",
                              callback=StopAt(3), **kw)
    assert part.interrupted and part.steps_done == 3
    resumed = clipguide.resume(tmp_path / "part")
    assert hashes(resumed, tmp_path / "part") == got, f"{preset}: the resumed run differs from the whole one"
    if RECORD:
        print(f"    {preset!r}: {got!r},")
    else:
        assert got == pins_for(PINNED, __file__)[preset], f"{preset}: the bytes of a pinned run changed"
