"""Taming VQGAN decoders: checkpoint loading (Lightning .ckpt + .yaml, Gumbel, Net2Net first
stage, clipguide .json), the registry, and the codebook / z+quantize methods on random weights."""

from __future__ import annotations

import contextlib
import json
import sys
import types
import urllib.error

import pytest
import torch

from clipguide import get_preset, optimise
from clipguide.cli import main
from clipguide.models.decoders import load_decoder, taming_cache_paths
from clipguide.models.vqgan import VQGANDecoder, write_json
from clipguide.errors import ConfigError, UnsafePickleError, WeightsError
from clipguide.models.loading import load_models
from clipguide.engine.latents import make_latent
from clipguide.engine.loop import grid_of
from clipguide.engine.state import make_generators
from clipguide.testing import VQGAN_F16_16384, random_vqgan
from clipguide.models.weights import sha256_file

torch.set_num_threads(1)

# The smallest taming autoencoder that builds (GroupNorm needs multiples of 32 channels): f=4.
TINY_DD = {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
           "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
TINY = {"ddconfig": TINY_DD, "n_embed": 64, "embed_dim": 8}
TINY_GUMBEL = {"ddconfig": {**TINY_DD, "z_channels": 8}, "n_embed": 32, "embed_dim": 8, "quantizer": "gumbel"}
LOSSCONFIG = {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
              "params": {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 250001, "disc_weight": 0.8,
                         "codebook_weight": 1.0}}
# Stand-ins for the LPIPS / discriminator weights a taming checkpoint carries.
LOSS_KEYS = {"loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4), "loss.perceptual_loss.lin0.model.1.weight": torch.ones(1, 64, 1, 1)}


def vq_params(arch: dict) -> dict:
    return {"embed_dim": arch["embed_dim"], "n_embed": arch["n_embed"], "ddconfig": arch["ddconfig"], "lossconfig": LOSSCONFIG}


def write_yaml(path, target: str, params: dict):
    """A taming config as the published ones are laid out (JSON is valid YAML)."""
    path.write_text(json.dumps({"model": {"base_learning_rate": 4.5e-06, "target": target, "params": params}}, indent=1))
    return path


@contextlib.contextmanager
def fake_lightning():
    """A stand-in ``ModelCheckpoint`` under pytorch_lightning.* while pickling: the real
    Lightning is never imported (it takes seconds and is what clipguide avoids)."""
    name = "pytorch_lightning.callbacks.model_checkpoint"
    levels = ("pytorch_lightning", "pytorch_lightning.callbacks", name)
    saved = {k: sys.modules.get(k) for k in levels}
    for level in levels:
        sys.modules[level] = types.ModuleType(level)
    cls = type("ModelCheckpoint", (), {"__module__": name})
    sys.modules[name].ModelCheckpoint = cls
    try:
        yield cls
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def save_lightning(state: dict, path):
    """``state`` saved as PyTorch Lightning 1.x checkpoints are: bookkeeping keyed by a callback class."""
    with fake_lightning() as checkpoint_cls:
        torch.save({
            "epoch": 12, "global_step": 345678, "pytorch-lightning_version": "1.0.8",
            "callbacks": {checkpoint_cls: {"best_model_score": torch.tensor(0.1), "best_model_path": "logs/last.ckpt"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 4.5e-6}]}],
            "lr_schedulers": [], "state_dict": state,
        }, path)
    return path


def tiny_files(tmp_path, arch=TINY, target="taming.models.vqgan.VQModel", name="tiny", seed=0):
    """A random tiny VQGAN saved as a taming .yaml + Lightning .ckpt pair: (decoder, yaml, ckpt)."""
    dec = random_vqgan(arch, seed=seed)
    params = vq_params(arch)
    if arch.get("quantizer") == "gumbel":
        params.update(kl_weight=1e-8, temperature_scheduler_config={
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 1000001, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1e-6}})
    yaml = write_yaml(tmp_path / f"{name}.yaml", target, params)
    ckpt = save_lightning({**dec.state_dict(), **LOSS_KEYS}, tmp_path / f"{name}.ckpt")
    return dec, yaml, ckpt


