"""Weights cache, restricted unpickling and the DALL-E dVAE loaders.

The dVAE files are random-init *full-size* dall_e modules pickled whole with torch.save, as
OpenAI published them, with the Upsample attribute that torch 1.7 pickles lack removed.
"""

from __future__ import annotations

import json
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from dall_e import Decoder, Encoder
from safetensors.torch import save_file

from clipguide.models import loading, safeload, weights
from clipguide.models.dalle_files import load_dalle_decoder, load_dalle_encoder, load_dalle_safetensors, repair_upsample
from clipguide.errors import ConfigError, UnsafePickleError, WeightsError

torch.set_num_threads(1)


def _seeded(build, seed=0):
    """dall_e initialises from the global RNG: seed it without leaking the state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _save_like_torch_1_7(module, path):
    """torch.save the whole module, minus ``recompute_scale_factor`` (added in torch 1.11)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Upsample):
            del m.__dict__["recompute_scale_factor"]
    torch.save(module, path)
    for m in module.modules():  # restore the in-memory reference module
        if isinstance(m, torch.nn.Upsample):
            m.recompute_scale_factor = None


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    decoder = _seeded(Decoder).eval().requires_grad_(False)
    path = tmp_path_factory.mktemp("dalle") / "decoder.pkl"
    _save_like_torch_1_7(decoder, path)
    return decoder, path


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    encoder = _seeded(Encoder).eval().requires_grad_(False)
    path = tmp_path_factory.mktemp("dalle") / "encoder.pkl"
    torch.save(encoder, path)
    return encoder, path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _one_hot_codes(vocab=8192, side=4):
    codes = torch.arange(side * side).view(1, side, side) * 97 % vocab  # [1, h, w]
    return torch.nn.functional.one_hot(codes, vocab).permute(0, 3, 1, 2).float()  # [1, V, h, w]


def _assert_one_line(err, *parts):
    msg = str(err.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, (part, msg)


class _Payload:
    """Unpickling this calls open(marker, "w"): proof of code execution if the marker appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- dVAE pickles ------------------------------------------------------------------------


def test_fixture_pickle_lacks_recompute_scale_factor(decoder_file):
    """The file is like OpenAI's: its Upsample state predates ``recompute_scale_factor``."""
    with zipfile.ZipFile(decoder_file[1]) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"Upsample" in data and b"recompute_scale_factor" not in data


def test_repair_upsample_restores_forward():
    """torch 1.11-2.0 unpickle old Upsample state as is, and forward then fails."""
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    del up.__dict__["recompute_scale_factor"]
    with pytest.raises(AttributeError, match="recompute_scale_factor"):
        up(torch.zeros(1, 1, 2, 2))
    assert repair_upsample(torch.nn.Sequential(up))[0](torch.zeros(1, 1, 2, 2)).shape == (1, 1, 4, 4)


def test_decoder_pickle_loads_repaired_frozen_and_equal(decoder_file):
    reference, path = decoder_file
    decoder, sha = load_dalle_decoder(path)
    assert isinstance(decoder, Decoder) and decoder.vocab_size == 8192
    assert sha == weights.sha256_file(path)
    for group in (1, 2, 3):  # torch >= 2.1 sets True on unpickling, repair_upsample None: same for nearest x2
        assert getattr(decoder.blocks, f"group_{group}").upsample.recompute_scale_factor in (True, None)
    assert not decoder.training and not any(p.requires_grad for p in decoder.parameters())
    codes = _one_hot_codes()
    assert torch.equal(decoder(codes), reference(codes))


def test_frozen_decoder_passes_gradients_to_its_input_only(decoder_file):
    decoder, _ = load_dalle_decoder(decoder_file[1])
    logits = torch.zeros(1, 8192, 2, 2, requires_grad=True)
    decoder(logits.softmax(1)).square().mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.parameters())


def test_encoder_pickle_loads_frozen_and_equal(encoder_file):
    reference, path = encoder_file
    encoder, sha = load_dalle_encoder(path)
    assert isinstance(encoder, Encoder) and sha == weights.sha256_file(path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encoder(x), reference(x))


def test_swapped_file_is_named(encoder_file):
    with pytest.raises(WeightsError) as err:
        load_dalle_decoder(encoder_file[1])
    _assert_one_line(err, encoder_file[1], "Encoder", "decoder.pkl")


