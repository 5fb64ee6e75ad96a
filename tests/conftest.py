"""Shared fixtures: tiny models of the real architectures (random weights), built in-process."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from clipguide.testing import random_clip, random_dalle_decoder

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_DVAE = dict(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)


def pytest_addoption(parser):
    parser.addoption("--device", default=None, help="torch device of the device-parametrised tests (fixture test_device): "
                     "cpu (default), cuda, cuda:N, mps; or set CLIPGUIDE_TEST_DEVICE")


@pytest.fixture(scope="session")
def test_device(request) -> str:
    """The device that device-parametrised tests move models and tensors to: ``--device`` or
    ``$CLIPGUIDE_TEST_DEVICE``, else "cpu".  Asking for a device this machine lacks fails them."""
    from clipguide.engine.devices import check_device
    from clipguide.errors import ConfigError

    device = request.config.getoption("--device") or os.environ.get("CLIPGUIDE_TEST_DEVICE") or "cpu"
    try:
        return check_device(device)
    except ConfigError as e:
        pytest.fail(f"test device: {e}")


def pytest_configure(config):
    # A shell starts background jobs (`pytest &`) with SIGINT ignored, and an ignored signal stays ignored
    # across exec: the Ctrl-C tests' subprocesses would never see their SIGINT. A handled signal is reset
    # to the default at exec, so the children get Python's usual KeyboardInterrupt.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
    with torch.random.fork_rng():  # dall_e initialises from the global RNG: seed it, leave it as it was
        torch.manual_seed(0)
        enc = Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    tensors = {f"decoder.{k}": v for k, v in dvae.state_dict().items()}
    tensors.update({f"encoder.{k}": v for k, v in enc.state_dict().items()})
    dec_json = root / "tiny-dvae.json"
    dec_json.write_text(json.dumps({"kind": "dall_e", "decoder": TINY_DVAE,
                                    "encoder": {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "tiny-dvae.safetensors")
    return dec_json, clip_json


@pytest.fixture
def one_thread():
    """Run a test on one thread: tiny models gain nothing from more, and on a busy machine
    oversubscribed threads make them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_models():
    """(decoder, clip): the shipped shapes-world dVAE and CLIP (their absence is a failure, not a skip)."""
    from clipguide.paths import PACKAGE_DIR

    models = PACKAGE_DIR / "shapes" / "models"
    if not all((models / f).exists() for f in ("shapes-dvae.json", "shapes-clip.json")):
        pytest.fail("the shapes-world models are missing from clipguide/shapes/models (clipguide train-shapes)")
    from clipguide import load_clip, load_decoder

    return load_decoder("shapes-dvae"), load_clip("shapes")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """The whole suite runs on one torch thread: results are bit-reproducible per thread count,
    tiny models gain nothing from more, and oversubscribed threads on a busy machine are slow."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def render_scenes():
    """``render(n, seed, **pins)``: n shapes-world scenes as a float [n, 3, 128, 128] tensor, with
    their Scene records (attributes pinned by ``colour=``, ``shape=``, ``background=``)."""
    from clipguide.shapes import scenes as S

    def render(n, seed, **pins):
        scenes = S.sample_scenes(n, seed, **pins)
        return S.to_tensor(S.render(scenes, 128)), scenes

    return render


@pytest.fixture
def write_run(tmp_path):
    """``write_run(images, prompts, **snapshotter_kwargs)``: a run directory whose final snapshots
    are ``images`` (one run per image, prompt i for run i), written by a Snapshotter without
    optimising; returns (run_dir, snapshotter)."""
    from clipguide import Snapshotter, get_preset

    def write(images, prompts, step=5, name="run", **kw):
        cfg = get_preset("shapes").replace(prompts=tuple(dict.fromkeys(prompts)), steps=step)
        assert cfg.runs() == [(p, 0) for p in prompts], "one image per distinct prompt"
        saver = Snapshotter(tmp_path / name, cfg, {"decoder": {"name": "none"}, "clip": {"name": "shapes"}}, "shapes", **kw)
        saver.save(step, images)
        return tmp_path / name, saver

    return write