@pytest.fixture(scope="module")
def tiny_vqgan():
    return random_vqgan(TINY)


@pytest.fixture(scope="module")
def f16_cache(tmp_path_factory):
    """A random full-size ImageNet f16-16384 VQGAN where the registry caches that entry."""
    root = tmp_path_factory.mktemp("cache")
    dec = random_vqgan(VQGAN_F16_16384)
    (root / "vqgan").mkdir()
    yaml, ckpt = (root / "vqgan" / "vqgan-imagenet-f16-16384.yaml", root / "vqgan" / "vqgan-imagenet-f16-16384.ckpt")
    write_yaml(yaml, "taming.models.vqgan.VQModel", vq_params(VQGAN_F16_16384))
    save_lightning({**dec.state_dict(), **LOSS_KEYS}, ckpt)
    return root, dec


def codes_of(idx: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(idx, vocab).permute(0, 3, 1, 2).float()


def test_registry_loads_full_size_lightning_checkpoint(f16_cache, monkeypatch, capsys):
    root, ref = f16_cache
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(root))
    before = set(sys.modules)
    dec = load_decoder("vqgan-imagenet-f16-16384")
    imported = set(sys.modules) - before
    assert not {m for m in imported if "lightning" in m or m.startswith("taming.models")}, imported
    assert isinstance(dec, VQGANDecoder) and (dec.vocab_size, dec.downsample, dec.e_dim) == (16384, 16, 256)
    assert torch.equal(dec.codebook, ref.codebook)
    codes = codes_of(torch.randint(0, 16384, (1, 2, 2), generator=torch.Generator().manual_seed(0)), 16384)
    with torch.no_grad():
        assert torch.allclose(dec.decode(codes), ref.decode(codes), atol=1e-5)
    assert dec.decode(codes).shape == (1, 3, 32, 32)
    yaml, ckpt = taming_cache_paths("vqgan-imagenet-f16-16384")
    assert dec.sha256 == sha256_file(ckpt) and ckpt.with_name(ckpt.name + ".sha256").exists()
    assert dec._encoder is None, "the encoder is built only when an image is encoded"
    assert not any(p.requires_grad for p in dec.decoder.parameters())
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "vqgan-imagenet-f16-16384" in x)
    assert "[cached]" in line