def test_truncated_file_is_named(decoder_file, tmp_path):
    cut = tmp_path / "decoder.pkl"
    cut.write_bytes(decoder_file[1].read_bytes()[: 1 << 20])
    with pytest.raises(WeightsError) as err:
        load_dalle_decoder(cut)
    _assert_one_line(err, cut, "truncated or corrupt")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_dalle_decoder(tmp_path / "nope.pkl")
    _assert_one_line(err, tmp_path / "nope.pkl")


def test_payload_is_live(tmp_path):
    """Sanity check for the refusal tests: plain unpickling runs the payload."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["torch-zip", "raw-pickle"])
def test_malicious_pickle_is_refused(tmp_path, fmt):
    marker, path = tmp_path / "pwned", tmp_path / "decoder.pkl"
    if fmt == "torch-zip":
        torch.save({"blocks": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(UnsafePickleError) as err:
        load_dalle_decoder(path)
    _assert_one_line(err, path, "io.open")
    assert not marker.exists()


def test_offline_download_is_one_line(cache, monkeypatch):
    url = "http://127.0.0.1:9/decoder.pkl"  # discard port: refused at once, no real network
    monkeypatch.setitem(weights.DALLE_FILES["decoder"], "url", url)
    with pytest.raises(WeightsError) as err:
        load_dalle_decoder()
    _assert_one_line(err, "decoder.pkl", url, cache / "dalle")
    assert not list((cache / "dalle").iterdir())  # no partial file left behind


def test_default_path_fetches_into_cache(decoder_file, cache, monkeypatch):
    monkeypatch.setitem(weights.DALLE_FILES["decoder"], "url", decoder_file[1].as_uri())
    decoder, sha = load_dalle_decoder()
    cached = cache / "dalle" / "decoder.pkl"
    assert isinstance(decoder, Decoder) and sha == weights.sha256_file(cached)
    assert (cache / "dalle" / "decoder.pkl.sha256").read_text().split() == [sha, "decoder.pkl"]


# --- weights cache -------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src" / "weights.bin"
    path.parent.mkdir()
    path.write_bytes(b"weights" * 1000)
    return path


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))
    assert weights.cache_dir() == tmp_path
    monkeypatch.delenv("CLIPGUIDE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights.cache_dir() == tmp_path / "home" / ".cache" / "clipguide"


def test_fetch_records_then_serves_from_cache(source, cache):
    path = weights.fetch(source.as_uri(), subdir="x")
    assert path == cache / "x" / "weights.bin" and path.read_bytes() == source.read_bytes()
    digest = weights.sha256_file(source)
    assert path.with_name("weights.bin.sha256").read_text().split()[0] == digest
    source.unlink()  # a second fetch must not need the source
    assert weights.fetch(source.as_uri(), subdir="x", sha256=digest) == path


def test_changed_cached_file_is_detected(source, cache):
    path = weights.fetch(source.as_uri(), subdir="x")
    good = weights.sha256_file(path)
    path.write_bytes(b"tampered")
    with pytest.raises(WeightsError) as err:
        weights.fetch(source.as_uri(), subdir="x")
    _assert_one_line(err, path, good, weights.sha256_file(path), "delete it to re-download")


def test_registry_digest_is_checked(source, cache):
    with pytest.raises(WeightsError) as err:
        weights.fetch(source.as_uri(), subdir="x", sha256="0" * 64)
    _assert_one_line(err, "weights.bin", "0" * 64, weights.sha256_file(source))
    assert not list((cache / "x").iterdir())  # neither the file nor a .part survives
    path = weights.fetch(source.as_uri(), subdir="x")  # cached now; a wrong registry digest still fails
    with pytest.raises(WeightsError, match="expected by the registry"):
        weights.fetch(source.as_uri(), subdir="x", sha256="1" * 64)
    assert path.exists()


def test_hand_placed_file_gets_a_sidecar(cache):
    placed = cache / "dalle" / "decoder.pkl"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(b"placed by hand")
    assert weights.fetch("http://127.0.0.1:9/decoder.pkl", subdir="dalle") == placed
    assert placed.with_name("decoder.pkl.sha256").read_text().split()[0] == weights.sha256_file(placed)


# --- restricted checkpoint loading ----------------------------------------------------------


def test_checkpoint_tensors_nested_and_legacy(tmp_path):
    state = {"conv.weight": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), "step": 3}
    for name, kwargs in (("zip.ckpt", {}), ("legacy.ckpt", {"_use_new_zipfile_serialization": False})):
        checkpoint = {"state_dict": state, "epoch": np.int64(2), "lr": np.float32(0.1), "b": b"x"}
        torch.save(checkpoint, tmp_path / name, **kwargs)
        tensors = safeload.load_checkpoint_tensors(tmp_path / name)
        assert list(tensors) == ["conv.weight"] and torch.equal(tensors["conv.weight"], state["conv.weight"])


def test_lightning_bookkeeping_only_with_inert(tmp_path, monkeypatch):
    """Lightning keys callback state by class; those classes are refused unless made inert."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    for level in ("pytorch_lightning", "pytorch_lightning.callbacks", name):  # fakes: importing Lightning takes seconds
        monkeypatch.setitem(sys.modules, level, types.ModuleType(level))
    callback = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = callback
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "callbacks": {callback: {"best": 1.0}}}, path)
    monkeypatch.undo()  # the loader must neither need nor import Lightning
    before = set(sys.modules)
    with pytest.raises(UnsafePickleError) as err:
        safeload.load_checkpoint_tensors(path)
    _assert_one_line(err, path, f"{name}.ModelCheckpoint")
    tensors = safeload.load_checkpoint_tensors(path, inert=safeload.LIGHTNING_BOOKKEEPING)
    assert list(tensors) == ["w"]
    assert not {m for m in set(sys.modules) - before if "lightning" in m}


def test_whole_pickled_model_is_not_a_checkpoint(decoder_file):
    with pytest.raises(UnsafePickleError, match="dall_e.decoder.Decoder"):
        safeload.load_checkpoint_tensors(decoder_file[1])


# --- shipped-format (json + safetensors) dVAE -----------------------------------------------

TINY = {"encoder": {"n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512},
        "decoder": {"n_init": 32, "n_hid": 64, "n_blk_per_group": 1, "vocab_size": 512}}


def _write_tiny_dvae(tmp_path, cfg=TINY):
    encoder, decoder = _seeded(lambda: (Encoder(**TINY["encoder"]), Decoder(**TINY["decoder"])))
    tensors = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    tensors |= {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    save_file(tensors, tmp_path / "tiny-dvae.safetensors")
    (tmp_path / "tiny-dvae.json").write_text(json.dumps({"kind": "dall_e", **cfg, "psnr": 1.0}))
    return encoder.eval(), decoder.eval(), tmp_path / "tiny-dvae.json"


def test_safetensors_dvae_roundtrip(tmp_path):
    ref_enc, ref_dec, path = _write_tiny_dvae(tmp_path)
    encoder, decoder, sha = load_dalle_safetensors(path)
    assert sha == weights.sha256_file(path.with_suffix(".safetensors"))
    assert not any(p.requires_grad for p in [*encoder.parameters(), *decoder.parameters()])
    x, codes = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)), _one_hot_codes(512, 2)
    assert torch.equal(encoder(x), ref_enc(x)) and torch.equal(decoder(codes), ref_dec(codes))


def test_safetensors_dvae_shape_mismatch_is_one_line(tmp_path):
    wrong = {**TINY, "decoder": {**TINY["decoder"], "vocab_size": 1024}}
    _, _, path = _write_tiny_dvae(tmp_path, wrong)
    with pytest.raises(WeightsError) as err:
        load_dalle_safetensors(path)
    _assert_one_line(err, "tiny-dvae.safetensors", "Decoder")


def test_safetensors_dvae_wrong_kind(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps({"kind": "taming"}))
    with pytest.raises(ConfigError, match="kind 'taming'"):
        load_dalle_safetensors(tmp_path / "m.json")


# --- the dVAE encoder of OpenAI's files: encoder.pkl, loaded by the first encode (--init-image) -------


@pytest.fixture(scope="module")
def tiny_pickles(tmp_path_factory):
    """(encoder, folder): a tiny dall_e decoder.pkl and encoder.pkl side by side, pickled as OpenAI's are."""
    encoder, decoder = _seeded(lambda: (Encoder(**TINY["encoder"]), Decoder(**TINY["decoder"])), seed=3)
    folder = tmp_path_factory.mktemp("dvae-pickles")
    _save_like_torch_1_7(decoder, folder / "decoder.pkl")
    torch.save(encoder, folder / "encoder.pkl")
    return encoder.eval().requires_grad_(False), folder