def test_yaml_path_pair_spec_and_lazy_encoder(tmp_path, monkeypatch):
    ref, yaml, ckpt = tiny_files(tmp_path)
    moved = tmp_path / "elsewhere.ckpt"
    ckpt.rename(moved)
    with pytest.raises(WeightsError, match="tiny.ckpt does not exist"):
        load_decoder(str(yaml))
    dec = load_decoder(f"{yaml}:{moved}")
    moved.rename(ckpt)
    assert torch.equal(load_decoder(str(yaml)).codebook, ref.codebook)
    assert dec.downsample == 4 and dec._encoder is None
    z = dec.encode(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert z.shape == (2, 8, 8, 8) and dec._encoder is not None
    on_codebook = (z.movedim(1, -1)[..., None, :] == dec.codebook).all(-1).any(-1)
    assert on_codebook.all(), "encode returns quantized z"


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    yaml = write_yaml(tmp_path / "evil.yaml", "taming.models.vqgan.VQModel", vq_params(TINY))
    torch.save({"state_dict": random_vqgan(TINY).state_dict(), "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError, match="io.open"):
        load_decoder(str(yaml))
    assert not marker.exists()


def test_wrong_config_checkpoint_pairs_name_the_keys(tmp_path):
    _, _, gumbel_ckpt = tiny_files(tmp_path, TINY_GUMBEL, "taming.models.vqgan.GumbelVQ", name="gumbel")
    vq_yaml = write_yaml(tmp_path / "vq.yaml", "taming.models.vqgan.VQModel", vq_params({**TINY_GUMBEL}))
    with pytest.raises(WeightsError) as e:
        load_decoder(f"{vq_yaml}:{gumbel_ckpt}")
    msg = str(e.value)
    assert "\n" not in msg and "gumbel.ckpt" in msg and "vq.yaml" in msg
    assert "1 missing key(s) (quantize.embedding.weight)" in msg
    assert "3 unexpected key(s) (quantize.embed.weight, quantize.proj.bias, quantize.proj.weight)" in msg
    _, _, vq_ckpt = tiny_files(tmp_path, TINY, name="vq64")
    small = write_yaml(tmp_path / "vq32.yaml", "taming.models.vqgan.VQModel", vq_params({**TINY, "n_embed": 32}))
    with pytest.raises(WeightsError, match=r"of another shape .*quantize.embedding.weight \[64, 8\] vs \[32, 8\]"):
        load_decoder(f"{small}:{vq_ckpt}")


def test_gumbel_checkpoint_loads(tmp_path):
    ref, yaml, _ = tiny_files(tmp_path, TINY_GUMBEL, "taming.models.vqgan.GumbelVQ")
    dec = load_decoder(str(yaml))
    assert dec.config.quantizer == "gumbel" and dec.vocab_size == 32 and dec.e_dim == 8
    assert torch.equal(dec.codebook, ref.state_dict()["quantize.embed.weight"])
    codes = codes_of(torch.randint(0, 32, (1, 4, 4), generator=torch.Generator().manual_seed(0)), 32)
    assert torch.allclose(dec.decode(codes), dec.decode_z(torch.einsum("bvhw,vd->bdhw", codes, dec.codebook)))
    z = dec.encode(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(191)))
    assert (z.movedim(1, -1)[..., None, :] == dec.codebook).all(-1).any(-1).all()


def test_net2net_first_stage_loads(tmp_path):
    ref = random_vqgan(TINY, seed=3)
    first = {"target": "taming.models.vqgan.VQModel",
             "params": {**vq_params(TINY), "lossconfig": {"target": "taming.modules.losses.DummyLoss"}}}
    yaml = write_yaml(tmp_path / "sflckr.yaml", "taming.models.cond_transformer.Net2NetTransformer", {
        "cond_stage_key": "segmentation", "first_stage_config": first,
        "cond_stage_config": {"target": "taming.models.vqgan.VQModel", "params": vq_params(TINY)},
        "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT", "params": {"vocab_size": 64}},
    })
    state = {f"first_stage_model.{k}": v for k, v in ref.state_dict().items()}
    state.update({"transformer.tok_emb.weight": torch.zeros(64, 4), "cond_stage_model.quantize.embedding.weight": torch.zeros(8, 8)})
    save_lightning(state, tmp_path / "sflckr.ckpt")
    dec = load_decoder(str(yaml))
    assert torch.equal(dec.codebook, ref.codebook) and dec.name == "sflckr"


def test_clipguide_json_format_round_trip(tmp_path, tiny_vqgan):
    path = write_json(tiny_vqgan, tmp_path / "tiny-vqgan.json", trained_by="test")
    dec = load_decoder(str(path))
    assert isinstance(dec, VQGANDecoder) and dec.sha256 == sha256_file(path.with_suffix(".safetensors"))
    codes = codes_of(torch.randint(0, 64, (1, 8, 8), generator=torch.Generator().manual_seed(0)), 64)
    with torch.no_grad():
        assert torch.equal(dec.decode(codes), tiny_vqgan.decode(codes))


def test_registry_offline_error_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPGUIDE_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(WeightsError) as e:
        load_decoder("vqgan-gumbel-f8-8192")
    msg = str(e.value)
    assert "\n" not in msg and "vqgan-gumbel-f8-8192.yaml" in msg and str(tmp_path / "vqgan") in msg
    assert "https://heibox.uni-heidelberg.de/d/2e5662443a6b4307b470/" in msg


@pytest.mark.parametrize("preset", ["vqgan-codebook", "vqgan-zquantize", "vqgan-gumbel"])
def test_methods_change_the_image_and_snapshots_match_shorter_runs(tiny_vqgan, tiny_clip, preset):
    # lr 0.3: z+quantize's image changes only once z crosses to another code's cell.
    cfg = get_preset(preset).replace(prompts=("a red circle",), size=32, cutn=3, steps=5, snapshots=(0, 3), lr=0.3)
    long, short = optimise(cfg, tiny_vqgan, tiny_clip), optimise(cfg.replace(steps=3, snapshots=()), tiny_vqgan, tiny_clip)
    assert not torch.equal(long.snapshots[0], long.images), "the image should change while optimising"
    assert torch.equal(long.snapshots[3], short.images)
    assert long.images.shape == (1, 3, 32, 32) and torch.isfinite(long.losses).all()


def test_z_stays_inside_the_codebook_box(tiny_vqgan, tiny_clip):
    cfg = get_preset("vqgan-zquantize").replace(prompts=("a blue square",), size=32, cutn=2, steps=3, lr=1.0, batch=2)
    z = optimise(cfg, tiny_vqgan, tiny_clip).latent
    lo, hi = (v.view(1, -1, 1, 1) for v in tiny_vqgan.codebook.aminmax(dim=0))
    assert ((z >= lo) & (z <= hi)).all()
    assert ((z == lo) | (z == hi)).any(), "with lr 1 some coordinates must have been clamped"


def test_init_weight_pulls_toward_the_initial_z_not_zero(tiny_vqgan, tiny_clip):
    cfg = get_preset("vqgan-zquantize").replace(size=32, init_weight=3.0)
    lat = make_latent(cfg, 64, grid_of(cfg, tiny_vqgan), make_generators([0]), decoder=tiny_vqgan)
    z0 = lat.param_init.clone()
    assert z0.abs().mean() > 0.3, "the test needs an initial z away from zero"
    with torch.no_grad():
        lat.param.add_(0.1)
    lat.penalty().sum().backward()
    assert torch.allclose(lat.param.grad, 3.0 * (lat.param - z0).detach() / z0.numel())  # toward z0, not toward 0
    # In the loop: a strong pull keeps z near its start while the prompt alone moves it away.
    run = get_preset("vqgan-zquantize").replace(prompts=("a red circle",), size=32, cutn=2, steps=8, lr=0.1)
    free = optimise(run, tiny_vqgan, tiny_clip).latent
    pulled = optimise(run.replace(init_weight=1e4), tiny_vqgan, tiny_clip).latent
    assert (pulled - z0).norm() < 0.5 * (free - z0).norm()


def test_zquantize_needs_a_codebook_and_a_codebook_start(tiny_dvae, tiny_clip):
    cfg = get_preset("vqgan-zquantize").replace(prompts=("x",), size=32, cutn=2, steps=1)
    with pytest.raises(ConfigError, match="needs a decoder with a codebook"):
        optimise(cfg, tiny_dvae, tiny_clip)
    with pytest.raises(ConfigError, match="--init onehot"):
        cfg.replace(init="randn")


def test_vqgan_has_no_pixel_noise(tiny_vqgan):
    with pytest.raises(ConfigError, match="--noise-scale 0"):
        tiny_vqgan.decode(torch.zeros(1, 64, 2, 2), noise=torch.zeros(1, 3, 8, 8))


def test_cli_generates_with_a_vqgan_json(tmp_path, tiny_vqgan, tiny_model_files):
    _, clip_json = tiny_model_files
    dec_json = write_json(tiny_vqgan, tmp_path / "tiny-vqgan.json")
    out = tmp_path / "run"
    rc = main(["generate", "a red circle on a blue background", "--preset", "vqgan-zquantize", "--decoder", str(dec_json),
               "--clip", str(clip_json), "--size", "32", "--cutn", "2", "--steps", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["models"]["decoder"]["name"] == "tiny-vqgan" and man["models"]["decoder"]["sha256"]


@pytest.mark.parametrize("preset", ["vqgan-codebook", "vqgan-zquantize"])
def test_shipped_shapes_vqgan_runs_both_methods_offline(preset):
    cfg = get_preset(preset).replace(prompts=("a red circle on a blue background",), decoder="shapes-vqgan",
                                     clip="shapes", size=128, cutn=4, steps=3)
    decoder, clip = load_models(cfg)
    r = optimise(cfg, decoder, clip)
    assert isinstance(decoder, VQGANDecoder) and r.images.shape == (1, 3, 128, 128)
    assert torch.isfinite(r.losses).all() and r.steps_done == 3