def _images(side=32):
    return torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(5))


def _copy(folder, to, names=("decoder.pkl", "encoder.pkl")):
    import shutil

    to.mkdir()
    for name in names:
        shutil.copy(folder / name, to / name)
    return to / "decoder.pkl"


def test_local_decoder_pkl_encodes_with_the_encoder_pkl_beside_it(decoder_file, encoder_file, tmp_path):
    """Full size: load_decoder(decoder.pkl).encode_logits is dall_e's encoder(map_pixels(x))."""
    from dall_e import map_pixels

    from clipguide.models.decoders import load_decoder

    (tmp_path / "decoder.pkl").symlink_to(decoder_file[1])
    (tmp_path / "encoder.pkl").symlink_to(encoder_file[1])
    decoder = load_decoder(str(tmp_path / "decoder.pkl"))
    assert decoder.encoder is None  # loading the decoder does not load the encoder
    x = _images()
    got = decoder.encode_logits(x)
    assert got.shape == (2, 8192, 4, 4)
    torch.testing.assert_close(got, encoder_file[0](map_pixels(x)), rtol=0, atol=1e-6)
    assert decoder.encoder_sha256 == weights.sha256_file(encoder_file[1])
    assert not any(p.requires_grad for p in decoder.encoder.parameters())


def test_registry_dalle_fetches_encoder_pkl_on_first_encode_and_checks_it_on_next_use(tiny_pickles, cache, monkeypatch):
    from dall_e import map_pixels

    from clipguide.models.decoders import load_decoder

    reference, folder = tiny_pickles
    for kind in ("decoder", "encoder"):  # the "download": file:// URLs through the real fetch
        monkeypatch.setitem(weights.DALLE_FILES[kind], "url", (folder / f"{kind}.pkl").as_uri())
    cached = cache / "dalle" / "encoder.pkl"
    decoder = load_decoder("dalle")
    assert (cache / "dalle" / "decoder.pkl").is_file() and not cached.exists()
    x = _images()
    got = decoder.encode_logits(x)
    sha = weights.sha256_file(folder / "encoder.pkl")
    assert cached.is_file() and cached.with_name("encoder.pkl.sha256").read_text().split() == [sha, "encoder.pkl"]
    assert decoder.encoder_sha256 == sha
    torch.testing.assert_close(got, reference(map_pixels(x)), rtol=0, atol=1e-6)
    assert torch.equal(load_decoder("dalle").encode_logits(x), got)  # next use: served from the cache, checked
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))  # the cached file changes on disk
    with pytest.raises(WeightsError) as err:
        load_decoder("dalle").encode_logits(x)
    _assert_one_line(err, cached, sha, "delete it to re-download")


def test_a_run_without_init_image_never_touches_the_encoder(tiny_pickles, tiny_clip, cache, tmp_path, monkeypatch):
    from pathlib import Path

    from clipguide import RunConfig, optimise
    from clipguide.models.decoders import load_decoder

    _, folder = tiny_pickles
    monkeypatch.setitem(weights.DALLE_FILES["decoder"], "url", (folder / "decoder.pkl").as_uri())
    monkeypatch.setitem(weights.DALLE_FILES["encoder"], "url", "http://127.0.0.1:9/encoder.pkl")  # a fetch would fail
    local = _copy(folder, tmp_path / "local", ("decoder.pkl",))
    marker = tmp_path / "pwned"
    (local.parent / "encoder.pkl").write_bytes(pickle.dumps(_Payload(marker), protocol=2))  # unloadable if read
    touched = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(path, *args, **kwargs):
            touched.append(Path(path).name)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(safeload, "load_pickle_module")
    spy(weights, "sha256_file")
    for spec in ("dalle", str(local)):
        decoder = load_decoder(spec)
        cfg = RunConfig(prompts=("a red circle",), size=32, cutn=2, steps=2, decoder=spec, clip="t")
        result = optimise(cfg, decoder, tiny_clip)
        assert result.models["decoder"] == {"name": decoder.name, "sha256": decoder.sha256, "vocab_size": 512, "downsample": 8}
        assert decoder.encoder is None
    assert "decoder.pkl" in touched and "encoder.pkl" not in touched, touched
    assert not (cache / "dalle" / "encoder.pkl").exists() and not marker.exists()
    # the spy does see the encoder when a run needs it: an init image, with the real encoder.pkl in place
    import shutil

    from PIL import Image

    shutil.copy(folder / "encoder.pkl", local.parent / "encoder.pkl")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "init.png")
    cfg = RunConfig(prompts=("a red circle",), size=32, cutn=2, steps=1, decoder=str(local), clip="t",
                    init_image=str(tmp_path / "init.png"))
    result = optimise(cfg, decoder, tiny_clip)
    assert touched.count("encoder.pkl") == 2  # hashed and unpickled, once
    assert result.models["decoder"]["encoder_sha256"] == decoder.encoder_sha256 is not None


def test_missing_encoder_pkl_beside_a_local_decoder_is_one_line(tiny_pickles, tiny_model_files, tmp_path, capsys):
    from PIL import Image

    from clipguide import RunConfig
    from clipguide.cli import main
    from clipguide.models.decoders import load_decoder
    from clipguide.engine.loop import check_fits

    local = _copy(tiny_pickles[1], tmp_path / "local", ("decoder.pkl",))
    expected = local.parent / "encoder.pkl"
    decoder = load_decoder(str(local))  # a decoder alone is fine until an image is to be encoded
    with pytest.raises(WeightsError) as err:
        decoder.encode_logits(_images())
    _assert_one_line(err, expected, "--decoder dalle", weights.DALLE_FILES["encoder"]["url"])
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(init)
    with pytest.raises(WeightsError) as err:  # refused by the checks a run passes before its folder is made
        check_fits(RunConfig(prompts=("x",), size=32, init_image=str(init)), decoder)
    _assert_one_line(err, expected)
    out = tmp_path / "run"
    rc = main(["generate", "x", "--preset", "shapes", "--decoder", str(local), "--clip", str(tiny_model_files[1]), "--size", "32", "--cutn", "2",
               "--steps", "2", "--init-image", str(init), "--out", str(out)])
    msg = capsys.readouterr().err.strip()
    assert rc == 2 and len(msg.splitlines()) == 1 and str(expected) in msg, msg
    assert not out.exists()


class _Crash(Exception):
    pass


def test_generate_with_init_image_on_pickled_dvae_records_the_encoder_and_resumes(tiny_pickles, tiny_model_files, tmp_path):
    import clipguide
    from PIL import Image

    from clipguide.records.manifest import read_manifest

    local = _copy(tiny_pickles[1], tmp_path / "dvae")
    init = tmp_path / "init.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(init)
    kw = dict(preset="shapes", decoder=str(local), clip=str(tiny_model_files[1]), size=32, cutn=2, seed=3, steps=4)
    reference = clipguide.generate("a red circle", out_dir=tmp_path / "ref", init_image=str(init), **kw)
    encoder_sha = weights.sha256_file(local.parent / "encoder.pkl")
    assert read_manifest(tmp_path / "ref")["models"]["decoder"]["encoder_sha256"] == encoder_sha
    # a plain run with the same (cached, encoder now loaded) decoder: its record is what it always was
    plain = clipguide.generate("a red circle", **kw)
    assert "encoder_sha256" not in plain.models["decoder"] and not torch.equal(plain.images, reference.images)

    def crash_at_3(state):
        if state.step == 3:
            raise _Crash

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        clipguide.generate("a red circle", out_dir=run, init_image=str(init), callback=crash_at_3, checkpoint_every=2, **kw)
    loading.cached_decoder.cache_clear()  # as in a new process: the encoder is not loaded yet
    resumed = clipguide.resume(run)
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.losses, reference.losses)
    assert read_manifest(run)["models"] == read_manifest(tmp_path / "ref")["models"]
    other = _seeded(lambda: Encoder(**TINY["encoder"]), seed=4)  # another encoder.pkl: not the same run any more
    torch.save(other, local.parent / "encoder.pkl")
    loading.cached_decoder.cache_clear()
    try:
        with pytest.raises(WeightsError, match="models differ") as err:
            clipguide.resume(run)
        _assert_one_line(err, f"encoder sha256 {encoder_sha[:12]}")
    finally:
        loading.cached_decoder.cache_clear()
